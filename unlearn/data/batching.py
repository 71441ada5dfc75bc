"""Batch composition: length bucketing, so batches carry little padding.

Sorting the whole set by length would make every epoch see the same batches in the same order;
instead the (shuffled) order is cut into windows of ``window`` batches, each window is sorted by
length and cut into batches, and the batches are shuffled again. Padding then only separates
samples of similar length, while the epoch's order stays random.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def batch_indices(lengths: Sequence[int], batch_size: int, *, shuffle: bool = False, seed: int = 0,
                  bucket: bool = True, window: int = 32) -> list[list[int]]:
    """Index lists, one per batch, covering every sample exactly once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if not bucket:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    span = batch_size * max(1, window)
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        block = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions in ``batches`` (right padding to each batch's longest)."""
    total = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches if batch)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1.0 - real / total if total else 0.0
