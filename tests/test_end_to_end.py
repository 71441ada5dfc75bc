"""Single-process end to end: finetune the tiny target, unlearn its forget set with PDU.

Measured figures are printed (run with -s) and asserted with stated tolerances.
"""

import json

import pytest

from unlearn.workflow import run_unlearning

# The retain constraint is enforced by a dual variable, not projected: allow the final retain
# loss to exceed eps by this relative margin.
EPS_TOLERANCE = 0.05


@pytest.mark.slow
def test_target_memorises_and_retain_model_does_not(finetuned):
    _, report, _ = finetuned
    probs = report["forget_prob"]
    print("forget-set Prob:", json.dumps(probs))
    assert probs["target"] > 0.8, "the target must memorise its forget set"
    assert probs["target"] > 5 * probs["base"]
    assert probs["retain"] < 0.5 * probs["target"], "the retain model never saw the forget set"


@pytest.mark.slow
def test_pdu_forgets_while_retain_loss_respects_eps(finetuned):
    cfg, report, _ = finetuned
    result = run_unlearning(cfg, report["target"], progress=False)
    before, after, eps = result["before"], result["after"], result["eps"]
    print("PDU before:", before, "after:", after, "eps:", eps)
    assert after["forget_prob"] < 0.5 * before["forget_prob"]
    assert after["retain_loss"] <= eps * (1 + EPS_TOLERANCE)
    history = result["history"]
    assert {"lam", "eps", "slack", "forget_loss", "retain_loss"} <= set(history[0])
    assert history[-1]["forget_loss"] < history[0]["forget_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("local", [True, False], ids=["one-process", "ray"])
def test_demo_command_prints_the_table_and_writes_the_summary(tmp_path, capsys, monkeypatch, local):
    from unlearn import cli

    monkeypatch.chdir(tmp_path)  # the demo's MLflow database goes to the working directory
    out = tmp_path / "demo"
    code = cli.main(["demo", "--output", str(out), *(["--local"] if local else []), "finetune.epochs=2",
                     "train.epochs=1", "eval.max_new_tokens=8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "forget_quality" in printed and "after" in printed
    summary = json.loads((out / "summary.json").read_text())
    for stage in ("before", "after"):
        assert {"forget_quality", "model_utility", "forget_prob", "privleak"} <= set(summary[stage])
    assert summary["before"]["forget_quality"] is not None  # the retain model is the reference
    assert (out / "unlearned" / "config.json").is_file()
    if not local:
        assert summary["mlflow_run_id"] and (tmp_path / "mlflow.db").is_file()
        assert "mlflow ui --backend-store-uri" in printed
