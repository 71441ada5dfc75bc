"""Evaluation of one model: read the data, plan the requests, score them, aggregate.

Imported through :mod:`unlearn.eval`, whose names it defines.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from unlearn.data import DataError
from unlearn.eval.cache import cached_result, evaluation_key, store_result
from unlearn.eval.metrics import ES_VARIANTS
from unlearn.eval.muse import aggregate_muse, load_muse_eval_data, plan_muse
from unlearn.eval.report import EvalReference, write_result
from unlearn.eval.scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, Generation, Likelihood, LocalScorer
from unlearn.eval.tofu import MAX_NEW_TOKENS, aggregate_tofu, load_tofu_eval_data, plan_tofu

log = logging.getLogger("unlearn.eval")

BENCHMARKS = ("tofu", "muse")
DEFAULT_DATA = {"tofu": "locuslab/TOFU", "muse": "muse-bench/MUSE-News"}


@dataclass
class EvalSettings:
    data: str
    benchmark: str = "tofu"
    forget_split: str = "forget10"
    holdout_split: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = MAX_NEW_TOKENS
    max_length: int = DEFAULT_MAX_LENGTH
    extraction_strength: str = "reference"  # see unlearn.eval.metrics.extraction_strength

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        if self.extraction_strength not in ES_VARIANTS:
            raise ValueError(f"extraction_strength must be one of {ES_VARIANTS}, "
                             f"got {self.extraction_strength!r}")
        for name in ("batch_size", "max_new_tokens", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_eval_data(settings: EvalSettings):
    """The records an evaluation under ``settings`` reads, validated."""
    if settings.benchmark == "tofu":
        return load_tofu_eval_data(settings.data, settings.forget_split, holdout_split=settings.holdout_split)
    return load_muse_eval_data(settings.data)


def evaluate(scorer, tokenizer, settings: EvalSettings, *, reference: EvalReference | None = None,
             model_name: str = "model") -> dict:
    """Evaluate whatever model ``scorer`` wraps; returns the result dict (see ``report``)."""
    start = time.perf_counter()
    forget_split = settings.forget_split if settings.benchmark == "tofu" else None
    if reference is not None:
        reference.check_matches(settings.benchmark, forget_split)
    data = load_eval_data(settings)
    if settings.benchmark == "tofu":
        plan = plan_tofu(data, max_new_tokens=settings.max_new_tokens)
        requests = plan.requests
    else:
        requests, slots = plan_muse(data)
    log.info("%s: %d likelihood and %d generation requests", model_name,
             sum(isinstance(r, Likelihood) for r in requests),
             sum(isinstance(r, Generation) for r in requests))
    results = scorer.run(requests)
    if settings.benchmark == "tofu":
        aggregates, per_sample = aggregate_tofu(data, plan, results, reference,
                                                es_variant=settings.extraction_strength)
        splits = data.names
    else:
        aggregates, per_sample = aggregate_muse(data, slots, results, tokenizer, reference)
        splits = {}
    return {
        "schema_version": 1,
        "benchmark": settings.benchmark,
        "model": model_name,
        "data": settings.data,
        "forget_split": forget_split,
        "splits": splits,
        "reference": reference.origin if reference is not None else None,
        "aggregates": aggregates.values,
        "unavailable": aggregates.reasons,
        "per_sample": per_sample,
        "settings": asdict(settings),
        "requests": len(requests),
        "seconds": round(time.perf_counter() - start, 2),
    }


def local_scorer(model_spec: str, settings: EvalSettings, *, dtype: str = "float32",
                 progress: bool = True, device: str = "auto"):
    """A single-process scorer for a model spec (see ``unlearn.models.load_model``) on ``device``
    (``unlearn.models.resolve_device``)."""
    from unlearn.models import load_model, load_tokenizer, resolve_device

    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, dtype=dtype, device=resolve_device(device))
    return LocalScorer(model, tokenizer, batch_size=settings.batch_size, max_length=settings.max_length,
                       progress=progress), tokenizer


def evaluate_model(model_spec: str, settings: EvalSettings, *, reference: EvalReference | None = None,
                   dtype: str = "float32", progress: bool = True, device: str = "auto") -> dict:
    scorer, tokenizer = local_scorer(model_spec, settings, dtype=dtype, progress=progress, device=device)
    return evaluate(scorer, tokenizer, settings, reference=reference, model_name=model_spec)


def load_reference(reference: str | None, settings: EvalSettings, *, evaluate_fn=evaluate_model,
                   output: str | Path | None = None, reuse: bool = False) -> EvalReference | None:
    """A reference from an eval JSON, or by evaluating the given (retain) model; in the latter
    case its evaluation is written to ``output`` so later runs can pass the JSON instead.

    ``reuse``: a model folder's unchanged evaluation is taken from the cache (:func:`evaluate_once`);
    only for ``evaluate_fn`` = :func:`evaluate_model` at its defaults (fp32, device auto).
    """
    if reference is None:
        return None
    path = Path(reference)
    if path.suffix == ".json":
        if not path.is_file():
            raise DataError(f"reference {reference}: no such file")
        return EvalReference.from_file(path)
    result = evaluate_once(reference, settings, lambda spec: evaluate_fn(spec, settings), reuse=reuse)
    if output is not None:
        write_result(result, output)
        log.info("reference evaluation written to %s", output)
    return EvalReference.from_result(result, str(output or reference))


def evaluate_once(model: str, settings: EvalSettings, evaluate_fn, *, reuse: bool,
                  reference: EvalReference | None = None, device: str = "auto") -> dict:
    """``evaluate_fn(model)``, the evaluation of ``model`` under ``settings`` against ``reference``.

    ``reuse``: a model folder's evaluation is kept by content (``unlearn.eval.cache``) and taken
    from there while the folder, the data's records (wherever they are), the settings, the
    reference's values, the device and the evaluation code are unchanged. Only for an
    ``evaluate_fn`` that computes in fp32 on ``device``, as :func:`evaluate_model` does by default.
    """
    from unlearn.models import resolve_device

    path = Path(model)
    key = None
    if reuse and path.is_dir():
        key = evaluation_key(path, settings, load_eval_data(settings), resolve_device(device).type,
                             reference)
    result = cached_result(key) if key else None
    if result is not None:
        log.info("%s is unchanged since its evaluation %s: reused", model, key[:12])
        return {**result, "model": str(model), "data": settings.data,
                "reference": reference.origin if reference else None, "reused_evaluation": key}
    log.info("evaluating %s", model)
    result = evaluate_fn(model)
    if key:
        store_result(key, result)
    return result
