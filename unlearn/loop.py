"""One unlearning step, framework-free: the single-process runner and the Ray worker both call it.

    (forget batch, retain batch) x grad_accum -> objective -> backward -> clip -> optimizer
    -> scheduler -> dual update (on the step's mean retain loss) -> metrics dict
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from unlearn import losses
from unlearn.dual import DualController
from unlearn.models import compile_blocks
from unlearn.objectives import Objective, StepInputs, forward_logits, on_model_device
from unlearn.optim import AdamWBf16States

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]
Pair = tuple[Batch, Batch | None]


def pair_batches(forget: Sequence[Batch], retain: Sequence[Batch] | None) -> Iterator[Pair]:
    """Forget-anchored pairing: one pass over ``forget``, the retain batches cycle."""
    if not forget:
        raise ValueError("the forget set produced no batch")
    if retain is None or len(retain) == 0:
        yield from ((f, None) for f in forget)
        return
    yield from zip(forget, itertools.cycle(retain))


PRECISIONS = ("fp32", "bf16", "auto")
# From this hidden size on, ``auto`` computes in bf16. Measured (bench/step.py): SmolLM2-135M's
# (576) step is ~1.5x faster in bf16 on a CPU with avx512_bf16; the tiny model's (128) is slower,
# its matrices too small to gain.
AUTO_BF16_MIN_HIDDEN = 512


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware (a GPU that supports bf16; a CPU with
    avx512_bf16 or AMX), where emulating them would make bf16 slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def resolve_precision(model: nn.Module, precision: str) -> str:
    """``fp32`` or ``bf16``; ``auto`` is bf16 for a model of hidden size >= AUTO_BF16_MIN_HIDDEN
    on a device with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or 0
    return auto_precision(hidden, next(model.parameters()).device)


def auto_precision(hidden_size: int, device: torch.device) -> str:
    """What ``auto`` means for a model of ``hidden_size`` on ``device``."""
    return "bf16" if hidden_size >= AUTO_BF16_MIN_HIDDEN and native_bf16(device) else "fp32"


def master_weights_dtype(master_weights: str, precision: str, model_dtype: str, hidden_size: int,
                         device: torch.device) -> str:
    """The dtype the trained model is loaded and kept in (``train.master_weights``): ``bf16``
    halves the memory of its weights, gradients and AdamW states (updates rounded stochastically,
    ``unlearn.optim``); ``auto`` takes bf16 on a CPU where the compute precision is bf16, where it
    was measured as fast at ~0.65x the peak memory. A GPU keeps fp32 master weights under ``auto``:
    its fused AdamW is one kernel, the stochastic rounding a loop over the parameters, and the
    step there is bound by kernel launches (not measured on a GPU). A model.dtype other than
    float32 is kept as it is."""
    if master_weights not in PRECISIONS:
        raise ValueError(f"unknown master weights {master_weights!r}; choose one of {', '.join(PRECISIONS)}")
    if model_dtype != "float32" or master_weights == "fp32":
        return model_dtype
    if master_weights == "auto":
        compute = precision if precision != "auto" else auto_precision(hidden_size, device)
        if compute != "bf16" or device.type != "cpu":
            return model_dtype
    return "bfloat16"


def compute_precision(model: nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """The context a training forward and backward run in: ``fp32`` as the weights are; ``bf16``
    under ``torch.autocast`` on the model's device (matmuls in bf16; weights, gradients and
    optimizer states stay in their own dtype, fp32 master weights by default); ``auto``: see
    ``resolve_precision``."""
    precision = resolve_precision(model, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def supervised_tokens(batch: Batch | None) -> int:
    return 0 if batch is None else int((batch["labels"][:, 1:] != -100).sum())


def supervised_samples(batch: Batch | None) -> int:
    return 0 if batch is None else int((batch["labels"][:, 1:] != -100).any(dim=1).sum())


_COUNTERS = {"tokens": supervised_tokens, "samples": supervised_samples}


@dataclass
class Unlearner:
    """Holds what a step needs; ``step`` is the one training step every runner uses."""

    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    ref_model: nn.Module | None = None
    dual: DualController | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    max_grad_norm: float | None = 1.0
    fused: bool = True  # fused chunked losses; False = plain losses on full logits (reference)
    chunk_size: int = 1024
    # backward through the forget term before the retain forward (objectives whose loss is a
    # weighted sum of the two): one batch's activations alive at a time instead of two
    backward_per_term: bool = True
    precision: str = "fp32"  # see resolve_precision
    compile: bool = False  # regional torch.compile of the model's decoder blocks (compile_blocks)
    # Data-parallel runs: sums a tensor over the ranks (in place), and the number of ranks. With
    # both set, each rank weighs its loss terms by its share of the global batch's tokens (or
    # samples), so the step matches one process's on the whole batch (see rank_shares).
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None
    world_size: int = 1
    extra: dict = field(default_factory=dict)
    global_step: int = 0

    def __post_init__(self) -> None:
        if self.objective.needs_ref and self.ref_model is None:
            raise ValueError(f"method {self.objective.name!r} needs a frozen reference model")
        if self.objective.uses_dual and self.dual is None:
            raise ValueError(f"method {self.objective.name!r} needs a DualController")
        chosen = resolve_precision(self.model, self.precision)  # refuses an unknown precision now
        if chosen != self.precision:
            log.info("train.precision %s: %s", self.precision, chosen)
        self.precision = chosen
        if self.compile:
            reason = compile_blocks(self.model)
            if reason:
                log.warning("train.compile: %s; the blocks run eager", reason)

    def step(self, micro_batches: Sequence[Pair]) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns metrics."""
        if not micro_batches:
            raise ValueError("step() needs at least one (forget, retain) pair")
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        retain_losses: list[float] = []
        tokens = 0
        scale = 1.0 / len(micro_batches)
        shares = self.rank_shares(micro_batches)
        for (forget, retain), share in zip(micro_batches, shares):
            forget = on_model_device(self.model, forget)
            retain = None if retain is None else on_model_device(self.model, retain)
            inputs = StepInputs(self.model, forget, retain, self.ref_model, self.dual, self.extra,
                                fused=self.fused, chunk_size=self.chunk_size)
            with compute_precision(self.model, self.precision):
                weights = self.objective.term_weights(inputs) if self.backward_per_term else None
                if weights is None:
                    out = self.objective.compute(inputs)
                    (out.loss * scale).backward()
                else:
                    out = self.objective.backward_by_term(inputs, weights, scale, share)
            _accumulate(totals, "loss", float(out.loss.detach()) * scale)
            _accumulate(totals, "forget_loss", float(out.forget_loss.detach()) * scale)
            for key, value in out.metrics.items():
                _accumulate(totals, key, value * scale)
            if out.retain_loss is not None:
                retain_losses.append(float(out.retain_loss.detach()))
            tokens += supervised_tokens(forget) + supervised_tokens(retain)
        grad_norm = self._clip()
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        metrics = {**totals, "lr": lr, "grad_norm": grad_norm, "tokens": float(tokens)}
        if retain_losses:
            metrics["retain_loss"] = sum(retain_losses) / len(retain_losses)
        if self.dual is not None and retain_losses:
            lam_used = self.dual.lam
            self.dual.update(metrics["retain_loss"])  # reduced across ranks inside
            metrics.update(lam=lam_used, lam_next=self.dual.lam, eps=float(self.dual.eps),
                           slack=self.dual.slack(metrics["retain_loss"]))
        elapsed = time.perf_counter() - start
        metrics.update(step=float(self.global_step), step_time=elapsed,
                       tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0)
        return metrics

    def rank_shares(self, micro_batches: Sequence[Pair]) -> list[tuple[float, float]]:
        """``(s_f, s_r)`` per micro-batch: ``world * n_rank / n_global`` for the forget and the
        retain term, n counting what the term averages over (supervised tokens, or samples).

        Each rank's loss is a mean over its own slice, and FSDP averages the ranks' gradients, so
        unweighted the step would be a mean of per-rank means; weighted by these shares it is the
        mean over the whole global batch, as one process computes it. Exactly 1.0 in one process.
        Steps that backpropagate the loss whole (``backward_per_term`` off, or ``term_weights``
        None) keep the per-rank means; so do objectives with ``forget_mean_over`` None.
        """
        ones = [(1.0, 1.0)] * len(micro_batches)
        forget_unit = self.objective.forget_mean_over
        if (self.all_reduce_sum is None or self.world_size == 1 or forget_unit is None
                or not self.backward_per_term):
            return ones
        count_forget = _COUNTERS[forget_unit]
        local = torch.tensor([[count_forget(f), supervised_tokens(r)] for f, r in micro_batches],
                             dtype=torch.float64)
        total = self.all_reduce_sum(local.clone())
        shares = torch.where(total > 0, self.world_size * local / total.clamp(min=1), torch.ones_like(local))
        return [(float(f), float(r)) for f, r in shares.tolist()]

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.max_grad_norm is None:
            norms = torch.stack([p.grad.detach().float().norm() for p in params])
            return float(norms.norm())
        return float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "dual": self.dual.state_dict() if self.dual is not None else None,
        }


def _accumulate(totals: dict[str, float], key: str, value: float) -> None:
    totals[key] = totals.get(key, 0.0) + value


@torch.no_grad()
def per_sample_nll(model: nn.Module, batches: Iterable[Batch]) -> Tensor:
    """Each sample's mean answer-token NLL, in batch order."""
    model.eval()
    values = [
        losses.nll(forward_logits(model, batch), batch["labels"], reduction="per_sample").cpu()
        for batch in (on_model_device(model, b) for b in batches)
    ]
    return torch.cat(values) if values else torch.empty(0)


@torch.no_grad()
def mean_nll(model: nn.Module, batches: Iterable[Batch],
             all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> float:
    """Token-weighted mean NLL over all supervised tokens of ``batches`` (the retain loss); with
    ``all_reduce_sum``, over the batches of every rank together."""
    model.eval()
    total, count = 0.0, 0
    for batch in (on_model_device(model, b) for b in batches):
        n = supervised_tokens(batch)
        if n:
            total += float(losses.nll(forward_logits(model, batch), batch["labels"])) * n
            count += n
    if all_reduce_sum is not None:
        total, count = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    if count == 0:
        raise ValueError("no supervised token to measure a loss on")
    return total / count


def mean_prob(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean over samples of ``Prob = exp(-mean answer NLL)`` (the TOFU Prob)."""
    nll = per_sample_nll(model, batches)
    return float(torch.exp(-nll).mean()) if nll.numel() else math.nan


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, schedule: str = "constant",
                    warmup_ratio: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then constant, linear decay or cosine decay to zero."""
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {schedule!r}")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, *,
                    states: str = "fp32") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, no decay on biases and norms.

    On GPU the fused implementation: one kernel over all parameters, without the foreach
    version's temporaries the size of the model. CPU keeps the reference per-parameter loop: the
    fused CPU kernel halves the optimizer's time (0.13 to 0.06 s a SmolLM2 step, ~1.5% of the
    step) but rounds differently (1e-7), and the demo's unlearning run, whose dual variable
    climbs to ~5e3, ended in a different place with it. ``states="bf16"``: the moment estimates
    in bf16 (``unlearn.optim.AdamWBf16States``). bf16 weights always take that optimizer: it
    rounds their updates stochastically, where torch's AdamW would round most of them away.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if states not in ("fp32", "bf16"):
        raise ValueError(f"unknown optimizer state precision {states!r}; choose fp32 or bf16")
    if states == "bf16" or any(p.dtype == torch.bfloat16 for p in decay + no_decay):
        return AdamWBf16States(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, fused=fused_adamw_supported(decay + no_decay) or None)


def fused_adamw_supported(params: list) -> bool:
    """Whether every parameter is a floating-point CUDA tensor (plain or FSDP2's DTensor)."""
    return bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)
