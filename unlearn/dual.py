"""The dual variable of primal-dual constrained unlearning (PDU).

Problem: minimise ``L_f(theta)`` subject to ``L_r(theta) <= eps``. Lagrangian step::

    loss = L_f + lam * (L_r - eps)                      # primal: backward + optimizer step
    lam <- clip(lam + eta_dual * (L_r_hat - eps), 0, lam_max)   # dual: after the step

``eps`` is absolute, or relative to the model before unlearning: ``eps = (1 + rho) * L_r(theta_0)``.
``lam`` stays at ``lam_0`` during the warm-up (counted in optimizer steps), then moves every step.
Under data parallelism ``L_r_hat`` must be the mean over all ranks, so every rank holds the same
``lam``: pass ``reduce`` (e.g. an all-reduce mean) and the controller calls it before updating.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Reducer = Callable[[float], float]


@dataclass
class DualController:
    lam_0: float = 100.0
    eta_dual: float = 5.0
    lam_max: float = 1e4
    eps: float | None = None
    rho: float | None = None
    warmup_steps: int = 0
    reduce: Reducer | None = field(default=None, repr=False, compare=False)
    lam: float = field(init=False)
    steps: int = field(default=0, init=False)
    initial_retain_loss: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if (self.eps is None) == (self.rho is None):
            raise ValueError("dual: set exactly one of eps (absolute) or rho (relative)")
        if self.eps is not None and self.eps < 0:
            raise ValueError(f"dual.eps must be >= 0, got {self.eps}")
        if self.rho is not None and self.rho < -1:
            raise ValueError(f"dual.rho must be >= -1, got {self.rho}")
        if not 0 <= self.lam_0 <= self.lam_max:
            raise ValueError(f"dual.lam_0 must lie in [0, lam_max={self.lam_max}], got {self.lam_0}")
        if self.eta_dual < 0:
            raise ValueError(f"dual.eta_dual must be >= 0, got {self.eta_dual}")
        if self.warmup_steps < 0:
            raise ValueError(f"dual.warmup_steps must be >= 0, got {self.warmup_steps}")
        self.lam = float(self.lam_0)

    @property
    def ready(self) -> bool:
        """True once the threshold is known (absolute, or relative after calibration)."""
        return self.eps is not None

    def calibrate(self, initial_retain_loss: float) -> float:
        """Fix a relative threshold from ``L_r(theta_0)`` (averaged across ranks); returns eps."""
        value = self._reduce(float(initial_retain_loss))
        self.initial_retain_loss = value
        if self.rho is not None:
            self.eps = (1.0 + self.rho) * value
        return self.eps

    def update(self, retain_loss: float) -> float:
        """One dual ascent step on the step's retain loss (no grad); returns the new lam."""
        if self.eps is None:
            raise RuntimeError("dual: relative eps needs calibrate(initial_retain_loss) first")
        value = self._reduce(float(retain_loss))
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.lam = min(max(self.lam + self.eta_dual * (value - self.eps), 0.0), self.lam_max)
        return self.lam

    def slack(self, retain_loss: float) -> float:
        """``L_r - eps``: positive means the constraint is violated."""
        return float(retain_loss) - float(self.eps)

    def _reduce(self, value: float) -> float:
        return float(self.reduce(value)) if self.reduce is not None else value

    def state_dict(self) -> dict:
        return {
            "lam": self.lam, "steps": self.steps, "eps": self.eps, "rho": self.rho,
            "initial_retain_loss": self.initial_retain_loss,
        }

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.steps = int(state["steps"])
        self.eps = state["eps"]
        self.rho = state["rho"]
        self.initial_retain_loss = state["initial_retain_loss"]
