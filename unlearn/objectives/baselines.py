"""Baselines, so every comparison runs on the same pipeline (formulas: methods.md section 5).

- GradAscent: L_f = -NLL(x_f), no retain term.
- GradDiff:   L_f = -NLL(x_f), retain NLL, gamma = alpha = 1.
- NPO:        L_f = -(2/beta) mean_i log sigmoid(-beta (log pi_theta(y|x) - log pi_ref(y|x))),
              sequence-sum log-probs, beta = 0.1.
- SimNPO:     L_f = -(2/beta) mean_i log sigmoid(beta (NLLsum_i/|y_i| - delta)),
              beta = 4.5, delta = 0, gamma = 0.125, no reference.
- ME+GD:      L_f = mean_t KL(U || softmax(z_t)) = logsumexp(z_t) - mean(z_t) - log V; 0.1 ME + GD.
- UNDIAL:     L_f = mean_t CE(z_t, softmax(z_ref,t - beta onehot(y_t))), beta = 10, alpha = 0.
"""

from unlearn.objectives import ops
from unlearn.objectives.base import Objective
from unlearn.objectives.registry import register


@register
class GradAscent(Objective):
    name = "grad_ascent"
    description = "Gradient ascent on the forget NLL (no retain term)"
    defaults = {"gamma": 1.0, "alpha": 0.0, "retain_loss": "nll"}

    def forget_loss(self, out, batch, ref, reduction="mean"):
        return -ops.nll(out, batch["labels"], reduction=reduction)


@register
class GradDiff(GradAscent):
    name = "grad_diff"
    description = "Gradient difference: ascent on forget NLL, descent on retain NLL"
    defaults = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll"}


@register
class NPO(Objective):
    name = "npo"
    description = "Negative preference optimisation against the frozen reference (+ retain NLL)"
    defaults = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll", "beta": 0.1}
    forget_mean_over = "samples"

    def forget_needs_ref(self) -> bool:
        return True

    def forget_loss(self, out, batch, ref, reduction="mean"):
        return ops.npo(out, batch["labels"], ref, float(self.params["beta"]), reduction)


@register
class SimNPO(Objective):
    name = "simnpo"
    description = "SimNPO: reference-free, length-normalised NPO (+ retain NLL)"
    defaults = {"gamma": 0.125, "alpha": 1.0, "retain_loss": "nll", "beta": 4.5, "delta": 0.0}
    forget_mean_over = "samples"

    def forget_loss(self, out, batch, ref, reduction="mean"):
        return ops.simnpo(out, batch["labels"], float(self.params["beta"]),
                          float(self.params["delta"]), reduction)


@register
class MaxEntropy(Objective):
    name = "me_gd"
    description = "Maximum entropy on forget tokens (KL(U || p)) + retain NLL"
    defaults = {"gamma": 0.1, "alpha": 1.0, "retain_loss": "nll"}

    def forget_loss(self, out, batch, ref, reduction="mean"):
        return ops.max_entropy(out, batch["labels"], reduction=reduction)


@register
class UNDIAL(Objective):
    name = "undial"
    description = "UNDIAL: distil from the reference with the gold logit lowered by beta"
    defaults = {"gamma": 1.0, "alpha": 0.0, "retain_loss": "nll", "beta": 10.0}

    def forget_needs_ref(self) -> bool:
        return True

    def forget_loss(self, out, batch, ref, reduction="mean"):
        return ops.undial(out, batch["labels"], ref, float(self.params["beta"]), reduction)
