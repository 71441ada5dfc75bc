"""PALU: prefix-aware localised unlearning.

Localised in time (only the first ``prefix_tokens`` tokens of each sensitive span, the onset
mask built by ``unlearn.data.tokenize``) and in the vocabulary (the reference model's top-k):

    L_local   = mean_{t in onsets} (1/k) sum_{i in TopK(z_ref,t)} ( z_{t,i} - mean_j z_{t,j} )^2
    L_neutral = mean_{t in neutral} KL(p_theta || p_ref)
    loss      = gamma * L_local + alpha * L_retain + alpha * L_neutral

``top_k`` larger than the vocabulary is clipped to it.
"""

import torch

from unlearn.objectives import ops
from unlearn.objectives.base import Objective, ObjectiveOutput, StepInputs
from unlearn.objectives.registry import register


@register
class PALU(Objective):
    name = "palu"
    description = "PALU: flatten the reference top-k logits at the onset of each sensitive span"
    defaults = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll", "top_k": 1000, "prefix_tokens": 3}
    needs_spans = True
    forget_mean_over = None  # a mean over onset tokens, in its own compute: per-rank means

    def __init__(self, **params):
        super().__init__(**params)
        for key in ("top_k", "prefix_tokens"):
            if int(self.params[key]) < 1:
                raise ValueError(f"method 'palu': {key} must be >= 1, got {self.params[key]}")

    def forget_needs_ref(self) -> bool:
        return True

    def forget_loss(self, out, batch, ref, reduction="mean"):
        if "onset_mask" not in batch:
            raise ValueError("method 'palu' needs forget batches with an onset_mask "
                             "(encode with prefix_tokens)")
        top_k = min(int(self.params["top_k"]), ops.vocab_size(out))
        return ops.palu_local(out, batch["labels"], batch["onset_mask"], ref, top_k, reduction)

    def compute(self, inputs: StepInputs) -> ObjectiveOutput:
        fwd = self.forward_forget(inputs)
        local = self.forget_loss(fwd.out, inputs.forget, fwd.ref)
        neutral = self.neutral_loss(fwd.out, inputs.forget, fwd.ref)
        retain = self.retain_term(inputs) if self.wants_retain() else None
        out = self.combine(local, retain, inputs, float(self.params["alpha"]) * neutral)
        out.metrics["neutral_loss"] = float(neutral.detach())
        return out

    def neutral_loss(self, out, batch, ref):
        """KL to the reference on non-sensitive answer tokens; 0 where there are none."""
        mask = batch.get("neutral_mask")
        if mask is None:
            mask = torch.zeros_like(batch["labels"])
        return ops.kl_to_ref(out, batch["labels"], ref, mask=mask)
