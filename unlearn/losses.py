"""Token- and sequence-level losses for LLM unlearning (pure PyTorch).

Conventions (Hugging Face):

- ``logits [B, T, V]`` are UNshifted model outputs and ``labels [B, T]`` hold the gold token
  ids with ``-100`` on positions that carry no loss (prompt, padding). Every function shifts
  inside: ``logits[:, :-1]`` predict ``labels[:, 1:]``.
- ``A`` is the set of supervised positions after shifting (label != -100).
- ``reduction="mean"`` averages over ``A`` across the whole batch (token losses) or over the
  samples that have at least one supervised token (sequence losses: NPO, SimNPO).
  ``reduction="per_sample"`` returns a ``[B]`` tensor: each sample's mean over its own
  supervised tokens (token losses) or its sequence loss (sequence losses); a sample with no
  supervised token gives 0.
- Only the rows in ``A`` are gathered and upcast: computation runs in float32 (float64 inputs
  stay float64), so half-precision logits are safe and prompt/padding positions get exactly
  zero gradient.
- Reference logits (``ref_logits``) are always treated as constants (detached).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "per_sample")

__all__ = [
    "IGNORE_INDEX",
    "kl_to_ref",
    "logit_margin_flattening",
    "max_entropy",
    "nll",
    "npo",
    "palu_local",
    "sequence_logprob",
    "shift_logits_labels",
    "simnpo",
    "supervised_mask",
    "undial",
    "unilogit",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def shift_logits_labels(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align predictions with targets: ``(logits[:, :-1], labels[:, 1:])`` (views)."""
    _check_logits_labels(logits, labels)
    return logits[:, :-1], labels[:, 1:]


def supervised_mask(labels: Tensor) -> Tensor:
    """Boolean mask of positions that carry a loss (``labels != -100``), same shape as labels."""
    return labels != IGNORE_INDEX


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("logits and labels must be torch tensors")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    if tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)} vs labels {tuple(labels.shape)} "
            "(expected logits [B, T, V] and labels [B, T])"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def _check_ref(ref_logits: Tensor | None, logits: Tensor, required: bool = True) -> None:
    if ref_logits is None:
        if required:
            raise ValueError("ref_logits is required for this loss")
        return
    if not isinstance(ref_logits, Tensor):
        raise TypeError("ref_logits must be a torch tensor")
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"shape mismatch: ref_logits {tuple(ref_logits.shape)} vs logits {tuple(logits.shape)}"
        )


def _check_mask(mask: Tensor, labels: Tensor, name: str) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch tensor")
    if tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(
            f"shape mismatch: {name} {tuple(mask.shape)} vs labels {tuple(labels.shape)} "
            f"({name} must be aligned with labels, unshifted)"
        )


def _check_top_k(top_k, vocab: int) -> int:
    if isinstance(top_k, bool):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    try:
        top_k = operator.index(top_k)
    except TypeError:
        raise TypeError(f"top_k must be an int, got {top_k!r}") from None
    if top_k < 1 or top_k > vocab:
        raise ValueError(f"top_k must be in [1, V={vocab}], got {top_k}")
    return top_k


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Selection:
    """The positions a token loss is computed on, gathered from the shifted tensors."""

    def __init__(self, logits: Tensor, labels: Tensor, extra_mask: Tensor | None = None):
        shifted_labels = labels[:, 1:]
        sel = supervised_mask(shifted_labels)
        self.n_supervised = int(sel.sum())
        if extra_mask is not None:
            sel = sel & (extra_mask[:, 1:] != 0)
        self.batch_size = labels.shape[0]
        self.mask = sel
        self.b_idx, self.t_idx = sel.nonzero(as_tuple=True)
        self.targets = shifted_labels[self.b_idx, self.t_idx].long()
        vocab = logits.shape[-1]
        if self.targets.numel() and bool(((self.targets < 0) | (self.targets >= vocab)).any()):
            raise ValueError(f"labels must be -100 or token ids in [0, V={vocab})")
        self.dtype = _compute_dtype(logits)
        self.logits = logits

    @property
    def n(self) -> int:
        return int(self.b_idx.numel())

    def rows(self, x: Tensor) -> Tensor:
        """Selected rows ``[N, V]`` of a ``[B, T, V]`` tensor, upcast for computation."""
        return x[:, :-1][self.b_idx, self.t_idx].to(self.dtype)

    def zero(self, reduction: str) -> Tensor:
        """A zero result that keeps a (zero) gradient path to ``logits``; never NaN."""
        z = self.logits[:, :0].to(self.dtype)  # [B, 0, V]: sums to exactly 0
        return z.sum() if reduction == "mean" else z.sum(dim=(1, 2))

    def reduce(self, per_token: Tensor, reduction: str) -> Tensor:
        return reduce_rows(per_token, self.b_idx, self.batch_size, reduction)


def reduce_rows(per_token: Tensor, sample_of_row: Tensor, batch_size: int, reduction: str) -> Tensor:
    """Mean over all rows, or each sample's mean over its own rows (``[B]``, 0 if it has none)."""
    if reduction == "mean":
        return per_token.sum() / per_token.numel()
    sums = per_token.new_zeros(batch_size).index_add(0, sample_of_row, per_token)
    counts = torch.bincount(sample_of_row, minlength=batch_size).to(per_token.dtype)
    return sums / counts.clamp(min=1)


def _select(
    logits: Tensor,
    labels: Tensor,
    reduction: str,
    extra_mask: Tensor | None = None,
) -> _Selection:
    _check_reduction(reduction)
    _check_logits_labels(logits, labels)
    sel = _Selection(logits, labels, extra_mask)
    if reduction == "mean" and sel.n_supervised == 0:
        raise ValueError(
            "no supervised token in the batch (every shifted label is -100): "
            "the mean over supervised positions is undefined"
        )
    return sel


def _token_nll(rows: Tensor, targets: Tensor) -> Tensor:
    """``-log softmax(rows)[target]`` per row, ``[N]``."""
    return F.cross_entropy(rows, targets, reduction="none")


def _topk_margin(rows: Tensor, index_source: Tensor, top_k: int) -> Tensor:
    """``(1/k) sum_{i in TopK(index_source)} (z_i - mean_j z_j)^2`` per row, ``[N]``."""
    idx = index_source.detach().topk(top_k, dim=-1).indices
    rows = _pivot(rows)
    centred = rows.gather(-1, idx) - rows.mean(dim=-1, keepdim=True)
    return centred.pow(2).mean(dim=-1)


def _pivot(rows: Tensor) -> Tensor:
    """Subtract each row's detached max: value- and gradient-neutral for centred quantities,
    better conditioned, and exactly 0 on constant rows (no rounding residue from the mean)."""
    return rows - rows.detach().max(dim=-1, keepdim=True).values


# --------------------------------------------------------------------------------------------
# per-row kernels: ``rows [N, V]`` (selected logits), ``targets [N]``, ``ref [N, V]`` or None.
# The plain losses below and the chunked ones in ``unlearn.fused`` share them.
# --------------------------------------------------------------------------------------------


def row_nll(rows: Tensor, targets: Tensor, ref: Tensor | None = None) -> Tensor:
    return _token_nll(rows, targets)


def row_margin(rows: Tensor, targets: Tensor, ref: Tensor | None = None, *,
               top_k: int | None = None) -> Tensor:
    """Squared logit margin (``top_k=None``) or mean squared top-k deviation from the row mean;
    top-k indices from ``ref`` when given, else from ``rows`` detached."""
    if top_k is None:
        centred = _pivot(rows)
        return (centred.max(dim=-1).values - centred.mean(dim=-1)).pow(2)
    return _topk_margin(rows, rows if ref is None else ref, top_k)


def row_unilogit(rows: Tensor, targets: Tensor, ref: Tensor | None = None) -> Tensor:
    log_q = _unilogit_log_target(rows, targets)
    log_p = F.log_softmax(rows, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def row_max_entropy(rows: Tensor, targets: Tensor, ref: Tensor | None = None) -> Tensor:
    return torch.logsumexp(rows, dim=-1) - rows.mean(dim=-1) - math.log(rows.shape[-1])


def row_undial(rows: Tensor, targets: Tensor, ref: Tensor, *, beta: float) -> Tensor:
    with torch.no_grad():
        tgt = targets.unsqueeze(-1)
        ref = ref.detach()
        teacher = F.softmax(ref.scatter(-1, tgt, ref.gather(-1, tgt) - beta), dim=-1)
    return -(teacher * F.log_softmax(rows, dim=-1)).sum(dim=-1)


def row_kl(rows: Tensor, targets: Tensor, ref: Tensor) -> Tensor:
    log_p = F.log_softmax(rows, dim=-1)
    with torch.no_grad():
        log_ref = F.log_softmax(ref.detach(), dim=-1)
    return (log_p.exp() * (log_p - log_ref)).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def nll(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Token cross-entropy: ``NLL = mean_{t in A} -log softmax(z_t)[y_t]``."""
    sel = _select(logits, labels, reduction)
    return sel.reduce(row_nll(sel.rows(logits), sel.targets), reduction)


def sequence_logprob(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence log-likelihood of the supervised tokens.

    Returns ``(logp [B], count [B])`` with ``logp_b = sum_{t in A_b} log softmax(z_t)[y_t]``
    (``= -NLLsum_b``; 0 for a sample without supervised tokens) and ``count_b = |A_b|``
    (int64). ``logp`` is float32 (float64 for float64 logits).
    """
    _check_logits_labels(logits, labels)
    sel = _Selection(logits, labels)
    token_logp = -_token_nll(sel.rows(logits), sel.targets)
    logp = token_logp.new_zeros(sel.batch_size).index_add(0, sel.b_idx, token_logp)
    count = torch.bincount(sel.b_idx, minlength=sel.batch_size)
    return logp, count


def logit_margin_flattening(
    logits: Tensor,
    labels: Tensor,
    top_k: int | None = None,
    ref_logits: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """PDU's softmax-free flattening loss.

    ``top_k=None``:  ``L = mean_{t in A} (max_k z_{t,k} - (1/V) sum_k z_{t,k})^2``
    (gradient per position ``2 (max - mean) (e_argmax - 1/V)``, divided by ``|A|``).

    ``top_k=k``:  ``L = mean_{t in A} (1/k) sum_{i in TopK_t} (z_{t,i} - (1/V) sum_j z_{t,j})^2``
    with ``TopK_t`` the indices of the k largest entries of ``ref_logits[t]`` when given,
    else of the current logits detached (the index choice carries no gradient, the values
    do). ``top_k=1`` without ``ref_logits`` equals ``top_k=None``. ``ref_logits`` is ignored
    when ``top_k`` is None.
    """
    sel = _select(logits, labels, reduction)
    _check_ref(ref_logits, logits, required=False)
    k = None if top_k is None else _check_top_k(top_k, logits.shape[-1])
    ref = None if (k is None or ref_logits is None) else sel.rows(ref_logits)
    return sel.reduce(row_margin(sel.rows(logits), sel.targets, ref, top_k=k), reduction)


def _unilogit_log_target(rows: Tensor, targets: Tensor) -> Tensor:
    """log q for Unilogit, from detached logits ``rows [N, V]`` and gold ids ``targets [N]``.

    ``zt_i = z_i (i != y)``, ``zt_y = logsumexp_{i != y} z_i - log(V - 1)``, ``q = softmax(zt)``,
    so that ``q_y = 1/V`` and ``q_i / q_j = p_i / p_j`` for ``i, j != y``.
    """
    z = rows.detach()
    vocab = z.shape[-1]
    tgt = targets.unsqueeze(-1)
    others = z.scatter(-1, tgt, float("-inf"))
    gold = torch.logsumexp(others, dim=-1, keepdim=True) - math.log(vocab - 1)
    return F.log_softmax(z.scatter(-1, tgt, gold), dim=-1)


def unilogit(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Unilogit self-distillation towards a target with the gold probability set to 1/V.

    Target from the current logits, detached: ``zt_i = z_i (i != y)``,
    ``zt_y = logsumexp_{i != y} z_i - log(V - 1)``, ``q = softmax(zt)`` (``q_y = 1/V``).

    ``L = mean_{t in A} KL(p_theta(.|t) || q_t) = mean_{t in A} sum_i p_i (log p_i - log q_i)``:
    SUM over the vocabulary, MEAN over tokens.
    """
    sel = _select(logits, labels, reduction)
    if logits.shape[-1] < 2:
        raise ValueError("unilogit needs a vocabulary of at least 2 tokens")
    return sel.reduce(row_unilogit(sel.rows(logits), sel.targets), reduction)


def _sequence_reduce(per_sample: Tensor, count: Tensor, reduction: str) -> Tensor:
    has_tokens = count > 0
    per_sample = torch.where(has_tokens, per_sample, torch.zeros_like(per_sample))
    if reduction == "per_sample":
        return per_sample
    return per_sample.sum() / has_tokens.sum().to(per_sample.dtype)


def npo(
    logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor,
    beta: float = 0.1,
    reduction: str = "mean",
) -> Tensor:
    """Negative Preference Optimisation.

    ``L = -(2/beta) mean_i log sigmoid(-beta (log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i)))``
    with sequence-SUM log-probabilities over the supervised tokens. Equals
    ``(2/beta) log 2`` when ``ref_logits == logits``. The mean runs over samples with at least
    one supervised token; ``per_sample`` gives the ``[B]`` terms (0 for empty samples).
    """
    _check_reduction(reduction)
    _check_logits_labels(logits, labels)
    _check_ref(ref_logits, logits)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logp, count = sequence_logprob(logits, labels)
    if reduction == "mean" and int(count.sum()) == 0:
        raise ValueError("no supervised token in the batch (every shifted label is -100)")
    with torch.no_grad():
        ref_logp, _ = sequence_logprob(ref_logits.detach(), labels)
    ref_logp = ref_logp.to(logp.dtype)
    per_sample = -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp))
    return _sequence_reduce(per_sample, count, reduction)


def simnpo(
    logits: Tensor,
    labels: Tensor,
    beta: float = 4.5,
    delta: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """SimNPO (reference-free, length-normalised NPO).

    ``L = -(2/beta) mean_i log sigmoid(beta (NLLsum_i / |y_i| - delta))`` where ``NLLsum_i`` is
    the summed token NLL of sample i over its ``|y_i|`` supervised tokens. Minimising it
    raises the average NLL (the loss decreases monotonically in it). The mean runs over
    samples with at least one supervised token; ``per_sample`` gives 0 for empty samples.
    """
    _check_reduction(reduction)
    _check_logits_labels(logits, labels)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logp, count = sequence_logprob(logits, labels)
    if reduction == "mean" and int(count.sum()) == 0:
        raise ValueError("no supervised token in the batch (every shifted label is -100)")
    mean_nll = -logp / count.clamp(min=1).to(logp.dtype)
    per_sample = -(2.0 / beta) * F.logsigmoid(beta * (mean_nll - delta))
    return _sequence_reduce(per_sample, count, reduction)


def max_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Maximum-entropy forget loss.

    ``L = mean_{t in A} KL(U || softmax(z_t)) = mean_{t in A} (logsumexp(z_t) - mean(z_t) - log V)``;
    0 exactly when every logit of a row is equal.
    """
    sel = _select(logits, labels, reduction)
    return sel.reduce(row_max_entropy(sel.rows(logits), sel.targets), reduction)


def undial(
    logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor,
    beta: float = 10.0,
    reduction: str = "mean",
) -> Tensor:
    """UNDIAL: self-distillation towards the reference with the gold logit pushed down.

    ``teacher_t = softmax(z_ref,t - beta * onehot(y_t))`` (detached) and
    ``L = mean_{t in A} CE(z_t, teacher_t) = mean_{t in A} -sum_i teacher_{t,i} log softmax(z_t)_i``.
    Only supervised positions enter (no indexing with -100, no averaging over padding).
    """
    sel = _select(logits, labels, reduction)
    _check_ref(ref_logits, logits)
    per_token = row_undial(sel.rows(logits), sel.targets, sel.rows(ref_logits), beta=beta)
    return sel.reduce(per_token, reduction)


def kl_to_ref(
    logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL to the frozen reference.

    ``L = mean_{t in S} KL(p_theta(.|t) || p_ref(.|t)) = mean_{t in S} sum_i p_i (log p_i - log p_ref,i)``
    with ``S`` the supervised positions, further restricted by ``mask [B, T]`` when given
    (aligned with labels, unshifted; shifted like labels; nonzero = keep). If the mask keeps
    no supervised position the result is 0 (with a zero gradient path); a batch with no
    supervised token at all is an error for ``reduction="mean"``.
    """
    _check_reduction(reduction)
    _check_logits_labels(logits, labels)
    _check_ref(ref_logits, logits)
    if mask is not None:
        _check_mask(mask, labels, "mask")
    sel = _select(logits, labels, reduction, extra_mask=mask)
    if sel.n == 0:
        return sel.zero(reduction)
    return sel.reduce(row_kl(sel.rows(logits), sel.targets, sel.rows(ref_logits)), reduction)


def palu_local(
    logits: Tensor,
    labels: Tensor,
    onset_mask: Tensor,
    ref_logits: Tensor,
    top_k: int,
    reduction: str = "mean",
) -> Tensor:
    """PALU local flattening over the reference model's top-k, at span onsets only.

    ``L = mean_{t in O} (1/k) sum_{i in TopK(z_ref,t)} (z_{t,i} - (1/V) sum_j z_{t,j})^2``
    where ``O`` = supervised positions whose (shifted) ``onset_mask`` is nonzero;
    ``onset_mask [B, T]`` is aligned with labels (1 on onset label tokens). 0, with a zero
    gradient path (never NaN), when there is no onset position -- including a batch with no
    supervised token at all.
    """
    _check_reduction(reduction)
    _check_logits_labels(logits, labels)
    _check_mask(onset_mask, labels, "onset_mask")
    _check_ref(ref_logits, logits)
    k = _check_top_k(top_k, logits.shape[-1])
    sel = _Selection(logits, labels, extra_mask=onset_mask)
    if sel.n == 0:
        return sel.zero(reduction)
    per_token = row_margin(sel.rows(logits), sel.targets, sel.rows(ref_logits), top_k=k)
    return sel.reduce(per_token, reduction)
