"""AdamW whose two moment estimates are stored in bf16 (``train.optimizer_states: bf16``).

AdamW keeps two fp32 tensors the size of the trainable weights, half of the training state's
fixed memory beside the weights and their gradients. Here they are stored in bf16 and widened
to fp32 for each update, so the update itself is AdamW's (decoupled weight decay, bias
correction)::

    m_t = b1 m_{t-1} + (1 - b1) g_t          v_t = b2 v_{t-1} + (1 - b2) g_t^2
    theta_t = theta_{t-1} (1 - lr wd) - lr (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)

Writing ``m_t`` and ``v_t`` back to bf16 rounds stochastically. Round-to-nearest would lose the
second moment's slow changes: bf16 resolves only 2^-8 of a value, coarser than ``1 - b2 = 1e-3``,
so ``b2 * v`` would round back to ``v`` and v would never decay. Stochastic rounding is exact in
expectation.

bf16 weights (``train.master_weights: bf16``) are updated in fp32 and written back with the same
stochastic rounding: an AdamW step at lr 1e-5 is 1/24 of bf16's spacing at a weight of 0.05
(2.4e-4), so round-to-nearest would drop it every time.
"""

from __future__ import annotations

import math

import torch


UPDATE_CHUNK = 1 << 22  # elements updated at a time (16 MB of fp32 per temporary)
NOISE_PERIOD = 1 << 16  # the 16 bits that fp32 has beyond bf16
_PERMUTATIONS: dict[torch.device, torch.Tensor] = {}


def round_to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) to bf16, rounded up in magnitude with probability equal to the fraction cut.

    bf16 is fp32's upper 16 bits: adding a uniform random 16-bit integer to the fp32 bit pattern
    carries into the kept bits with exactly that probability, then the low bits are dropped.

    The noise is a fixed permutation of all 2^16 values, rotated by one random shift per call
    and tiled over ``x``: each element's noise is uniform over the 2^16 values (so the rounding is
    exact in expectation), and elements 2^16 apart share it within a call. Drawing one number per
    call instead of one per element makes the rounding ~4x faster on CPU, where the random
    draws were most of bf16 optimizer states' cost (1.3 s a SmolLM2 step).
    """
    bits = x.contiguous().view(torch.int32).reshape(-1)
    shift = int(torch.randint(NOISE_PERIOD, (1,), generator=generator))  # a host generator: no device sync
    noise = _permutation(x.device).roll(shift)
    out = torch.empty_like(bits)
    whole = bits.numel() // NOISE_PERIOD * NOISE_PERIOD
    torch.add(bits[:whole].view(-1, NOISE_PERIOD), noise, out=out[:whole].view(-1, NOISE_PERIOD))
    torch.add(bits[whole:], noise[: bits.numel() - whole], out=out[whole:])
    return out.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16).view(x.shape)


def _permutation(device: torch.device) -> torch.Tensor:
    if device not in _PERMUTATIONS:
        order = torch.randperm(NOISE_PERIOD, generator=torch.Generator().manual_seed(0))
        _PERMUTATIONS[device] = order.to(device=device, dtype=torch.int32)
    return _PERMUTATIONS[device]


class AdamWBf16States(torch.optim.Optimizer):
    """AdamW (``torch.optim.AdamW``'s update) with ``exp_avg`` and ``exp_avg_sq`` stored in bf16."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, seed: int = 0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        # only the rounding's one shift per call comes from it: on the host, whatever the device.
        # Reseeded from (seed, step, parameter) for each update, so a run resumed from a checkpoint
        # rounds as the uninterrupted run did, with no generator state to save.
        self._seed = seed
        self._generator = torch.Generator()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                self._update(param, group, beta1, beta2, index)
        return loss

    def _update(self, param: torch.Tensor, group: dict, beta1: float, beta2: float, index: int) -> None:
        state = self.state[param]
        if not state:  # like the parameter (a DTensor under FSDP2, so checkpoints shard the states)
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
        state["step"] += 1
        step = float(state["step"])
        self._generator.manual_seed(hash((self._seed, int(step), index)) & (2 ** 63 - 1))
        # element-wise, so each rank updates its own shard, and a chunk at a time: the fp32
        # temporaries of a whole embedding (SmolLM2: 113 MB each) raised the step's peak memory
        tensors = [_local(t).view(-1) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
        for start in range(0, tensors[0].numel(), UPDATE_CHUNK):
            chunk = [t[start:start + UPDATE_CHUNK] for t in tensors]
            _adamw_chunk(*chunk, group, beta1, beta2, step, self._generator)


def _adamw_chunk(weights, grad, exp_avg_bf16, exp_avg_sq_bf16, group: dict, beta1: float, beta2: float,
                 step: float, generator: torch.Generator) -> None:
    grad = grad.float()
    exp_avg = exp_avg_bf16.float().lerp_(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq_bf16.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    updated = weights.float() if weights.dtype == torch.bfloat16 else weights
    updated.mul_(1 - group["lr"] * group["weight_decay"])
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
    updated.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))
    if updated is not weights:  # bf16 weights: an update below half their resolution must not vanish
        weights.copy_(round_to_bf16_stochastic(updated, generator))
    exp_avg_bf16.copy_(round_to_bf16_stochastic(exp_avg, generator))
    exp_avg_sq_bf16.copy_(round_to_bf16_stochastic(exp_avg_sq, generator))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writing it writes the DTensor), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
