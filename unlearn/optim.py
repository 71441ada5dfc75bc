"""AdamW whose two moment estimates are stored in bf16 (``train.optimizer_states: bf16``).

AdamW keeps two fp32 tensors the size of the trainable weights, half of the training state's
fixed memory beside the weights and their gradients. Here they are stored in bf16 and widened
to fp32 for each update, so the update itself is AdamW's (decoupled weight decay, bias
correction)::

    m_t = b1 m_{t-1} + (1 - b1) g_t          v_t = b2 v_{t-1} + (1 - b2) g_t^2
    theta_t = theta_{t-1} (1 - lr wd) - lr (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)

Writing ``m_t`` and ``v_t`` back to bf16 rounds stochastically. Round-to-nearest would lose the
second moment's slow changes: bf16 resolves 2^-8 of a value, finer than ``1 - b2 = 1e-3``, so
``b2 * v`` would round back to ``v`` and v would never decay. Stochastic rounding is exact in
expectation.
"""

from __future__ import annotations

import math

import torch


def round_to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32) to bf16, rounded up in magnitude with probability equal to the fraction cut.

    bf16 is fp32's upper 16 bits: adding a uniform random 16-bit integer to the fp32 bit pattern
    carries into the kept bits with exactly that probability, then the low bits are dropped.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class AdamWBf16States(torch.optim.Optimizer):
    """AdamW (``torch.optim.AdamW``'s update) with ``exp_avg`` and ``exp_avg_sq`` stored in bf16."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, seed: int = 0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._update(param, group, beta1, beta2)
        return loss

    def _update(self, param: torch.Tensor, group: dict, beta1: float, beta2: float) -> None:
        state = self.state[param]
        if not state:  # like the parameter (a DTensor under FSDP2, so checkpoints shard the states)
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
        state["step"] += 1
        step = float(state["step"])
        # element-wise, so each rank updates its own shard
        weights, grad = _local(param), _local(param.grad).float()
        exp_avg = _local(state["exp_avg"]).float().lerp_(grad, 1 - beta1)
        exp_avg_sq = _local(state["exp_avg_sq"]).float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        weights.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        weights.addcdiv_(exp_avg.to(weights.dtype), denom.to(weights.dtype),
                         value=-group["lr"] / (1 - beta1 ** step))
        generator = self._generator(weights.device)
        _local(state["exp_avg"]).copy_(round_to_bf16_stochastic(exp_avg, generator))
        _local(state["exp_avg_sq"]).copy_(round_to_bf16_stochastic(exp_avg_sq, generator))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writing it writes the DTensor), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
