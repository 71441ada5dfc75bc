"""Loss dispatch on a model output: plain losses on logits, or fused chunked losses on hidden
states + LM head (``unlearn.fused``). Objectives call these, so one objective serves both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from unlearn import fused, losses


@dataclass
class HeadOutput:
    """A forward pass: either ``logits`` (plain) or ``hidden`` + head ``weight`` (fused)."""

    logits: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    chunk_size: int = fused.DEFAULT_CHUNK

    @property
    def fused(self) -> bool:
        return self.logits is None


def vocab_size(out: HeadOutput) -> int:
    return out.weight.shape[0] if out.fused else out.logits.shape[-1]


def _ref_args(ref: HeadOutput | None):
    return (None, None) if ref is None else (ref.hidden, ref.weight)


def nll(out: HeadOutput, labels: Tensor, reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_nll(out.hidden, out.weight, labels, reduction, out.chunk_size)
    return losses.nll(out.logits, labels, reduction)


def margin(out: HeadOutput, labels: Tensor, top_k: int | None = None, ref: HeadOutput | None = None,
           reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_logit_margin_flattening(out.hidden, out.weight, labels, top_k,
                                                   *_ref_args(ref), reduction, out.chunk_size)
    return losses.logit_margin_flattening(out.logits, labels, top_k,
                                          None if ref is None else ref.logits, reduction)


def unilogit(out: HeadOutput, labels: Tensor, reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_unilogit(out.hidden, out.weight, labels, reduction, out.chunk_size)
    return losses.unilogit(out.logits, labels, reduction)


def max_entropy(out: HeadOutput, labels: Tensor, reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_max_entropy(out.hidden, out.weight, labels, reduction, out.chunk_size)
    return losses.max_entropy(out.logits, labels, reduction)


def npo(out: HeadOutput, labels: Tensor, ref: HeadOutput, beta: float,
        reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_npo(out.hidden, out.weight, labels, *_ref_args(ref), beta, reduction,
                               out.chunk_size)
    return losses.npo(out.logits, labels, ref.logits, beta, reduction)


def simnpo(out: HeadOutput, labels: Tensor, beta: float, delta: float,
           reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_simnpo(out.hidden, out.weight, labels, beta, delta, reduction,
                                  out.chunk_size)
    return losses.simnpo(out.logits, labels, beta, delta, reduction)


def undial(out: HeadOutput, labels: Tensor, ref: HeadOutput, beta: float,
           reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_undial(out.hidden, out.weight, labels, *_ref_args(ref), beta, reduction,
                                  out.chunk_size)
    return losses.undial(out.logits, labels, ref.logits, beta, reduction)


def kl_to_ref(out: HeadOutput, labels: Tensor, ref: HeadOutput, mask: Tensor | None = None,
              reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_kl_to_ref(out.hidden, out.weight, labels, *_ref_args(ref), mask,
                                     reduction, out.chunk_size)
    return losses.kl_to_ref(out.logits, labels, ref.logits, mask, reduction)


def palu_local(out: HeadOutput, labels: Tensor, onset_mask: Tensor, ref: HeadOutput, top_k: int,
               reduction: str = "mean") -> Tensor:
    if out.fused:
        return fused.fused_palu_local(out.hidden, out.weight, labels, onset_mask, *_ref_args(ref),
                                      top_k, reduction, out.chunk_size)
    return losses.palu_local(out.logits, labels, onset_mask, ref.logits, top_k, reduction)
