"""train.precision: bf16 autocast (fp32 master weights) and train.master_weights: bf16 against fp32,
on the tiny model."""

import types

import pytest
import torch

from unlearn.config import build_config
from unlearn.loop import AUTO_BF16_MIN_HIDDEN, compute_precision, master_weights_dtype, resolve_precision
from unlearn.models import load_model, model_hidden_size
from unlearn.workflow import finetune, run_unlearning, trained_dtype

# bf16 against fp32 over the same 20 PDU steps, the largest relative gap at any step (measured on
# this machine: forget loss 0.11%, retain loss 1.7%, lam 0.30%; final forget Prob 0.2960 vs 0.2958)
TOLERANCE = {"forget_loss": 0.02, "retain_loss": 0.05, "lam": 0.02}


# bf16 master weights (train.master_weights: bf16), same steps: forget loss 0.21%, retain loss 2.5%,
# lam 0.41%; final forget Prob 0.2964 vs 0.2958
RUNS = {"fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16", "train.master_weights=fp32"],
        "bf16 weights": ["train.precision=bf16", "train.master_weights=bf16"]}


@pytest.mark.slow
def test_bf16_unlearning_follows_the_fp32_losses_and_dual_path(finetuned, tmp_path):
    _, report, _ = finetuned
    runs = {}
    for name, overrides in RUNS.items():
        cfg = build_config({}, [f"output_dir={tmp_path / name.replace(' ', '_')}", *overrides,
                                "train.epochs=5", "stop.enabled=false", "eval.before=false"])
        runs[name] = run_unlearning(cfg, report["target"], reference=report["retain"], progress=False)
    fp32 = runs["fp32"]["history"]
    for name in ("bf16", "bf16 weights"):
        bf16 = runs[name]["history"]
        assert len(fp32) == len(bf16) == 20
        for key, tolerance in TOLERANCE.items():
            for step, (a, b) in enumerate(zip(fp32, bf16), start=1):
                assert b[key] == pytest.approx(a[key], rel=tolerance), f"{name}: {key} at step {step}"
        assert runs[name]["after"]["forget_prob"] == pytest.approx(runs["fp32"]["after"]["forget_prob"],
                                                                   rel=0.05)
    # autocast computes in bf16 and leaves the fp32 master weights fp32; bf16 master weights are
    # what the unlearned model holds (half the folder)
    assert {name: saved_dtypes(run["model_dir"]) for name, run in runs.items()} == {
        "fp32": {"F32"}, "bf16": {"F32"}, "bf16 weights": {"BF16"}}


def saved_dtypes(folder) -> set[str]:
    from pathlib import Path

    from safetensors import safe_open

    dtypes = set()
    for weights in Path(folder).glob("*.safetensors"):
        with safe_open(weights, "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes


def test_bf16_runs_the_matmuls_in_bf16_and_keeps_fp32_weights_and_gradients():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with compute_precision(layer, "bf16"):
        y = layer(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert layer.weight.dtype == layer.weight.grad.dtype == torch.float32
    with compute_precision(layer, "fp32"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of fp32, bf16, auto"):
        compute_precision(layer, "fp16")


@pytest.mark.parametrize("hidden, native, expected", [
    (AUTO_BF16_MIN_HIDDEN, True, "bf16"),
    (AUTO_BF16_MIN_HIDDEN - 1, True, "fp32"),  # too small to gain (the tiny model: slower in bf16)
    (AUTO_BF16_MIN_HIDDEN, False, "fp32"),  # no bf16 hardware: emulated bf16 is slower
])
def test_auto_precision_takes_bf16_only_for_a_large_model_on_bf16_hardware(monkeypatch, hidden, native,
                                                                           expected):
    import unlearn.loop as loop

    monkeypatch.setattr(loop, "native_bf16", lambda device: native)
    layer = torch.nn.Linear(8, 4)
    layer.config = types.SimpleNamespace(hidden_size=hidden)  # what resolve_precision reads of an HF config
    assert resolve_precision(layer, "auto") == expected
    assert resolve_precision(layer, "fp32") == "fp32" and resolve_precision(layer, "bf16") == "bf16"
    with compute_precision(layer, "auto"):
        assert layer(torch.randn(3, 8)).dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


@pytest.mark.parametrize("master, precision, model_dtype, hidden, expected", [
    ("auto", "auto", "float32", AUTO_BF16_MIN_HIDDEN, "bfloat16"),  # where auto computes in bf16
    ("auto", "auto", "float32", AUTO_BF16_MIN_HIDDEN - 1, "float32"),
    ("auto", "bf16", "float32", 128, "bfloat16"),
    ("auto", "fp32", "float32", AUTO_BF16_MIN_HIDDEN, "float32"),
    ("fp32", "bf16", "float32", AUTO_BF16_MIN_HIDDEN, "float32"),
    ("bf16", "fp32", "float32", 128, "bfloat16"),
    ("fp32", "auto", "float16", AUTO_BF16_MIN_HIDDEN, "float16"),  # model.dtype other than float32 stays
])
def test_master_weights_follow_the_compute_precision(monkeypatch, master, precision, model_dtype, hidden,
                                                      expected):
    import unlearn.loop as loop

    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    assert master_weights_dtype(master, precision, model_dtype, hidden, torch.device("cpu")) == expected
    # a GPU keeps fp32 master weights under auto (its fused AdamW), bf16 when asked
    on_gpu = master_weights_dtype(master, precision, model_dtype, hidden, torch.device("cuda"))
    assert on_gpu == (model_dtype if master == "auto" else expected)


def test_auto_precision_keeps_the_tiny_model_and_its_demo_in_fp32():
    assert resolve_precision(load_model("tiny"), "auto") == "fp32"
    cfg = build_config({}, [])
    assert cfg.train.precision == cfg.finetune.precision == cfg.train.master_weights == "auto"
    assert model_hidden_size("tiny") == 128
    assert trained_dtype(cfg, "tiny", torch.device("cpu")) == "float32"


def test_bf16_finetuning_follows_fp32():
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = load_model("tiny")
        losses[precision] = finetune(model, lambda epoch: [batch], epochs=10, lr=3e-3,
                                     precision=precision, progress=False)
    assert losses["fp32"][-1] < 0.8 * losses["fp32"][0]  # it learns at all
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_an_unknown_precision_is_refused_naming_the_field():
    from unlearn.config import ConfigError

    with pytest.raises(ConfigError, match="train.precision"):
        build_config({}, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.master_weights"):
        build_config({}, ["train.master_weights=fp16"])
    with pytest.raises(ValueError, match="unknown master weights 'fp16'"):
        master_weights_dtype("fp16", "auto", "float32", 576, torch.device("cpu"))
