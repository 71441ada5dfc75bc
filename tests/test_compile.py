"""train.compile: regional torch.compile of the decoder blocks, and its fallback to eager."""

import logging

import pytest
import torch

from unlearn.config import build_config
from unlearn.models import compile_blocks, decoder_blocks, load_model
from unlearn.workflow import run_unlearning


@pytest.mark.slow
def test_compiled_blocks_with_checkpointing_follow_the_eager_run(finetuned, tmp_path):
    _, report, _ = finetuned
    runs = {}
    variants = {"eager": [], "compiled": ["train.compile=true", "model.gradient_checkpointing=true"]}
    for name, extra in variants.items():
        cfg = build_config({}, [f"output_dir={tmp_path / name}", "train.epochs=2", "stop.enabled=false",
                                "eval.before=false", *extra])
        runs[name] = run_unlearning(cfg, report["target"], reference=report["retain"], progress=False)
    eager, compiled = runs["eager"]["history"], runs["compiled"]["history"]
    assert len(eager) == len(compiled) == 8
    for key in ("forget_loss", "retain_loss", "lam"):  # fused kernels round differently, no more
        for step, (a, b) in enumerate(zip(eager, compiled), start=1):
            assert b[key] == pytest.approx(a[key], rel=1e-3), f"{key} at step {step}"
    assert runs["compiled"]["after"]["forget_prob"] == pytest.approx(runs["eager"]["after"]["forget_prob"],
                                                                      rel=1e-3)


@pytest.mark.slow
def test_compiled_blocks_under_fsdp2_follow_the_eager_sharded_model(single_rank_group):
    """The Ray worker's order: blocks checkpointed, sharded with ``fully_shard``, then compiled."""
    from pipelines.fsdp import shard_model
    from unlearn.dual import DualController
    from unlearn.loop import Unlearner, build_optimizer
    from unlearn.objectives import get_objective

    generator = torch.Generator().manual_seed(0)
    forget, retain = (torch.randint(3, 200, (2, 10), generator=generator) for _ in range(2))
    pair = ({"input_ids": forget, "attention_mask": torch.ones_like(forget), "labels": forget.clone()},
            {"input_ids": retain, "attention_mask": torch.ones_like(retain), "labels": retain.clone()})
    history = {}
    for compiled in (False, True):
        model = shard_model(load_model("tiny", gradient_checkpointing=compiled))
        unlearner = Unlearner(model, get_objective("pdu"), build_optimizer(model, 1e-3, 0.0),
                              dual=DualController(lam_0=1.0, eta_dual=10.0, eps=0.1), compile=compiled)
        assert all((block._compiled_call_impl is not None) is compiled for block in decoder_blocks(model))
        history[compiled] = [unlearner.step([pair]) for _ in range(4)]
    for step, (eager, compiled) in enumerate(zip(history[False], history[True]), start=1):
        for key in ("forget_loss", "retain_loss", "lam_next"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-3), f"{key} at step {step}"
    assert history[True][-1]["forget_loss"] != pytest.approx(history[True][0]["forget_loss"], rel=1e-3)


def test_compile_blocks_compiles_every_block_in_place_and_keeps_the_parameter_names():
    model = load_model("tiny")
    names = [name for name, _ in model.named_parameters()]
    assert compile_blocks(model) is None
    assert all(block._compiled_call_impl is not None for block in decoder_blocks(model))
    assert [name for name, _ in model.named_parameters()] == names  # no _orig_mod. prefix


def test_a_backend_that_cannot_compile_leaves_the_model_eager_with_one_line(monkeypatch, caplog):
    from unlearn.dual import DualController
    from unlearn.loop import Unlearner, build_optimizer
    from unlearn.objectives import get_objective

    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    model = load_model("tiny")
    with caplog.at_level(logging.WARNING, logger="unlearn.loop"):
        unlearner = Unlearner(model, get_objective("pdu"), build_optimizer(model, 1e-4, 0.0),
                              dual=DualController(lam_0=1.0, eta_dual=1.0, eps=1.0), compile=True)
    assert [r.getMessage() for r in caplog.records] == [
        "train.compile: torch.compile is not usable on cpu here (RuntimeError: InvalidCxxCompiler: No "
        "working C++ compiler found); the blocks run eager"]
    assert all(block._compiled_call_impl is None for block in decoder_blocks(model))
    ids = torch.randint(3, 200, (2, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    before = model.lm_head.weight.detach().clone()
    assert torch.isfinite(torch.tensor(unlearner.step([(batch, batch)])["forget_loss"]))
    assert not torch.equal(model.lm_head.weight, before)  # it trains, eagerly


def test_a_model_without_known_blocks_gives_the_reason():
    assert "no decoder blocks found" in compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
