"""Unlearning objectives, registered by name (``unlearn methods`` lists them)."""

from unlearn.objectives import baselines, egup, palu, pdu, unilogit  # noqa: F401  (registration)
from unlearn.objectives.base import Objective, ObjectiveOutput, StepInputs, forward_logits, on_model_device
from unlearn.objectives.egup import EGUP, EgupState
from unlearn.objectives.registry import available, get_objective, objective_class

__all__ = [
    "EGUP", "EgupState", "Objective", "ObjectiveOutput", "StepInputs", "available",
    "forward_logits", "get_objective", "objective_class", "on_model_device",
]
