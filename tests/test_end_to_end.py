"""Single-process end to end: finetune the tiny target, unlearn its forget set with PDU.

Measured figures are printed (run with -s) and asserted with stated tolerances.
"""

import json
import math

import pytest
import torch

from unlearn.config import build_config
from unlearn.models import load_model
from unlearn.objectives import available
from unlearn.workflow import run_unlearning

# The retain constraint is enforced by a dual variable, not projected: it holds on average over
# the steps, within this relative margin. The last iterate overshoots more (seed 0, stopped after
# 13 epochs: retain NLL 0.043 against eps 0.037; the last epoch's steps average 0.029).
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
@pytest.mark.parametrize("method", sorted(available()))
def test_every_method_runs_through_the_runner_with_its_defaults(finetuned, method):
    cfg, report, _ = finetuned
    cfg = build_config({}, [f"method.name={method}", "train.epochs=1", "stop.enabled=false",
                            "eval.before=false", f"output_dir={cfg.output_dir}/{method}"])
    result = run_unlearning(cfg, report["target"], reference=report["retain"], progress=False)
    assert result["history"] and all(math.isfinite(h["loss"]) for h in result["history"])
    moved = load_model(result["model_dir"]).state_dict()
    target = load_model(report["target"]).state_dict()
    assert any(not torch.equal(moved[name], value) for name, value in target.items())


@pytest.mark.slow
def test_the_dual_warm_up_in_epochs_holds_lam_for_the_first_epoch_whatever_its_length(finetuned):
    cfg, report, _ = finetuned
    for accum in (1, 2):  # 4 and 2 steps an epoch
        cfg = build_config({}, ["train.epochs=2", "stop.enabled=false", "eval.before=false",
                                "dual.warmup_epochs=1", f"train.grad_accum={accum}",
                                f"output_dir={cfg.output_dir}/warmup{accum}"])
        history = run_unlearning(cfg, report["target"], reference=report["retain"], progress=False)["history"]
        per_epoch = len(history) // 2
        assert per_epoch == 4 // accum
        assert {h["lam_next"] for h in history[:per_epoch]} == {cfg.dual.lam_0}
        assert history[per_epoch]["lam_next"] != cfg.dual.lam_0
    with pytest.raises(Exception, match="set warmup_steps or warmup_epochs, not both"):
        build_config({}, ["dual.warmup_epochs=1", "dual.warmup_steps=3"])


@pytest.mark.slow
def test_pdu_forgets_while_retain_loss_respects_eps(finetuned):
    cfg, report, _ = finetuned
    result = run_unlearning(cfg, report["target"], reference=report["retain"], progress=False)
    before, after, eps = result["before"], result["after"], result["eps"]
    print("PDU before:", before, "after:", after, "eps:", eps)
    assert after["forget_prob"] < 0.5 * before["forget_prob"]
    history = result["history"]
    last_epoch = [h["retain_loss"] for h in history if h["epoch"] == history[-1]["epoch"]]
    print("last epoch's retain losses:", last_epoch)
    assert sum(last_epoch) / len(last_epoch) <= eps * (1 + EPS_TOLERANCE)
    assert {"lam", "eps", "slack", "forget_loss", "retain_loss"} <= set(history[0])
    assert history[-1]["forget_loss"] < history[0]["forget_loss"]
    # early stopping ends the run once forget looks as unseen as it does to the retain model, not
    # at an earlier check, and keeps whichever of the crossing and the check before is closer
    stop = result["stop"]
    print("early stopping:", stop)
    stopped, target = stop["stopped_after_epochs"], stop["target_auc"]
    assert stopped is not None and stopped < cfg.train.epochs
    aucs = {float(done): auc for done, auc in stop["auc_by_epoch"].items()}
    checks = sorted(aucs)
    crossed = checks[-1]
    assert aucs[crossed] <= target and all(aucs[done] > target for done in checks[:-1])
    steps_per_epoch = sum(m["epoch"] == 0 for m in history)
    assert len(history) == round(crossed * steps_per_epoch)  # the steps before the crossing check
    closer = min(checks[-2:], key=lambda done: abs(aucs[done] - target))
    assert stopped == closer


@pytest.mark.slow
def test_local_demo_command_prints_the_table_and_writes_the_summary(tmp_path, capsys, monkeypatch):
    """``unlearn demo --local``; the Ray demo runs as a user runs it in ``test_cli_user``."""
    from unlearn import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    code = cli.main(["demo", "--output", str(out), "--local", "finetune.epochs=2", "train.epochs=1",
                     "eval.max_new_tokens=8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "forget_quality" in printed and "after" in printed
    summary = json.loads((out / "summary.json").read_text())
    for stage in ("before", "after"):
        assert {"forget_quality", "model_utility", "forget_prob", "privleak"} <= set(summary[stage])
    assert summary["before"]["forget_quality"] is not None  # the retain model is the reference
    assert (out / "unlearned" / "config.json").is_file()


def test_dual_dynamics_plot_finds_metrics_missing_from_the_first_row(tmp_path):
    from unlearn.report import dynamics_series, plot_dual_dynamics

    # As the Ray pipeline logs them: eps once at step 0, the step metrics from step 1.
    history = [{"step": 0.0, "eps": 0.05}] + [
        {"step": float(s), "forget_loss": 10.0 - s, "retain_loss": 0.04 + s / 100, "lam": s / 10}
        for s in (1, 2, 3)]
    panels = dynamics_series(history)
    assert list(panels) == ["forget loss", "retain loss vs eps", "dual variable lam"]
    assert panels["retain loss vs eps"]["retain_loss"] == ([1.0, 2.0, 3.0], [0.05, 0.06, 0.07])
    assert panels["retain loss vs eps"]["eps"] == ([0.0], [0.05])
    assert panels["dual variable lam"]["lam"][1] == [0.1, 0.2, 0.3]
    assert dynamics_series([{"step": 0.0}]) == {}
    assert plot_dual_dynamics(history, tmp_path / "d.png").stat().st_size > 0
