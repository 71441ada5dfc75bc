"""The objective interface shared by every unlearning method.

An objective turns one forget batch and one retain batch into a scalar loss:
``loss = gamma * L_forget + alpha * L_retain`` unless the method says otherwise (PDU replaces
``alpha`` by the dual variable). Forward passes live here, in one place, so that every method
sees the same masking and the same reference-model handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unlearn.fused import DEFAULT_CHUNK
from unlearn.objectives import ops
from unlearn.objectives.ops import HeadOutput

Batch = dict[str, Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask")


@dataclass
class StepInputs:
    """What an objective may look at in one micro-step."""

    model: nn.Module
    forget: Batch
    retain: Batch | None
    ref_model: nn.Module | None = None
    dual: Any = None  # unlearn.dual.DualController for constrained methods
    extra: dict[str, Any] = field(default_factory=dict)
    fused: bool = False  # fused chunked losses (never the full logits) instead of plain ones
    chunk_size: int = DEFAULT_CHUNK


@dataclass
class ObjectiveOutput:
    loss: Tensor
    forget_loss: Tensor
    retain_loss: Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ForgetForward:
    out: HeadOutput
    ref: HeadOutput | None


def on_model_device(model: nn.Module, batch: Batch) -> Batch:
    """``batch`` on the device of ``model``'s weights (batches are built on the host)."""
    device = next(model.parameters()).device
    if all(value.device == device for value in batch.values()):
        return batch
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def forward_logits(model: nn.Module, batch: Batch, *, hidden: bool = False):
    """Logits ``[B,T,V]`` (and the hidden states of every layer when ``hidden``) of ``batch``."""
    out = model(**{k: batch[k] for k in MODEL_INPUTS}, output_hidden_states=hidden, use_cache=False)
    return (out.logits, out.hidden_states) if hidden else out.logits


def forward_output(model: nn.Module, batch: Batch, *, fused: bool = False, hidden: bool = False,
                   chunk_size: int = DEFAULT_CHUNK) -> HeadOutput:
    """A forward pass for the losses: logits (plain), or the decoder's final hidden state and
    the LM head weight (fused: the head is applied chunk by chunk inside the loss)."""
    if not fused:
        out = forward_logits(model, batch, hidden=hidden)
        logits, states = out if hidden else (out, None)
        return HeadOutput(logits=logits, hidden_states=states)
    # Through the root forward (so FSDP2's root hooks gather the embeddings, final norm and head)
    # with logits for one position only; the last hidden state is the decoder's normed output.
    out = model(**{k: batch[k] for k in MODEL_INPUTS}, output_hidden_states=True, logits_to_keep=1,
                use_cache=False)
    return HeadOutput(hidden=out.hidden_states[-1], weight=model.get_output_embeddings().weight,
                      hidden_states=out.hidden_states if hidden else None, chunk_size=chunk_size)


@torch.no_grad()
def reference_output(inputs: StepInputs, batch: Batch) -> HeadOutput:
    if inputs.ref_model is None:
        raise ValueError("this objective needs a frozen reference model (ref_model is None)")
    return forward_output(inputs.ref_model, batch, fused=inputs.fused, chunk_size=inputs.chunk_size)


def model_output(inputs: StepInputs, batch: Batch, hidden: bool = False) -> HeadOutput:
    return forward_output(inputs.model, batch, fused=inputs.fused, hidden=hidden,
                          chunk_size=inputs.chunk_size)


class Objective:
    """Base class: subclasses set ``name``, ``description``, ``defaults`` and ``forget_loss``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll"}
    uses_dual: ClassVar[bool] = False
    needs_spans: ClassVar[bool] = False
    # What the forget loss's "mean" reduction averages over: "tokens" (supervised tokens of the
    # batch) or "samples" (sequence losses); the step uses it to weigh ranks in a distributed run.
    forget_mean_over: ClassVar[str | None] = "tokens"

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"method {self.name!r}: unknown parameter(s) {unknown}; "
                f"it takes {sorted(self.defaults)}"
            )
        merged = {**self.defaults, **{k: v for k, v in params.items() if v is not None}}
        if "retain_loss" in merged and merged["retain_loss"] not in ("nll", "kl"):
            raise ValueError(
                f"method {self.name!r}: retain_loss must be 'nll' or 'kl', got {merged['retain_loss']!r}"
            )
        for key in ("gamma", "alpha"):
            if key in merged and float(merged[key]) < 0:
                raise ValueError(f"method {self.name!r}: {key} must be >= 0, got {merged[key]}")
        self.params = merged

    # ------------------------------------------------------------------ hooks for subclasses

    @property
    def needs_ref(self) -> bool:
        """Whether a frozen reference copy of the starting model must be kept."""
        return self.params.get("retain_loss") == "kl" or self.forget_needs_ref()

    def forget_loss(self, out: HeadOutput, batch: Batch, ref: HeadOutput | None,
                    reduction: str = "mean") -> Tensor:
        raise NotImplementedError

    def prefix_tokens(self) -> int | None:
        """Onset length for span-localised methods (forget batches then carry onset masks)."""
        return int(self.params["prefix_tokens"]) if self.needs_spans else None

    def forget_needs_ref(self) -> bool:
        """Whether ``forget_loss`` reads the reference model's logits on the forget batch."""
        return False

    # ------------------------------------------------------------------ shared computation

    def forward_forget(self, inputs: StepInputs, hidden: bool = False) -> ForgetForward:
        """The model's (and, when the loss needs it, the reference's) pass on the forget batch."""
        out = model_output(inputs, inputs.forget, hidden=hidden)
        ref = reference_output(inputs, inputs.forget) if self.forget_needs_ref() else None
        return ForgetForward(out, ref)

    def forget_term(self, inputs: StepInputs, reduction: str = "mean", hidden: bool = False):
        """``(L_f, ForgetForward)`` on the forget batch."""
        fwd = self.forward_forget(inputs, hidden=hidden)
        return self.forget_loss(fwd.out, inputs.forget, fwd.ref, reduction), fwd

    def retain_term(self, inputs: StepInputs) -> Tensor:
        """Retain NLL, or ``KL(p_theta || p_ref)`` on the retain batch."""
        if inputs.retain is None:
            raise ValueError(f"method {self.name!r} needs a retain batch")
        out = model_output(inputs, inputs.retain)
        if self.params["retain_loss"] == "kl":
            return ops.kl_to_ref(out, inputs.retain["labels"], reference_output(inputs, inputs.retain))
        return ops.nll(out, inputs.retain["labels"])

    def wants_retain(self) -> bool:
        return self.uses_dual or float(self.params.get("alpha", 0.0)) > 0

    def combine(self, forget_loss: Tensor, retain_loss: Tensor | None, inputs: StepInputs,
                extra_terms: Tensor | None = None) -> ObjectiveOutput:
        """``gamma * L_f + alpha * L_r`` (+ any method-specific terms)."""
        loss = float(self.params["gamma"]) * forget_loss
        if retain_loss is not None:
            loss = loss + float(self.params["alpha"]) * retain_loss
        if extra_terms is not None:
            loss = loss + extra_terms
        return ObjectiveOutput(loss, forget_loss, retain_loss)

    def compute(self, inputs: StepInputs) -> ObjectiveOutput:
        forget_loss, _ = self.forget_term(inputs)
        retain_loss = self.retain_term(inputs) if self.wants_retain() else None
        return self.combine(forget_loss, retain_loss, inputs)

    def term_weights(self, inputs: StepInputs) -> tuple[float, float] | None:
        """``(w_f, w_r)`` when ``compute(inputs).loss = w_f * L_f + w_r * L_r + constant`` with
        weights known before any forward pass; None when the loss is not such a sum (then the
        step backpropagates it whole)."""
        if type(self).compute is not Objective.compute or type(self).combine is not Objective.combine:
            return None
        return float(self.params["gamma"]), float(self.params["alpha"])

    def backward_by_term(self, inputs: StepInputs, weights: tuple[float, float],
                         scale: float = 1.0, shares: tuple[float, float] = (1.0, 1.0)) -> ObjectiveOutput:
        """``compute(inputs)`` and the backward pass of ``scale * loss``, one term at a time: the
        forget pass's activations are freed before the retain pass runs, so the step holds one
        batch's activations, not two. The gradients are those of the whole loss (a sum's gradient
        is the sum of its terms' gradients); the returned values are detached. ``shares``
        multiply the forget and retain term (a rank's share of the global batch, see
        ``Unlearner.rank_shares``; 1 in one process)."""
        w_f, w_r = weights
        s_f, s_r = shares
        forget_loss, _ = self.forget_term(inputs)
        forget_loss = forget_loss * s_f
        (forget_loss * (scale * w_f)).backward()
        retain_loss = None
        if self.wants_retain():
            retain_loss = self.retain_term(inputs) * s_r
            (retain_loss * (scale * w_r)).backward()
            retain_loss = retain_loss.detach()
        return self.combine(forget_loss.detach(), retain_loss, inputs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"
