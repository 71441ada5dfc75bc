"""Unilogit: self-distillation towards a target that makes the gold token uniform.

    zt_i = z_i (i != y),  zt_y = logsumexp_{i != y} z_i - log(V - 1),  q = softmax(zt)
    L_f  = mean_{t in A_f} KL(p_theta(.|t) || q)          (sum over V, mean over tokens)
    loss = gamma * L_f + alpha * L_retain                 (alpha = 1)
"""

from unlearn.objectives import ops
from unlearn.objectives.base import Objective
from unlearn.objectives.registry import register


@register
class Unilogit(Objective):
    name = "unilogit"
    description = "Unilogit: KL to a self-target giving the gold token probability exactly 1/V"
    defaults = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll"}

    def forget_loss(self, out, batch, ref, reduction="mean"):
        return ops.unilogit(out, batch["labels"], reduction=reduction)
