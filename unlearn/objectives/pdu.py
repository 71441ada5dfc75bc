"""PDU: logit-margin flattening under a retain-loss constraint, solved primal-dual.

    L_f   = mean_{t in A_f} ( max_k z_{t,k} - (1/V) sum_k z_{t,k} )^2
    L_f^k = mean_{t in A_f} (1/k) sum_{i in TopK(z_t)} ( z_{t,i} - mean_j z_{t,j} )^2
    loss  = gamma * L_f + lam * (L_r - eps)
    lam  <- clip(lam + eta_dual * (L_r_hat - eps), 0, lam_max)     (unlearn.dual)

TopK comes from the current logits (detached) or, with ``topk_source="ref"``, from the frozen
reference model. The dual update itself happens in the training step after the optimizer step.
"""

from __future__ import annotations

from torch import Tensor

from unlearn.objectives import ops
from unlearn.objectives.base import Batch, Objective, ObjectiveOutput, StepInputs
from unlearn.objectives.ops import HeadOutput, vocab_size
from unlearn.objectives.registry import register


@register
class PDU(Objective):
    name = "pdu"
    description = "Primal-dual constrained unlearning: flatten the logit margin s.t. retain loss <= eps"
    defaults = {"gamma": 1.0, "retain_loss": "nll", "top_k": None, "topk_source": "current"}
    uses_dual = True

    def __init__(self, **params):
        super().__init__(**params)
        top_k, source = self.params["top_k"], self.params["topk_source"]
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"method 'pdu': top_k must be >= 1, got {top_k}")
        if source not in ("current", "ref"):
            raise ValueError(f"method 'pdu': topk_source must be 'current' or 'ref', got {source!r}")

    def forget_needs_ref(self) -> bool:
        return self.params["top_k"] is not None and self.params["topk_source"] == "ref"

    def forget_loss(self, out: HeadOutput, batch: Batch, ref, reduction="mean") -> Tensor:
        top_k = self.params["top_k"]
        if top_k is not None:
            top_k = min(int(top_k), vocab_size(out))
        return ops.margin(out, batch["labels"], top_k, ref, reduction)

    def term_weights(self, inputs: StepInputs) -> tuple[float, float] | None:
        if type(self).compute is not PDU.compute or type(self).combine is not PDU.combine:
            return None
        return float(self.params["gamma"]), float(self._ready_dual(inputs).lam)

    @staticmethod
    def _ready_dual(inputs: StepInputs):
        if inputs.dual is None or not inputs.dual.ready:
            raise ValueError("method 'pdu' needs a calibrated DualController (inputs.dual)")
        return inputs.dual

    def combine(self, forget_loss, retain_loss, inputs: StepInputs, extra_terms=None):
        dual = self._ready_dual(inputs)
        slack = retain_loss - dual.eps
        loss = float(self.params["gamma"]) * forget_loss + dual.lam * slack
        if extra_terms is not None:
            loss = loss + extra_terms
        return ObjectiveOutput(loss, forget_loss, retain_loss)
