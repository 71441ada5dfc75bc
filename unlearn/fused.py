"""Fused, chunked losses: from final hidden states and the LM head, never the full logits.

For a large vocabulary the logits ``[B, T, V]`` dominate unlearning memory (SmolLM2, V = 49,152:
batch 8 x 256 tokens is 400 MB in fp32, twice that with its gradient, again for a reference
model). Every loss here needs a few numbers per SUPERVISED position only, so these versions

1. gather the hidden states of the supervised positions (after the label shift) -> ``[N, H]``;
2. compute logits ``h @ W.T`` for ``chunk_size`` rows at a time, apply the same per-row kernel as
   the plain loss (``unlearn.losses.row_*``), and keep only the per-row values ``[N]``;
3. in backward, recompute each chunk's logits with grad enabled and back-propagate the chunk
   (a custom autograd function), so peak extra memory is ``O(chunk_size x V)``, not ``O(B T V)``.
   PDU's plain margin needs no recompute at all: its gradient has a closed form in the argmax
   row and the mean head row (``_MarginHead``).

Prompt and padding positions never get logits at all. Values and gradients equal the plain
losses applied to ``logits = hidden @ weight.T`` (tests: 1e-5 relative in fp32). Reference
models enter as their own ``(ref_hidden, ref_weight)``; their logits are made per chunk under
``no_grad`` and never stored whole. The head has no bias (as in Llama-style models).

Callers get ``hidden`` from the decoder (``model.get_decoder()(...).last_hidden_state``) and
``weight = model.get_output_embeddings().weight``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearn import losses
from unlearn.losses import IGNORE_INDEX

Kernel = Callable[[Tensor, Tensor, Tensor | None], Tensor]
DEFAULT_CHUNK = 1024


class _ChunkedHead(torch.autograd.Function):
    """Per-row values ``kernel(h_c @ W.T, targets_c, ref_c)`` over chunks of rows."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, kernel, chunk_size):
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, targets)
        ctx.kernel, ctx.chunk_size = kernel, chunk_size
        ctx.autocast = _autocast_state(hidden.device.type)
        with torch.no_grad():
            values = [
                kernel(_logits(hidden[s:e], weight), targets[s:e], _ref(ref_hidden, ref_weight, s, e))
                for s, e in _chunks(hidden.shape[0], chunk_size)
            ]
        return torch.cat(values) if values else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_values):
        hidden, weight, ref_hidden, ref_weight, targets = ctx.saved_tensors
        # The first chunk's weight gradient is the accumulator: a zero-filled [V, H] buffer would
        # cost a full write of the head (and, on CPU, its page faults) per call.
        grad_rows, grad_weight = [], None
        head = weight.detach().requires_grad_(True)
        for s, e in _chunks(hidden.shape[0], ctx.chunk_size):
            rows = hidden[s:e].detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):  # the recompute as forward ran
                values = ctx.kernel(_logits(rows, head), targets[s:e],
                                    _ref(ref_hidden, ref_weight, s, e))
                d_rows, d_head = torch.autograd.grad(values, (rows, head), grad_values[s:e])
            grad_rows.append(d_rows)
            grad_weight = d_head.float() if grad_weight is None else grad_weight.add_(d_head)
        if grad_weight is None:
            return torch.zeros_like(hidden), torch.zeros_like(weight), None, None, None, None, None
        return torch.cat(grad_rows), grad_weight.to(weight.dtype), None, None, None, None, None


class _MarginHead(torch.autograd.Function):
    """PDU's ``(max_j z_j - mean_j z_j)^2`` per row, ``z = h W^T``, with a closed-form backward.

    The mean is linear in the hidden state (``mean_j z_j = h . w_bar``, ``w_bar`` the mean head
    row) and the gradient of the max only reaches the argmax row, so backward needs no logits:
    ``dh = 2 g m (W[argmax] - w_bar)``, ``dW = 2 g m h`` added to the argmax row minus its mean
    spread over every row. Forward makes the logits chunk by chunk only to find the max.
    """

    @staticmethod
    def forward(ctx, hidden, weight, chunk_size):
        w_bar = weight.float().mean(dim=0)
        maxima, argmax = [], []
        with torch.no_grad():
            for s, e in _chunks(hidden.shape[0], chunk_size):
                top = _logits(hidden[s:e], weight).max(dim=-1)
                maxima.append(top.values)
                argmax.append(top.indices)
        if not maxima:
            return hidden.new_zeros(0, dtype=torch.float32)
        margin = torch.cat(maxima) - hidden.float() @ w_bar
        ctx.save_for_backward(hidden, weight, torch.cat(argmax), margin, w_bar)
        return margin.pow(2)

    @staticmethod
    def backward(ctx, grad_values):
        hidden, weight, argmax, margin, w_bar = ctx.saved_tensors
        coef = (2.0 * grad_values * margin).unsqueeze(-1)
        grad_hidden = coef * (weight[argmax].float() - w_bar)
        weighted = coef * hidden.float()
        # Every row gets minus the mean spread, written in one pass, then the argmax rows their part.
        spread = (weighted.sum(dim=0) / -weight.shape[0]).expand(weight.shape)
        grad_weight = spread.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
        grad_weight.index_add_(0, argmax, weighted)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _autocast_state(device_type: str) -> dict:
    """The autocast a forward ran under, for its backward's recompute (``torch.autocast`` kwargs)."""
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def _logits(rows: Tensor, weight: Tensor) -> Tensor:
    return (rows @ weight.t()).float()


def _ref(ref_hidden: Tensor | None, ref_weight: Tensor | None, s: int, e: int) -> Tensor | None:
    if ref_hidden is None:
        return None
    with torch.no_grad():
        return _logits(ref_hidden[s:e], ref_weight)


class _Rows:
    """The supervised positions of a batch (after the shift), as in ``losses._Selection``."""

    def __init__(self, hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str,
                 extra_mask: Tensor | None = None, allow_empty: bool = False):
        losses._check_reduction(reduction)
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
            raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)} vs labels "
                             f"{tuple(labels.shape)} (expected hidden [B, T, H], labels [B, T])")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
        shifted = labels[:, 1:]
        mask = shifted != IGNORE_INDEX
        if reduction == "mean" and not allow_empty and not bool(mask.any()):
            raise ValueError("no supervised token in the batch (every shifted label is -100): "
                             "the mean over supervised positions is undefined")
        if extra_mask is not None:
            if tuple(extra_mask.shape) != tuple(labels.shape):
                raise ValueError(f"shape mismatch: mask {tuple(extra_mask.shape)} vs labels "
                                 f"{tuple(labels.shape)}")
            mask = mask & (extra_mask[:, 1:] != 0)
        self.batch_size = labels.shape[0]
        self.b_idx, self.t_idx = mask.nonzero(as_tuple=True)
        self.targets = shifted[self.b_idx, self.t_idx].long()
        self.hidden, self.weight = hidden, weight

    @property
    def n(self) -> int:
        return int(self.b_idx.numel())

    def gather(self, hidden: Tensor) -> Tensor:
        return hidden[:, :-1][self.b_idx, self.t_idx]

    def values(self, kernel: Kernel, chunk_size: int, ref_hidden: Tensor | None = None,
               ref_weight: Tensor | None = None) -> Tensor:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        ref_rows = None if ref_hidden is None else self.gather(ref_hidden).detach()
        ref_w = None if ref_weight is None else ref_weight.detach()
        return _ChunkedHead.apply(self.gather(self.hidden), self.weight, ref_rows, ref_w,
                                  self.targets, kernel, chunk_size)

    def margins(self, chunk_size: int) -> Tensor:
        """Per-row squared logit margin (PDU, ``top_k=None``) without logits in backward."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return _MarginHead.apply(self.gather(self.hidden), self.weight, chunk_size)

    def reduce(self, per_token: Tensor, reduction: str) -> Tensor:
        if self.n == 0:  # a zero that keeps a (zero) gradient path, never NaN
            zero = self.hidden[:, :0].sum() * 0.0 + self.weight[:0].sum() * 0.0
            return zero.float() if reduction == "mean" else zero.float().expand(self.batch_size)
        return losses.reduce_rows(per_token, self.b_idx, self.batch_size, reduction)

    def per_sample_sum(self, per_token: Tensor) -> tuple[Tensor, Tensor]:
        sums = per_token.new_zeros(self.batch_size).index_add(0, self.b_idx, per_token)
        return sums, torch.bincount(self.b_idx, minlength=self.batch_size)


def _need_ref(ref_hidden, ref_weight, hidden: Tensor) -> None:
    if ref_hidden is None or ref_weight is None:
        raise ValueError("ref_hidden and ref_weight are required for this loss")
    if tuple(ref_hidden.shape[:2]) != tuple(hidden.shape[:2]):
        raise ValueError(f"shape mismatch: ref_hidden {tuple(ref_hidden.shape)} vs hidden "
                         f"{tuple(hidden.shape)}")


def _top_k(top_k: int | None, weight: Tensor) -> int | None:
    return None if top_k is None else losses._check_top_k(top_k, weight.shape[0])


# --------------------------------------------------------------------------- token losses


def fused_nll(hidden, weight, labels, reduction="mean", chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.nll`` from hidden states: ``mean_{t in A} -log softmax(h_t W^T)[y_t]``."""
    rows = _Rows(hidden, weight, labels, reduction)
    return rows.reduce(rows.values(losses.row_nll, chunk_size), reduction)


def fused_sequence_logprob(hidden, weight, labels, chunk_size=DEFAULT_CHUNK):
    """``losses.sequence_logprob``: ``(sum of log p(y_t) per sequence [B], token count [B])``."""
    rows = _Rows(hidden, weight, labels, "per_sample")
    return rows.per_sample_sum(-rows.values(losses.row_nll, chunk_size))


def fused_logit_margin_flattening(hidden, weight, labels, top_k=None, ref_hidden=None,
                                  ref_weight=None, reduction="mean",
                                  chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.logit_margin_flattening`` (PDU); top-k indices from the reference when given."""
    rows = _Rows(hidden, weight, labels, reduction)
    k = _top_k(top_k, weight)
    if k is None:
        return rows.reduce(rows.margins(chunk_size), reduction)
    use_ref = ref_hidden is not None
    if use_ref:
        _need_ref(ref_hidden, ref_weight, hidden)

    def kernel(z, y, ref):
        return losses.row_margin(z, y, ref, top_k=k)

    per_token = rows.values(kernel, chunk_size, ref_hidden if use_ref else None,
                            ref_weight if use_ref else None)
    return rows.reduce(per_token, reduction)


def fused_unilogit(hidden, weight, labels, reduction="mean", chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.unilogit``: KL to the self-target with the gold probability 1/V."""
    rows = _Rows(hidden, weight, labels, reduction)
    return rows.reduce(rows.values(losses.row_unilogit, chunk_size), reduction)


def fused_max_entropy(hidden, weight, labels, reduction="mean", chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.max_entropy``: ``logsumexp(z) - mean(z) - log V`` per supervised position."""
    rows = _Rows(hidden, weight, labels, reduction)
    return rows.reduce(rows.values(losses.row_max_entropy, chunk_size), reduction)


def fused_undial(hidden, weight, labels, ref_hidden, ref_weight, beta=10.0, reduction="mean",
                 chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.undial``: CE to ``softmax(z_ref - beta onehot(y))``."""
    _need_ref(ref_hidden, ref_weight, hidden)
    rows = _Rows(hidden, weight, labels, reduction)

    def kernel(z, y, ref):
        return losses.row_undial(z, y, ref, beta=beta)

    return rows.reduce(rows.values(kernel, chunk_size, ref_hidden, ref_weight), reduction)


def fused_kl_to_ref(hidden, weight, labels, ref_hidden, ref_weight, mask=None, reduction="mean",
                    chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.kl_to_ref``: ``KL(p_theta || p_ref)`` on supervised (and masked) positions."""
    _need_ref(ref_hidden, ref_weight, hidden)
    rows = _Rows(hidden, weight, labels, reduction, extra_mask=mask)
    return rows.reduce(rows.values(losses.row_kl, chunk_size, ref_hidden, ref_weight), reduction)


def fused_palu_local(hidden, weight, labels, onset_mask, ref_hidden, ref_weight, top_k,
                     reduction="mean", chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.palu_local``: reference top-k flattening at span onsets; 0 without onsets."""
    _need_ref(ref_hidden, ref_weight, hidden)
    k = _top_k(top_k, weight)
    rows = _Rows(hidden, weight, labels, reduction, extra_mask=onset_mask, allow_empty=True)

    def kernel(z, y, ref):
        return losses.row_margin(z, y, ref, top_k=k)

    return rows.reduce(rows.values(kernel, chunk_size, ref_hidden, ref_weight), reduction)


# --------------------------------------------------------------------------- sequence losses


def _sequence_terms(hidden, weight, labels, reduction, chunk_size):
    losses._check_reduction(reduction)
    logp, count = fused_sequence_logprob(hidden, weight, labels, chunk_size)
    if reduction == "mean" and int(count.sum()) == 0:
        raise ValueError("no supervised token in the batch (every shifted label is -100)")
    return logp, count


def fused_npo(hidden, weight, labels, ref_hidden, ref_weight, beta=0.1, reduction="mean",
              chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.npo`` with sequence-sum log-probs from the chunked head."""
    _need_ref(ref_hidden, ref_weight, hidden)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logp, count = _sequence_terms(hidden, weight, labels, reduction, chunk_size)
    with torch.no_grad():
        ref_logp, _ = fused_sequence_logprob(ref_hidden.detach(), ref_weight.detach(), labels,
                                             chunk_size)
    per_sample = -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp))
    return losses._sequence_reduce(per_sample, count, reduction)


def fused_simnpo(hidden, weight, labels, beta=4.5, delta=0.0, reduction="mean",
                 chunk_size=DEFAULT_CHUNK) -> Tensor:
    """``losses.simnpo``: ``-(2/beta) log sigmoid(beta (NLLsum/|y| - delta))``."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logp, count = _sequence_terms(hidden, weight, labels, reduction, chunk_size)
    mean_nll = -logp / count.clamp(min=1).to(logp.dtype)
    per_sample = -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta))
    return losses._sequence_reduce(per_sample, count, reduction)
