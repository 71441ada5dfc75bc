"""Distributed evaluation: the requests of an evaluation spread over a Ray Data actor pool.

Each actor loads the model once (CPU, or a GPU when ``gpus_per_worker > 0``) and answers batches
of requests with the same :class:`unlearn.eval.scoring.LocalScorer` the single-process path
uses, so both give the same numbers; only the placement differs. Requests are sorted by length
before they are cut into blocks, so each batch pads little.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from unlearn.eval import EvalSettings
from unlearn.eval.scoring import LocalScorer, Request, request_from_json, request_size, request_to_json


class ScoringActor:
    """A Ray Data ``map_batches`` callable class: loads the model in ``__init__`` (once)."""

    def __init__(self, model_spec: str, batch_size: int, max_length: int, dtype: str, threads: int) -> None:
        import torch

        from unlearn.models import load_model, load_tokenizer

        torch.set_num_threads(max(1, threads))
        model = load_model(model_spec, dtype=dtype)
        if torch.cuda.is_available():
            model = model.to("cuda")
        self.scorer = LocalScorer(model, load_tokenizer(model_spec), batch_size=batch_size,
                                  max_length=max_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        requests = [request_from_json(text) for text in batch["request"]]
        results = self.scorer.run(requests)
        return {"id": batch["id"], "result": np.array([json.dumps(r) for r in results], dtype=object)}


class RayScorer:
    """Answers evaluation requests on a Ray cluster; same interface as ``LocalScorer``."""

    def __init__(self, model_spec: str, settings: EvalSettings, *, workers: int = 2,
                 gpus_per_worker: float = 0.0, dtype: str = "float32", cpus_per_worker: int | None = None):
        from pipelines.ray_env import cluster_cpus, ensure_ray

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        ensure_ray()
        available = cluster_cpus()
        if cpus_per_worker is None:
            cpus_per_worker = max(1, available // workers) if gpus_per_worker == 0 else 1
        if workers * cpus_per_worker > available:
            raise ValueError(f"{workers} eval workers x {cpus_per_worker} CPU exceed the cluster's "
                             f"{available} CPUs")
        self.model_spec, self.settings, self.workers = model_spec, settings, workers
        self.gpus_per_worker, self.dtype, self.cpus_per_worker = gpus_per_worker, dtype, cpus_per_worker

    def run(self, requests: Sequence[Request]) -> list[dict]:
        import ray

        if not requests:
            return []
        order = sorted(range(len(requests)), key=lambda i: request_size(requests[i]))
        rows = [{"id": i, "request": request_to_json(requests[i])} for i in order]
        # Several blocks per worker so the pool stays busy; each map batch is a few model batches.
        blocks = min(len(rows), self.workers * 4)
        per_call = max(self.settings.batch_size, -(-len(rows) // blocks))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            ScoringActor,
            fn_constructor_kwargs={"model_spec": self.model_spec, "batch_size": self.settings.batch_size,
                                   "max_length": self.settings.max_length, "dtype": self.dtype,
                                   "threads": self.cpus_per_worker},
            batch_size=per_call, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
        )
        results: list[dict | None] = [None] * len(requests)
        for row in dataset.take_all():
            results[int(row["id"])] = json.loads(row["result"])
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"the Ray evaluation returned no result for {len(missing)} request(s)")
        return results  # type: ignore[return-value]


def ray_scorer(model_spec: str, settings: EvalSettings, *, workers: int = 2, gpus_per_worker: float = 0.0,
               dtype: str = "float32"):
    """``(scorer, tokenizer)`` for :func:`unlearn.eval.evaluate`; the tokenizer stays local."""
    from unlearn.models import load_tokenizer

    return (RayScorer(model_spec, settings, workers=workers, gpus_per_worker=gpus_per_worker, dtype=dtype),
            load_tokenizer(model_spec))
