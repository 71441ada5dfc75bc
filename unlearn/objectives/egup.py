"""EGUP: entanglement-guided reweighting of any per-sample forget loss, with a proxy constraint.

This is the project's reading of the published description (the paper's full text and code
were not available); every part can be switched off.

    E(x)        = mean over answer tokens of the hidden state of layer ``layer``
    c_r         = mean_j E_theta0(x_r_j)                      (once, before unlearning)
    w_inter_i   = B * softmax_i( cos(E_theta(x_i), c_r) / tau )
    w_intra_i   = exp( -(1 - cos(E_theta(x_i), E_theta0(x_i))) / tau_d )
    L_f         = mean_i w_inter_i * w_intra_i * l_f(x_i)      (weights detached)
    b           = mean NLL_theta0(P)                          (proxy set P, once)
    L_pc        = mean_i max(0, NLL_theta(x_i) - b)
    loss        = inner's combination of L_f and L_retain  +  beta * L_pc

``l_f`` is the inner method's per-sample forget loss, so EGUP composes with GA, NPO, PDU (the
dual constraint stays in force), Unilogit and the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn import losses
from unlearn.objectives import ops
from unlearn.objectives.base import (
    Batch,
    Objective,
    ObjectiveOutput,
    StepInputs,
    forward_logits,
    on_model_device,
)
from unlearn.objectives.registry import get_objective, register

SumReducer = Callable[[Tensor], Tensor]


def answer_embedding(hidden: Tensor, labels: Tensor) -> Tensor:
    """``E(x)``: mean of ``hidden [B,T,H]`` over answer positions (labels != -100) -> ``[B,H]``."""
    mask = (labels != -100).to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@dataclass
class EgupState:
    """What EGUP measures on the starting model ``theta_0``, before any update."""

    retain_centroid: Tensor | None = None
    initial_embeddings: dict[int, Tensor] = field(default_factory=dict)
    proxy_boundary: float | None = None

    def state_dict(self) -> dict:
        return {
            "retain_centroid": self.retain_centroid,
            "initial_embeddings": dict(self.initial_embeddings),
            "proxy_boundary": self.proxy_boundary,
        }

    def load_state_dict(self, state: dict) -> None:
        self.retain_centroid = state["retain_centroid"]
        self.initial_embeddings = dict(state["initial_embeddings"])
        self.proxy_boundary = state["proxy_boundary"]


@register
class EGUP(Objective):
    name = "egup"
    description = "EGUP: entanglement-reweighted forget loss of an inner method + proxy constraint"
    defaults = {
        "inner": "npo", "inner_params": None, "tau": 1.0, "tau_d": 0.1, "beta": 1.0, "layer": -1,
        "use_inter": True, "use_intra": True, "use_proxy": True,
    }
    forget_mean_over = None  # reweighted per-sample losses in its own compute: per-rank means

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["inner"] == self.name:
            raise ValueError("method 'egup': inner cannot be 'egup'")
        for key in ("tau", "tau_d"):
            if float(self.params[key]) <= 0:
                raise ValueError(f"method 'egup': {key} must be > 0, got {self.params[key]}")
        self.inner: Objective = get_objective(self.params["inner"], **(self.params["inner_params"] or {}))
        self.state = EgupState()

    # The inner method decides the reference model, the retain term and the dual.
    @property
    def needs_ref(self) -> bool:
        return self.inner.needs_ref

    @property
    def uses_dual(self) -> bool:  # type: ignore[override]
        return self.inner.uses_dual

    @property
    def needs_spans(self) -> bool:  # type: ignore[override]
        return self.inner.needs_spans

    def prefix_tokens(self) -> int | None:
        return self.inner.prefix_tokens()

    def wants_retain(self) -> bool:
        return self.inner.wants_retain()

    def needs_proxy(self) -> bool:
        return bool(self.params["use_proxy"])

    @torch.no_grad()
    def prepare(self, model: nn.Module, *, retain: Iterable[Batch], forget: Iterable[Batch],
                proxy: Iterable[Batch] | None = None, all_reduce_sum: SumReducer | None = None) -> None:
        """Measure ``c_r``, ``E_theta0`` of every forget sample and the proxy boundary ``b``.

        ``all_reduce_sum`` sums a tensor across ranks, so every rank gets the global centroid
        and boundary.
        """
        reduce_sum = all_reduce_sum or (lambda t: t)
        layer = int(self.params["layer"])
        was_training = model.training
        model.eval()
        if self.params["use_inter"]:
            total, count = None, 0
            for batch in (on_model_device(model, b) for b in retain):
                emb = answer_embedding(_hidden(model, batch, layer), batch["labels"]).float()
                total = emb.sum(0) if total is None else total + emb.sum(0)
                count += emb.shape[0]
            if total is None:
                raise ValueError("method 'egup': the retain set is empty")
            packed = reduce_sum(torch.cat([total, total.new_tensor([count])]))
            self.state.retain_centroid = packed[:-1] / packed[-1]
        if self.params["use_intra"]:
            for batch in (on_model_device(model, b) for b in forget):
                emb = answer_embedding(_hidden(model, batch, layer), batch["labels"]).float()
                for sample_id, row in zip(batch["sample_id"].tolist(), emb):
                    self.state.initial_embeddings[int(sample_id)] = row.clone()
        if self.params["use_proxy"]:
            if proxy is None:
                raise ValueError("method 'egup' with use_proxy needs a proxy set (e.g. holdout)")
            nll_sum, tokens = 0.0, 0
            for batch in (on_model_device(model, b) for b in proxy):
                logits = forward_logits(model, batch)
                per_sample = losses.nll(logits, batch["labels"], reduction="per_sample")
                nll_sum += float(per_sample.sum())
                tokens += per_sample.shape[0]
            packed = reduce_sum(torch.tensor([nll_sum, float(tokens)]))
            if packed[1] == 0:
                raise ValueError("method 'egup': the proxy set is empty")
            self.state.proxy_boundary = float(packed[0] / packed[1])
        model.train(was_training)

    def weights(self, embeddings: Tensor, sample_ids: Tensor | None) -> Tensor:
        """Detached per-sample weights ``w_inter * w_intra``."""
        emb = embeddings.detach().float()
        weight = torch.ones(emb.shape[0], device=emb.device)
        if self.params["use_inter"]:
            if self.state.retain_centroid is None:
                raise RuntimeError("method 'egup': call prepare() before training")
            centroid = self.state.retain_centroid.to(emb.device)
            sim = F.cosine_similarity(emb, centroid.unsqueeze(0), dim=-1)
            weight = weight * emb.shape[0] * torch.softmax(sim / float(self.params["tau"]), dim=0)
        if self.params["use_intra"]:
            if sample_ids is None:
                raise ValueError("method 'egup' needs a sample_id column in forget batches")
            initial = torch.stack(
                [self.state.initial_embeddings[int(i)] for i in sample_ids.tolist()]
            ).to(emb.device)
            drift = 1.0 - F.cosine_similarity(emb, initial, dim=-1)
            weight = weight * torch.exp(-drift / float(self.params["tau_d"]))
        return weight

    def compute(self, inputs: StepInputs) -> ObjectiveOutput:
        inner, forget = self.inner, inputs.forget
        fwd = inner.forward_forget(inputs, hidden=True)
        per_sample = inner.forget_loss(fwd.out, forget, fwd.ref, reduction="per_sample")
        embeddings = answer_embedding(fwd.out.hidden_states[int(self.params["layer"])],
                                      forget["labels"])
        weight = self.weights(embeddings, forget.get("sample_id"))
        forget_loss = (weight * per_sample).mean()
        extra = None
        if self.params["use_proxy"]:
            if self.state.proxy_boundary is None:
                raise RuntimeError("method 'egup': call prepare() before training")
            nll_i = ops.nll(fwd.out, forget["labels"], reduction="per_sample")
            proxy_penalty = torch.relu(nll_i - self.state.proxy_boundary).mean()
            extra = float(self.params["beta"]) * proxy_penalty
        retain = inner.retain_term(inputs) if inner.wants_retain() else None
        out = inner.combine(forget_loss, retain, inputs, extra)
        out.metrics["egup_weight_mean"] = float(weight.mean())
        if extra is not None:
            out.metrics["proxy_penalty"] = float(proxy_penalty.detach())
        return out


def _hidden(model: nn.Module, batch: Batch, layer: int) -> Tensor:
    _, hidden_states = forward_logits(model, batch, hidden=True)
    return hidden_states[layer]
