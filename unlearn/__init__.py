"""unlearn: make a language model forget specific data while keeping the rest.

The library is pure PyTorch + transformers; Ray, Tune and MLflow live in ``pipelines/``.
"""

__version__ = "0.1.0"
