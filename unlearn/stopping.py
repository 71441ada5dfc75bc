"""Stop unlearning once the forget set looks like data the model never saw.

A forget objective has no resting point at "never seen": it either stalls above it or goes on
until the forget facts are less likely than unseen ones. Where that level lies differs from one
data set and seed to the next (the demo's three seeds crossed it after 9, 13 and ~22 epochs, and
then over-forgot down to privleak -67). So the loop measures it instead of guessing it.

Before each of ``checks_per_epoch`` evenly spaced steps of every epoch, from ``min_epochs`` on,
the forget set and a split of never-seen records of the same kind (``stop.split``: TOFU-like
authors that are neither in training nor in the evaluation's holdout) are scored with the Min-k%
membership attack that the evaluation's privleak uses (mean of the lowest 40% answer-token
log-probs):

    AUC = P( score(forget sample) > score(never-seen sample) )      (ties count 1/2)

and training stops when ``AUC <= stop.auc`` (0.5: the attack cannot tell them apart). One check
per epoch was too coarse where an epoch is a few large steps, and even one step can carry the
AUC well past the target (the demo's fell 0.83, 0.73, 0.66, 0.60 over the 4 steps of one epoch,
target 0.645). So with ``keep_closer`` the model ends with the weights of whichever of the last
two checks is closer to the target (each check above it keeps a host copy of this rank's
trainable weights). The checks sit at fixed steps, so a run resumed from a checkpoint measures
the same weights again before its next step and takes the same decision; only a run resumed
between its last check above the target and the crossing has no copy to go back to, and keeps
the crossing's weights.

Under data parallelism every rank scores every ``world``-th batch and the scores are gathered, so
each rank reaches the same decision and all ranks run the same number of forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from unlearn.data.tokenize import IGNORE
from unlearn.eval import metrics
from unlearn.objectives import forward_logits, on_model_device

Batch = dict[str, torch.Tensor]
Gather = Callable[[list], list[list]]  # this rank's list -> every rank's list, in rank order


@torch.no_grad()
def min_k_scores(model: nn.Module, batch: Batch) -> list[float]:
    """Each sample's Min-k% score: the mean of its lowest 40% answer-token log-probs."""
    batch = on_model_device(model, batch)
    logits = forward_logits(model, batch)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logprobs = torch.log_softmax(logits, dim=-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(-1)
    return [metrics.min_k_score(row[keep].tolist()) for row, keep in zip(logprobs, mask)]


def sharded_scores(model: nn.Module, batches: Sequence[Batch], *, rank: int = 0, world: int = 1,
                   gather: Gather | None = None) -> list[float]:
    """Min-k scores of every sample of ``batches`` in order; rank r scores batches r, r+N, ...

    Every rank runs ceil(len/N) forward passes (the last ones repeat batch 0 and are dropped):
    an FSDP forward is a collective, so no rank may skip one.
    """
    if not batches:
        return []
    rounds = -(-len(batches) // world)
    mine: list[tuple[int, list[float]]] = []
    for index in range(rank, rounds * world, world):
        scores = min_k_scores(model, batches[index if index < len(batches) else 0])
        if index < len(batches):
            mine.append((index, scores))
    every = gather(mine) if gather is not None else [mine]
    ordered = sorted((item for part in every for item in part), key=lambda item: item[0])
    return [score for _, scores in ordered for score in scores]


@dataclass
class ForgetHoldoutStop:
    """The stopping rule: ``should_stop_before(model, step, steps_per_epoch)`` before each step."""

    forget: Sequence[Batch]
    holdout: Sequence[Batch]
    auc: float = 0.5
    min_epochs: int = 1
    checks_per_epoch: int = 1
    rank: int = 0
    world: int = 1
    gather: Gather | None = None
    keep_closer: bool = False
    history: list[tuple[float, float]] = field(default_factory=list)
    stopped_at: float | None = None  # the epochs done whose weights the model ends with
    _last_above: list[torch.Tensor] | None = field(default=None, repr=False)

    def measure(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            forget, holdout = (sharded_scores(model, batches, rank=self.rank, world=self.world,
                                              gather=self.gather) for batches in (self.forget, self.holdout))
            return metrics.mia_auc(forget, holdout)
        finally:
            model.train(was_training)

    def due(self, step: int, steps_per_epoch: int) -> float | None:
        """The epochs done (fractional inside an epoch) when the rule measures before ``step``
        (0-based: the steps done so far), else None."""
        offset = step % steps_per_epoch
        if offset not in {k * steps_per_epoch // self.checks_per_epoch for k in range(self.checks_per_epoch)}:
            return None
        done = round(step / steps_per_epoch, 3)
        return done if done >= self.min_epochs else None

    def should_stop_before(self, model: nn.Module, step: int, steps_per_epoch: int) -> bool:
        """:meth:`should_stop` where ``step`` is one of the check points, else False."""
        done = self.due(step, steps_per_epoch)
        return done is not None and self.should_stop(model, done)

    def should_stop(self, model: nn.Module, epoch: float) -> bool:
        """Measure (from ``min_epochs`` on) and record the AUC; True once it is at most ``auc``."""
        if epoch < self.min_epochs:
            return False
        value = self.measure(model)
        self.history.append((epoch, value))
        if value > self.auc:
            if self.keep_closer:
                self._last_above = _snapshot(model)
            return False
        self.stopped_at = epoch
        if self._last_above is not None and len(self.history) > 1:
            before, above = self.history[-2]
            if above - self.auc < self.auc - value:
                _restore(model, self._last_above)
                self.stopped_at = before
        self._last_above = None
        return True


def _local(param: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of an FSDP2 parameter (a DTensor), else the parameter itself. Under
    no_grad, ``to_local`` returns the shard's storage, so copying into it changes the parameter."""
    return param.to_local() if isinstance(param, DTensor) else param


@torch.no_grad()
def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    """This rank's trainable weights, copied to host memory (one shard's worth under FSDP2)."""
    return [_local(p).detach().to("cpu", copy=True) for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def _restore(model: nn.Module, saved: list[torch.Tensor]) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param, value in zip(trainable, saved, strict=True):
        _local(param).copy_(value)
