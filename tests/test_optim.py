"""train.optimizer_states: AdamW with its moment estimates stored in bf16, and bf16 master weights."""

import copy

import pytest
import torch

from unlearn.config import ConfigError, build_config
from unlearn.loop import build_optimizer
from unlearn.optim import AdamWBf16States, round_to_bf16_stochastic
from unlearn.workflow import run_unlearning


def test_stochastic_rounding_keeps_bf16_values_and_is_unbiased_between_neighbours():
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0e-5], dtype=torch.bfloat16).float()
    assert torch.equal(round_to_bf16_stochastic(exact).float(), exact)
    generator = torch.Generator().manual_seed(0)
    for value in (1.0 + 2.0 ** -10, -(1.0 + 2.0 ** -10)):  # 1/8 of the way from 1 to 1 + 2^-7
        x = torch.full((200_000,), value)
        rounded = round_to_bf16_stochastic(x, generator).float()
        assert set(rounded.abs().unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
        assert rounded.mean().item() == pytest.approx(value, abs=2e-5)
        assert (rounded.abs() > 1).float().mean().item() == pytest.approx(1 / 8, abs=0.01)


def test_the_second_moment_decays_as_in_fp32():
    # round-to-nearest would keep b2 * v == v in bf16 (1 - b2 = 1e-3 is below its resolution)
    param = torch.nn.Parameter(torch.zeros(20_000))
    optimizer = AdamWBf16States([param], lr=0.0)
    param.grad = torch.ones_like(param)
    optimizer.step()
    param.grad = torch.zeros_like(param)
    for _ in range(500):
        optimizer.step()
    mean = optimizer.state[param]["exp_avg_sq"].float().mean().item()
    assert mean == pytest.approx(1e-3 * 0.999 ** 500, rel=0.01)


def test_updates_follow_torch_adamw():
    torch.manual_seed(0)
    target = torch.randn(64, 32)
    weights = {name: torch.nn.Parameter(torch.randn(64, 32)) for name in ("fp32", "bf16")}
    weights["bf16"].data.copy_(weights["fp32"].data)
    optimizers = {"fp32": torch.optim.AdamW([weights["fp32"]], lr=1e-2, weight_decay=0.1, foreach=False),
                  "bf16": AdamWBf16States([weights["bf16"]], lr=1e-2, weight_decay=0.1)}
    start = weights["fp32"].detach().clone()
    for _ in range(50):
        batch = torch.randn(16, 32)
        for name, w in weights.items():
            optimizers[name].zero_grad()
            ((batch @ w.T - batch @ target.T) ** 2).mean().backward()
            optimizers[name].step()
    moved = (weights["fp32"] - start).norm()
    assert moved > 1.0  # it trained at all
    assert (weights["bf16"] - weights["fp32"]).norm() < 0.01 * moved


def test_bf16_weights_keep_updates_far_below_their_resolution():
    # lr 1e-4 a step against bf16's spacing of 2^-8 below 1.0: round-to-nearest keeps 1.0 forever
    weights = {name: torch.nn.Parameter(torch.ones(8192, dtype=dtype))
               for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                                   ("nearest", torch.bfloat16))}
    optimizers = {"fp32": torch.optim.AdamW([weights["fp32"]], lr=1e-4, weight_decay=0.0, foreach=False),
                  "bf16": AdamWBf16States([weights["bf16"]], lr=1e-4, weight_decay=0.0),
                  "nearest": torch.optim.AdamW([weights["nearest"]], lr=1e-4, weight_decay=0.0)}
    for _ in range(50):
        for name, w in weights.items():
            w.grad = torch.ones_like(w)
            optimizers[name].step()
    assert weights["fp32"].mean().item() == pytest.approx(1 - 50e-4, abs=1e-5)
    assert weights["bf16"].dtype == torch.bfloat16
    assert weights["bf16"].float().mean().item() == pytest.approx(weights["fp32"].mean().item(), abs=1e-4)
    assert torch.equal(weights["nearest"].float(), torch.ones(8192))  # what torch's AdamW does to bf16


def test_a_resumed_optimizer_rounds_bf16_weights_as_the_uninterrupted_one():
    torch.manual_seed(0)
    grads = [torch.randn(5000).bfloat16() for _ in range(2)]
    weights = torch.nn.Parameter((torch.randn(5000) * 0.02).bfloat16())
    optimizer = AdamWBf16States([weights], lr=1e-3)
    weights.grad = grads[0]
    optimizer.step()
    checkpoint = copy.deepcopy(optimizer.state_dict()), weights.detach().clone()
    weights.grad = grads[1]
    optimizer.step()
    resumed = torch.nn.Parameter(checkpoint[1])
    resumed_optimizer = AdamWBf16States([resumed], lr=1e-3)
    resumed_optimizer.load_state_dict(checkpoint[0])
    resumed.grad = grads[1]
    resumed_optimizer.step()
    # the rounding's shift comes from (seed, step, parameter): a generator carried over from step
    # 1 would have rounded ~1/3 of these weights the other way
    assert torch.equal(resumed, weights)


def test_build_optimizer_chooses_the_state_precision_and_refuses_others():
    model = torch.nn.Linear(4, 4)
    assert isinstance(build_optimizer(model, 1e-3, 0.0, states="bf16"), AdamWBf16States)
    assert type(build_optimizer(model, 1e-3, 0.0)) is torch.optim.AdamW
    # bf16 weights: stochastically rounded updates whatever the states were asked to be
    assert isinstance(build_optimizer(torch.nn.Linear(4, 4).bfloat16(), 1e-3, 0.0), AdamWBf16States)
    with pytest.raises(ValueError, match="unknown optimizer state precision 'fp16'"):
        build_optimizer(model, 1e-3, 0.0, states="fp16")
    with pytest.raises(ConfigError, match="train.optimizer_states"):
        build_config({}, ["train.optimizer_states=fp16"])


# PDU over the same 20 steps, fp32 against bf16 moment estimates: the largest relative gap at any
# step (measured: see the README's speed and memory section)
TOLERANCE = {"forget_loss": 0.02, "retain_loss": 0.02, "lam": 0.02}


@pytest.mark.slow
def test_bf16_states_follow_the_fp32_losses_and_dual_path(finetuned, tmp_path):
    _, report, _ = finetuned
    runs = {}
    for states in ("fp32", "bf16"):
        cfg = build_config({}, [f"output_dir={tmp_path / states}", f"train.optimizer_states={states}",
                                "train.epochs=5", "stop.enabled=false", "eval.before=false"])
        runs[states] = run_unlearning(cfg, report["target"], reference=report["retain"], progress=False)
    fp32, bf16 = runs["fp32"]["history"], runs["bf16"]["history"]
    assert len(fp32) == len(bf16) == 20
    for key, tolerance in TOLERANCE.items():
        for step, (a, b) in enumerate(zip(fp32, bf16), start=1):
            assert b[key] == pytest.approx(a[key], rel=tolerance), f"{key} at step {step}"
    after = {states: run["after"]["forget_prob"] for states, run in runs.items()}
    assert after["bf16"] == pytest.approx(after["fp32"], rel=0.05)
