"""Early stopping on never-seen data: the Min-k scores, their sharding, the rule and its wiring."""

import json
import logging

import pytest
import torch

from unlearn.config import build_config
from unlearn.data import DataError, generate_tofu, write_tofu
from unlearn.data.synthetic import HOLDOUT_RATIO, synthetic_source
from unlearn.eval import metrics
from unlearn.eval.scoring import token_scores
from unlearn.models import load_model, load_tokenizer
from unlearn.report import stop_line
from unlearn.stopping import ForgetHoldoutStop, min_k_scores, sharded_scores
from unlearn.workflow import encode_records, load_unlearn_data, make_batches, run_unlearning


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny"), load_tokenizer("tiny")


@pytest.fixture(scope="module")
def splits():
    return generate_tofu(seed=3)


def _batches(tokenizer, records, size=4):
    return make_batches(encode_records(tokenizer, records, max_length=128), size, tokenizer.pad_token_id)


def test_min_k_scores_match_the_evaluations_attack(tiny, splits):
    model, tokenizer = tiny
    batch = _batches(tokenizer, splits["forget10"][:5], size=5)[0]
    naive = [metrics.min_k_score(logprobs) for logprobs, _ in token_scores(model, batch)]
    assert min_k_scores(model, batch) == pytest.approx(naive, abs=1e-5)


def test_sharded_scores_gather_to_the_one_process_order(tiny, splits):
    model, tokenizer = tiny
    batches = _batches(tokenizer, splits["forget10"], size=3)  # 6 batches
    batches = batches[:5]  # an odd count: rank 1 repeats batch 0 once
    single = sharded_scores(model, batches)
    calls = {0: 0, 1: 0}
    parts = {}

    def keep(rank):  # this rank's part is kept for the merge below; no other rank answers here
        def gather(mine):
            parts[rank] = mine
            return [mine]
        return gather

    for rank in (0, 1):
        handle = model.register_forward_hook(lambda *_, rank=rank: calls.__setitem__(rank, calls[rank] + 1))
        sharded_scores(model, batches, rank=rank, world=2, gather=keep(rank))
        handle.remove()
    assert calls == {0: 3, 1: 3}  # every rank runs the same number of forward passes
    merged = sharded_scores(model, batches, rank=0, world=2, gather=lambda mine: [parts[0], parts[1]])
    assert merged == pytest.approx(single, abs=1e-6)
    assert len(merged) == sum(len(b["input_ids"]) for b in batches)


def test_the_rule_waits_for_min_epochs_and_stops_at_its_auc(tiny, splits):
    model, tokenizer = tiny
    forget = _batches(tokenizer, splits["forget10"])
    # the same records on both sides: the attack cannot tell them apart, AUC exactly 0.5
    stop = ForgetHoldoutStop(forget, forget, auc=0.5, min_epochs=2)
    model.train()
    assert not stop.should_stop(model, 0) and not stop.should_stop(model, 1)
    assert stop.history == []
    assert stop.should_stop(model, 2)
    assert stop.history == [(2, 0.5)]
    assert model.training  # measuring restores the training mode
    assert not ForgetHoldoutStop(forget, forget, auc=0.49, min_epochs=0).should_stop(model, 0)


@pytest.mark.parametrize("steps_per_epoch, checks, min_epochs, expected", [
    (4, 4, 1, {4: 1, 5: 1.25, 6: 1.5, 7: 1.75, 8: 2}),
    (5, 2, 1, {5: 1, 7: 1.4, 10: 2}),  # offsets 0 and 5 * 1 // 2 = 2
    (3, 1, 0, {0: 0, 3: 1, 6: 2}),  # once per epoch, at its start
    (2, 4, 1, {2: 1, 3: 1.5, 4: 2}),  # more checks than steps: one before every step
])
def test_checks_fall_on_evenly_spaced_steps_from_min_epochs(steps_per_epoch, checks, min_epochs, expected):
    stop = ForgetHoldoutStop([], [], min_epochs=min_epochs, checks_per_epoch=checks)
    due = {step: stop.due(step, steps_per_epoch) for step in range(2 * steps_per_epoch + 1)}
    assert {step: done for step, done in due.items() if done is not None} == expected


def test_a_check_inside_an_epoch_stops_before_the_next_step(tmp_path, monkeypatch):
    # 16 forget records, batch 4: 4 steps per epoch; AUCs 0.9, 0.8, 0.3 at 1, 1.25 and 1.5 epochs
    aucs = iter([0.9, 0.8, 0.3])
    monkeypatch.setattr(ForgetHoldoutStop, "measure", lambda self, model: next(aucs))
    cfg = build_config({}, [f"output_dir={tmp_path}", "stop.auc=0.5", "stop.checks_per_epoch=4",
                            "train.epochs=3"])
    result = run_unlearning(cfg, "tiny", progress=False)
    assert result["stop"]["stopped_after_epochs"] == 1.5
    assert result["stop"]["auc_by_epoch"] == {"1": 0.9, "1.25": 0.8, "1.5": 0.3}
    assert [m["epoch"] for m in result["history"]] == [0.0] * 4 + [1.0] * 2
    assert "stopped after 1.5 epochs" in stop_line(result["stop"])


def _stopped_run(tmp_path, monkeypatch, name, aucs, *overrides):
    sequence = iter(aucs)
    monkeypatch.setattr(ForgetHoldoutStop, "measure", lambda self, model: next(sequence))
    cfg = build_config({}, [f"output_dir={tmp_path / name}", "stop.auc=0.5", "stop.checks_per_epoch=4",
                            "train.epochs=3", *overrides])
    result = run_unlearning(cfg, "tiny", progress=False)
    return result, load_model(result["model_dir"]).state_dict()


def test_the_run_ends_with_the_weights_of_the_check_closer_to_the_target(tmp_path, monkeypatch):
    # the crossing at 1.5 epochs (0.1) is farther from 0.5 than the check before it (0.52)
    crossed, kept = _stopped_run(tmp_path, monkeypatch, "crossed", [0.9, 0.52, 0.1])
    assert crossed["stop"]["stopped_after_epochs"] == 1.25
    assert crossed["stop"]["auc_by_epoch"] == {"1": 0.9, "1.25": 0.52, "1.5": 0.1}
    assert len(crossed["history"]) == 6  # the step after 1.25 epochs ran and was undone
    assert "kept: closer to 0.500 than 0.100 after 1.5 epochs" in stop_line(crossed["stop"])
    # the same weights as a run that stopped right there
    exact, weights = _stopped_run(tmp_path, monkeypatch, "exact", [0.9, 0.3])
    assert exact["stop"]["stopped_after_epochs"] == 1.25 and len(exact["history"]) == 5
    assert all(torch.equal(kept[k], weights[k]) for k in weights)
    assert crossed["after"] == exact["after"]
    # nearer below than above: the crossing's weights; keep_closer off: always the crossing's
    for name, aucs, flag in (("below", [0.9, 0.8, 0.45], "true"), ("off", [0.9, 0.52, 0.1], "false")):
        result, _ = _stopped_run(tmp_path, monkeypatch, name, aucs, f"stop.keep_closer={flag}")
        assert result["stop"]["stopped_after_epochs"] == 1.5 and len(result["history"]) == 6, name


def test_the_default_stop_split_is_validation_xx_disjoint_from_every_other_author(tmp_path):
    cfg = build_config({}, [f"output_dir={tmp_path}"])
    data = load_unlearn_data(cfg)
    assert len(data.stop) == HOLDOUT_RATIO * len(data.forget)  # never-seen authors per forget author
    seen = {r.author for r in generate_tofu(seed=0)["full"]} | \
        {r.author for r in generate_tofu(seed=0)["holdout10"]}
    stop_authors = {r.author for r in generate_tofu(seed=0)["validation10"]}
    assert stop_authors and not stop_authors & seen


def test_a_cached_synthetic_folder_from_an_older_generator_is_rebuilt(tmp_path):
    old = tmp_path / "tofu-seed0"
    write_tofu({k: v for k, v in generate_tofu(seed=0).items() if not k.startswith("validation")}, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["generator"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert synthetic_source("tofu", tmp_path, seed=0) == old
    assert (old / "validation10.json").is_file()


def _source(tmp_path, **extra):
    splits = generate_tofu(seed=1)
    splits.update(extra)
    return write_tofu(splits, tmp_path / "data")


def test_a_missing_default_stop_split_turns_stopping_off_with_a_warning(tmp_path, caplog):
    splits = {k: v for k, v in generate_tofu(seed=1).items() if not k.startswith("validation")}
    source = write_tofu(splits, tmp_path / "data")
    cfg = build_config({}, [f"output_dir={tmp_path}", f"data.source={source}"])
    with caplog.at_level(logging.WARNING):
        assert load_unlearn_data(cfg).stop is None
    assert "early stopping is off" in caplog.text and "validation10" in caplog.text


@pytest.mark.parametrize("override, message", [
    ("stop.split=nowhere", "stop.split: .*'nowhere'"),
    ("stop.split=holdout10", "stop.split: every record of 'holdout10' is in the evaluation's holdout"),
    ("stop.split=retain90", "shares 144 question\\(s\\) with the retain split"),
])
def test_a_bad_stop_split_fails_before_training_naming_it(tmp_path, override, message):
    cfg = build_config({}, [f"output_dir={tmp_path}", f"data.source={_source(tmp_path)}", override])
    with pytest.raises(DataError, match=message):
        load_unlearn_data(cfg)


def test_records_of_the_evaluations_holdout_are_left_out_of_the_stop_split(tmp_path):
    # real TOFU nests holdout01 in holdout10: forget01's gate must not judge on stop records
    splits = generate_tofu(seed=1)
    stop = splits["holdout10"] + splits["validation10"]
    cfg = build_config({}, [f"output_dir={tmp_path}", f"data.source={_source(tmp_path, mixed=stop)}",
                            "stop.split=mixed"])
    kept = load_unlearn_data(cfg).stop
    assert [r.question for r in kept] == [r.question for r in splits["validation10"]]


def test_stopping_off_loads_no_stop_split(tmp_path):
    cfg = build_config({}, [f"output_dir={tmp_path}", "stop.enabled=false", "stop.split=nowhere"])
    assert load_unlearn_data(cfg).stop is None


def test_a_model_that_never_saw_the_forget_set_stops_before_its_first_step(tmp_path):
    # A random model: forget and never-seen records look alike (AUC near 0.5), below stop.auc.
    cfg = build_config({}, [f"output_dir={tmp_path}", "stop.auc=0.95", "stop.min_epochs=0",
                            "train.epochs=3"])
    before = {k: v.clone() for k, v in load_model("tiny").state_dict().items()}
    result = run_unlearning(cfg, "tiny", progress=False)
    assert result["history"] == []
    assert result["stop"]["stopped_after_epochs"] == 0
    assert 0 < result["stop"]["auc_by_epoch"]["0"] <= 0.95
    after = load_model(result["model_dir"]).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stopping_after_one_epoch_keeps_that_epochs_steps_only(tmp_path):
    cfg = build_config({}, [f"output_dir={tmp_path}", "stop.auc=0.95", "train.epochs=3"])
    result = run_unlearning(cfg, "tiny", progress=False)
    assert result["stop"]["stopped_after_epochs"] == 1
    assert {int(m["epoch"]) for m in result["history"]} == {0}
    assert len(result["history"]) == 4  # 16 forget records, batch 4


def test_forget_command_takes_its_stopping_target_from_a_relative_reference(tmp_path, monkeypatch, capsys,
                                                                           caplog):
    from unlearn import cli
    from unlearn.models import save_model

    monkeypatch.chdir(tmp_path)
    save_model(load_model("tiny"), load_tokenizer("tiny"), tmp_path / "ref")
    (tmp_path / "run.yaml").write_text("output_dir: out\ntrain:\n  epochs: 1\n")
    with caplog.at_level(logging.INFO):
        assert cli.main(["forget", "run.yaml", "--model", "tiny", "--reference", "ref"]) == 0
    assert "early stopping:" in capsys.readouterr().out
    assert "(the reference model's)" in caplog.text
    stop = json.loads((tmp_path / "out" / "unlearn.json").read_text())["stop"]
    assert stop["stopped_after_epochs"] is None and stop["auc_by_epoch"] == {}  # one epoch, no check
