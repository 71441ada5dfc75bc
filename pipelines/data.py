"""Ray Data, deterministic mode: forget / retain (/ proxy) records -> tokenised tensor rows ->
each training worker (the streaming mode, ``data.streaming``, is ``pipelines.stream``).

The driver reads and validates the records (a bad file fails before any worker starts), tokenises
them and puts the rows in a Ray Dataset (the streaming mode tokenises in ``map_batches`` tasks
instead, see :func:`tokenize`). Only tensor columns leave the tokeniser (``input_ids``,
``attention_mask``, ``labels``, PALU masks, ``sample_id``).

Each worker pulls its dataset (``get_dataset_shard``) and lays the rows out in the same
deterministic, length-bucketed global batches as the single-process path
(``unlearn.workflow.make_batches``, seeded per epoch); rank r takes rows r, r+N, ... of every
global batch. So every rank takes exactly the same number of steps (no FSDP collective can hang on
a short shard), and N workers see the same data per step as one process with the same config.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from unlearn.data import QARecord
from unlearn.loop import pair_batches
from unlearn.workflow import encode_records, make_batches

TENSOR_COLUMNS = ("input_ids", "attention_mask", "labels", "onset_mask", "neutral_mask")


def record_rows(records: Sequence) -> list[dict]:
    """One uniform row per record (JSON inside, so optional fields do not vary the schema)."""
    rows = []
    for index, record in enumerate(records):
        payload = record if isinstance(record, str) else record.to_dict()
        rows.append({"sample_id": index, "record": json.dumps(payload)})
    return rows


def _record(payload: str):
    value = json.loads(payload)
    if isinstance(value, str):
        return value
    spans = value.get("sensitive_spans")
    return QARecord(question=value["question"], answer=value["answer"],
                    paraphrased_answer=value.get("paraphrased_answer"),
                    perturbed_answers=tuple(value.get("perturbed_answer", ())),
                    sensitive_spans=tuple(tuple(s) for s in spans) if spans is not None else None)


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    from unlearn.models import load_tokenizer

    return load_tokenizer(spec)


def tokenize_batch(batch: dict[str, np.ndarray], *, tokenizer_spec: str, max_length: int,
                   prefix_tokens: int | None = None) -> dict[str, np.ndarray]:
    """``map_batches`` function: records -> tensor columns (the tokenizer is loaded once per
    Ray worker process and kept, so every data set of a run reuses it). A raw text gives one
    row per ``max_length`` window, each with the text's ``sample_id``."""
    tokenizer = _tokenizer(tokenizer_spec)
    records = [_record(payload) for payload in batch["record"]]
    if any(isinstance(r, str) for r in records):  # raw text: one row per window
        ids, features = [], []
        for sample_id, text in zip(batch["sample_id"], records):
            windows = encode_records(tokenizer, [text], max_length=max_length)
            ids += [sample_id] * len(windows)
            features += windows
    else:
        ids = list(batch["sample_id"])
        features = encode_records(tokenizer, records, max_length=max_length, prefix_tokens=prefix_tokens)
    out: dict[str, np.ndarray] = {"sample_id": np.asarray(ids, dtype=np.int64)}
    for column in TENSOR_COLUMNS:
        if features and column in features[0]:
            out[column] = np.array([np.asarray(f[column], dtype=np.int64) for f in features] + [None],
                                   dtype=object)[:-1]
    return out


def tokenize(dataset, tokenizer_spec: str, *, max_length: int, prefix_tokens: int | None = None,
             num_cpus: float = 1.0):
    """``dataset`` (``sample_id``, ``record`` columns) tokenised lazily by ``map_batches`` tasks.

    Tasks, not an actor pool: Ray reuses its worker processes across tasks and data sets, so the
    imports and the tokenizer are paid once per process, not once per data set (an actor pool
    per data set cost ~10 s each on 2 cores).
    """
    return dataset.map_batches(
        tokenize_batch, fn_kwargs={"tokenizer_spec": tokenizer_spec, "max_length": max_length,
                                   "prefix_tokens": prefix_tokens},
        batch_size=64, batch_format="numpy", num_cpus=num_cpus)


def tokenized_dataset(records: Sequence, tokenizer_spec: str, *, max_length: int,
                      prefix_tokens: int | None = None):
    """A materialised Ray Dataset of ``records`` tokenised here, on the driver.

    The deterministic mode holds every record on the driver already, so tokenising them here costs
    what one task would, without its worker process: Ray gives the CPUs' idle worker processes up
    while the training workers run, so each run's first task paid for a new process that imports
    transformers and loads the tokenizer (~4 s of a ~27 s tiny-model run here).
    """
    import ray

    rows = record_rows(records)
    batch = {"sample_id": np.array([row["sample_id"] for row in rows], dtype=np.int64),
             "record": np.array([row["record"] for row in rows] + [None], dtype=object)[:-1]}
    columns = tokenize_batch(batch, tokenizer_spec=tokenizer_spec, max_length=max_length,
                             prefix_tokens=prefix_tokens)
    return ray.data.from_items([{name: values[i] for name, values in columns.items()}
                                for i in range(len(columns["sample_id"]))])


def batch_features(batch: dict[str, np.ndarray]) -> Iterator[dict]:
    """The rows of one numpy batch of tokenised columns, as feature dicts."""
    columns = [c for c in batch if c in TENSOR_COLUMNS]
    for i, sample_id in enumerate(batch["sample_id"]):
        feature = {c: batch[c][i].tolist() for c in columns}
        feature["sample_id"] = int(sample_id)
        yield feature


def features_of(iterable) -> list[dict]:
    """Every row of a dataset or dataset shard, as feature dicts ordered by ``sample_id`` (then
    by arrival: the windows of one text keep their order), renumbered 0..n-1."""
    rows = [f for batch in iterable.iter_batches(batch_size=256, batch_format="numpy")
            for f in batch_features(batch)]
    rows.sort(key=lambda f: f["sample_id"])
    for index, feature in enumerate(rows):
        feature["sample_id"] = index
    return rows


def pull_features(name: str) -> list[dict]:
    """All rows of dataset ``name`` on this worker (see :func:`features_of`)."""
    import ray.train

    return features_of(ray.train.get_dataset_shard(name))


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    return {key: value[rank::world] for key, value in batch.items()}


def epoch_pairs(forget: list[dict], retain: list[dict] | None, *, batch_size: int, pad_token_id: int,
                seed: int, epoch: int, bucket: bool, rank: int = 0, world: int = 1) -> list:
    """This rank's (forget, retain) pairs of one epoch: the single-process global batches, sliced.

    A global batch with fewer rows than workers is dropped: it would leave a rank without data.
    """
    forget_batches = make_batches(forget, batch_size, pad_token_id, shuffle=True, seed=seed + epoch,
                                  bucket=bucket)
    retain_batches = None
    if retain is not None:
        retain_batches = make_batches(retain, batch_size, pad_token_id, shuffle=True,
                                      seed=seed + 10_000 + epoch, bucket=bucket)
    pairs = []
    for f, r in pair_batches(forget_batches, retain_batches):
        if len(f["input_ids"]) < world or (r is not None and len(r["input_ids"]) < world):
            continue
        pairs.append((rank_slice(f, rank, world), None if r is None else rank_slice(r, rank, world)))
    return pairs
