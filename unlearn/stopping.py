"""Stop unlearning once the forget set looks like data the model never saw.

A forget objective has no resting point at "never seen": it either stalls above it or goes on
until the forget facts are less likely than unseen ones. Where that level lies differs from one
data set and seed to the next (the demo's three seeds crossed it after 9, 13 and ~22 epochs, and
then over-forgot down to privleak -67). So the loop measures it instead of guessing it.

At the start of each epoch from ``min_epochs`` on, the forget set and a split of never-seen
records of the same kind (``stop.split``: TOFU-like authors that are neither in training nor in
the evaluation's holdout) are scored with the Min-k% membership attack that the evaluation's
privleak uses (mean of the lowest 40% answer-token log-probs):

    AUC = P( score(forget sample) > score(never-seen sample) )      (ties count 1/2)

and training stops when ``AUC <= stop.auc`` (0.5: the attack cannot tell them apart). The
epoch-level check makes a resumed run take the same decision: a run resumed at an epoch boundary
measures the same weights again before its next step.

Under data parallelism every rank scores every ``world``-th batch and the scores are gathered, so
each rank reaches the same decision and all ranks run the same number of forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from unlearn.data.tokenize import IGNORE
from unlearn.eval import metrics
from unlearn.objectives import forward_logits

Batch = dict[str, torch.Tensor]
Gather = Callable[[list], list[list]]  # this rank's list -> every rank's list, in rank order


@torch.no_grad()
def min_k_scores(model: nn.Module, batch: Batch) -> list[float]:
    """Each sample's Min-k% score: the mean of its lowest 40% answer-token log-probs."""
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
    """The stopping rule: ``should_stop(model, epoch)`` at the start of each epoch."""

    forget: Sequence[Batch]
    holdout: Sequence[Batch]
    auc: float = 0.5
    min_epochs: int = 1
    rank: int = 0
    world: int = 1
    gather: Gather | None = None
    history: list[tuple[int, float]] = field(default_factory=list)

    def measure(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        try:
            forget, holdout = (sharded_scores(model, batches, rank=self.rank, world=self.world,
                                              gather=self.gather) for batches in (self.forget, self.holdout))
            return metrics.mia_auc(forget, holdout)
        finally:
            model.train(was_training)

    def should_stop(self, model: nn.Module, epoch: int) -> bool:
        """Measure (from ``min_epochs`` on) and record the AUC; True once it is at most ``auc``."""
        if epoch < self.min_epochs:
            return False
        value = self.measure(model)
        self.history.append((epoch, value))
        return value <= self.auc
