"""Streaming data path (``data.streaming: true``): records read where they are, validated and
tokenised on the cluster, each Ray Train worker iterating only its own shard.

    files (local, s3://, gs://, file://...) --RecordFiles read tasks: parse + validate-->
        rows (sample_id = question key, record JSON, digest)
        --map_batches: tokenise (QA) or cut into max_length windows (raw text)-->
        streaming_split(N, equal=True) --> worker r: bounded shuffle buffer, length buckets
        inside a window of batches, the retain stream cycling beside the forget stream

The driver never holds the records. Before any worker starts it scans the forget and retain
streams once (reading and validating every row, keeping a sorted array of 63-bit question keys
of the forget set and the record digests for its fingerprint): a bad row fails the run before
the first step, overlap is counted with the keys, and the row counts fix the number of steps.
The auxiliary uses that need whole sets (the dual's calibration, EGUP's centroids, early
stopping's forget scores) take the first ``data.sample_rows`` rows of their stream.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from ray.data.datasource import FileBasedDatasource

from unlearn.data import DataError
from unlearn.data.loaders import (
    fingerprint,
    iter_file_rows,
    parse_qa_row,
    parse_text_row,
    question_key,
    record_digest,
    split_files,
)

log = logging.getLogger(__name__)


# A worker fetches and converts one block at a time, so the block size, not the corpus, bounds its
# memory: with Ray's default (128 MiB) a 50,000-row shard became one block and a worker's peak grew
# with the shard size (bench/data_stream.py).
BLOCK_BYTES = 4 * 2**20


# --------------------------------------------------------------------------- reading + validation


def validated_rows(rows: list, name: str, first_index: int, kind: str) -> dict[str, list]:
    """Columns of validated records: ``sample_id`` (the question's or text's key), ``record``
    (canonical JSON) and ``digest`` (SHA-256, for the forget set's fingerprint). A bad row
    raises :class:`DataError` naming the file, the row and the field."""
    keys, payloads, digests = [], [], []
    for offset, row in enumerate(rows):
        where = f"{name} row {first_index + offset}"
        if kind == "text":
            record = parse_text_row(row, where)
            keys.append(question_key(record))
            payloads.append(json.dumps(record))
        else:
            record = parse_qa_row(row, where)
            keys.append(question_key(record.question))
            payloads.append(json.dumps(record.to_dict()))
        digests.append(record_digest(record))
    return {"sample_id": keys, "record": payloads, "digest": digests}


class RecordFiles(FileBasedDatasource):
    """Ray Data datasource of TOFU/MUSE records in JSON, JSON Lines or Parquet files: each read
    task streams its file a chunk at a time (Parquet row groups, JSON Lines), validating rows."""

    _FILE_EXTENSIONS = ["json", "jsonl", "parquet"]

    def __init__(self, paths: list[str], *, filesystem, prefix: str, kind: str, chunk_rows: int = 1024):
        super().__init__(paths, filesystem=filesystem)
        self._prefix, self._kind, self._chunk_rows = prefix, kind, chunk_rows

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # random access: Parquet reads its footer first

    def _read_stream(self, f, path: str):
        import pyarrow as pa

        name, index = self._prefix + path, 0
        for rows in iter_file_rows(f, name, chunk_rows=self._chunk_rows):
            columns = validated_rows(rows, name, index, self._kind)
            index += len(rows)
            yield pa.table({"sample_id": pa.array(columns["sample_id"], pa.int64()),
                            "record": pa.array(columns["record"], pa.string()),
                            "digest": pa.array(columns["digest"], pa.binary(32))})


def read_split(source: str, split: str, *, kind: str, num_cpus: float = 1.0):
    """A lazy Ray Dataset of the validated records of ``split`` (see :func:`split_files`)."""
    import ray

    filesystem, paths, prefix = split_files(source, split)
    dataset = ray.data.read_datasource(RecordFiles(paths, filesystem=filesystem, prefix=prefix, kind=kind),
                                       num_cpus=num_cpus)
    # Its context is this dataset's own copy, inherited by the datasets made from it.
    dataset.context.target_max_block_size = BLOCK_BYTES
    return dataset


def data_error(exc: BaseException) -> DataError | None:
    """The :class:`DataError` a read task raised, without Ray's wrapping (a ``RayTaskError`` that
    subclasses it and carries the worker's traceback in its message)."""
    from ray.exceptions import RayError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DataError) and not isinstance(exc, RayError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__


@contextlib.contextmanager
def quiet_data_errors():
    """Ray Data logs a failed task's whole traceback before raising; the pipeline raises one
    clean :class:`DataError` instead (other errors still propagate, tracebacks and all)."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- the driver's scan


@dataclass
class Scan:
    """What one pass over a stream leaves on the driver: counts and keys, not records."""

    rows: int
    keys: np.ndarray | None  # sorted unique question keys; kept for the forget set only
    digests: np.ndarray | None  # (rows, 32) uint8; kept for the forget set only
    shared_with: dict[str, int]  # rows whose key is in each of the given key sets

    def fingerprint(self) -> str:
        return fingerprint(self.digests)


def scan(dataset, *, against: dict[str, np.ndarray] | None = None, keep: bool = False,
         batch_rows: int = 8192) -> Scan:
    """Read every row of ``dataset`` once (validating it), counting rows and the rows whose key is
    in each ``against`` set; ``keep`` also keeps the keys and record digests (the forget set's)."""
    against = against or {}
    keys, digests, rows = [], [], 0
    shared = dict.fromkeys(against, 0)
    columns = ["sample_id", "digest"] if keep else ["sample_id"]
    for batch in dataset.select_columns(columns).iter_batches(batch_size=batch_rows, batch_format="numpy"):
        ids = np.asarray(batch["sample_id"], dtype=np.int64)
        rows += len(ids)
        for name, other in against.items():
            shared[name] += int(np.isin(ids, other).sum())
        if keep:
            keys.append(np.unique(ids))
            digests.append(np.frombuffer(b"".join(batch["digest"].tolist()), dtype=np.uint8).reshape(-1, 32))
    if not keep:
        return Scan(rows, None, None, shared)
    unique = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    return Scan(rows, unique, np.concatenate(digests) if digests else np.zeros((0, 32), np.uint8), shared)


def drop_keys(batch: dict[str, np.ndarray], *, keys: np.ndarray) -> dict[str, np.ndarray]:
    """``map_batches`` function: the rows whose key is not in ``keys`` (forget-retain overlap)."""
    keep = ~np.isin(np.asarray(batch["sample_id"], dtype=np.int64), keys)
    return {column: values[keep] for column, values in batch.items()}


# --------------------------------------------------------------------------- the worker's stream


def shard_features(shard, *, seed: int, epoch: int, shuffle_rows: int) -> Iterator[dict]:
    """This worker's rows of one epoch, as feature dicts, shuffled in a bounded buffer seeded by
    ``seed`` and ``epoch``."""
    from pipelines.data import batch_features

    batches = shard.iter_batches(batch_size=256, batch_format="numpy",
                                 local_shuffle_buffer_size=shuffle_rows or None,
                                 local_shuffle_seed=(seed * 100_003 + epoch) if shuffle_rows else None)
    for batch in batches:
        yield from batch_features(batch)


def windowed_batches(features: Iterator[dict], *, batch_size: int, pad_token_id: int, seed: int,
                     bucket: bool, window: int = 32) -> Iterator[dict]:
    """Padded batches from a stream of features: ``window`` batches' worth of rows at a time is
    shuffled, length-bucketed and cut (``unlearn.workflow.make_batches``), so memory stays bounded
    and every full window gives the same number of batches on every rank."""
    from unlearn.workflow import make_batches

    rng = random.Random(seed)
    iterator = iter(features)
    while chunk := list(itertools.islice(iterator, batch_size * window)):
        yield from make_batches(chunk, batch_size, pad_token_id, shuffle=True, seed=rng.randrange(2**31),
                                bucket=bucket)


def batches_per_epoch(rows: int, world: int, batch_size: int) -> int:
    """Batches each rank gets from ``rows`` split equally over ``world`` ranks."""
    per_rank = rows // world
    return -(-per_rank // batch_size)


def local_batch_size(batch_size: int, world: int) -> int:
    """Rows per rank and step: ``train.batch_size`` is the global batch, as in the deterministic mode."""
    if batch_size < world:
        raise DataError(f"train.batch_size {batch_size} is smaller than ray.num_workers {world}: "
                        "every worker needs at least one row per step")
    return batch_size // world


class ShardStream:
    """One dataset shard of this worker, as an epoch of padded batches."""

    def __init__(self, shard, *, rows: int, world: int, batch_size: int, pad_token_id: int, seed: int,
                 bucket: bool, shuffle_rows: int, name: str) -> None:
        self.shard, self.name = shard, name
        self.batch_size = local_batch_size(batch_size, world)
        self.expected = batches_per_epoch(rows, world, self.batch_size)
        self.pad, self.seed, self.bucket, self.shuffle_rows = pad_token_id, seed, bucket, shuffle_rows

    def epoch(self, epoch: int) -> Iterator[dict]:
        features = shard_features(self.shard, seed=self.seed, epoch=epoch, shuffle_rows=self.shuffle_rows)
        batches = windowed_batches(features, batch_size=self.batch_size, pad_token_id=self.pad,
                                   seed=self.seed * 7919 + epoch, bucket=self.bucket)
        count = 0
        for batch in itertools.islice(batches, self.expected):
            count += 1
            yield batch
        if count < self.expected:  # a short rank would leave the others waiting in a collective
            raise RuntimeError(f"the {self.name} shard gave {count} batches, {self.expected} expected")

    def cycle(self) -> Iterator[dict]:
        """Epoch after epoch, for the retain stream that pairs with every forget batch."""
        for epoch in itertools.count():
            yield from self.epoch(10_000 + epoch)


def stream_pairs(forget: ShardStream, retain: Iterator[dict] | None, epoch: int) -> Iterator[tuple]:
    """This rank's (forget, retain) pairs of one epoch: a pass over the forget shard, the retain
    stream (:meth:`ShardStream.cycle`, kept across epochs) going on beside it."""
    for batch in forget.epoch(epoch):
        yield batch, None if retain is None else next(retain)


# --------------------------------------------------------------------------- the driver's plan


@dataclass
class StreamPlan:
    """The Ray Datasets of a streamed run and what the driver's scan learnt about them."""

    datasets: dict
    rows: dict[str, int]  # training rows (windows of raw text) per split-up dataset
    forget: Scan
    overlap: int

    def forget_identity(self) -> tuple[int, str]:
        return self.forget.rows, self.forget.fingerprint()


def stream_keys(records: list | None) -> np.ndarray | None:
    if not records:
        return None
    return np.unique([question_key(r if isinstance(r, str) else r.question) for r in records])


def plan_streams(cfg, spec: str, objective, source: str, stop: list | None) -> StreamPlan:
    """Lazy datasets for the workers (``forget`` and ``retain`` split equally among them; bounded
    samples ``forget_sample``, ``retain_sample``, ``proxy`` whole), after one validating scan.

    Raises :class:`DataError` (file, row, field) for the first bad row of either set, for an
    empty split and for a ``stop.split`` that shares questions with the training data.
    """
    try:
        with quiet_data_errors():
            return _build_plan(cfg, spec, objective, source, stop)
    except Exception as exc:  # noqa: BLE001 - a read task's DataError arrives wrapped by Ray
        found = data_error(exc)
        if found is None:
            raise
        raise found from None


def _build_plan(cfg, spec: str, objective, source: str, stop: list | None) -> StreamPlan:
    from pipelines.data import tokenize

    data = cfg.data
    kind = "text" if data.benchmark == "muse" else "qa"
    cpus = min(1.0, cfg.ray.data_cpus)  # a task asking for more than the data path has would never run

    def tokenized(dataset, prefix_tokens=None):
        return tokenize(dataset, spec, max_length=data.max_length, prefix_tokens=prefix_tokens,
                        num_cpus=cpus)

    def read(split):
        return read_split(source, split, kind=kind, num_cpus=cpus)

    stop_keys = stream_keys(stop) if kind == "qa" else None
    against = {} if stop_keys is None else {"stop": stop_keys}
    forget_raw = read(data.forget_split)
    forget = scan(forget_raw, against=against, keep=True)
    _check_scan(forget, source, data.forget_split, "forget")
    datasets = {"forget": tokenized(forget_raw, objective.prefix_tokens()),
                "forget_sample": tokenized(forget_raw.limit(data.sample_rows))}
    rows, overlap = {"forget": forget.rows}, 0
    if objective.wants_retain():
        retain_raw = read(data.retain_split)
        if kind == "qa":
            against = {**against, "forget": forget.keys}
        retain = scan(retain_raw, against=against)
        _check_scan(retain, source, data.retain_split, "retain")
        overlap = retain.shared_with.get("forget", 0)
        if overlap:
            log.warning("%d retain question(s) also appear in the forget set%s", overlap,
                        "; dropped from retain" if data.drop_overlap else "")
            if data.drop_overlap:
                retain_raw = retain_raw.map_batches(drop_keys, fn_kwargs={"keys": forget.keys},
                                                    batch_format="numpy", num_cpus=cpus)
        rows["retain"] = retain.rows - (overlap if data.drop_overlap else 0)
        if rows["retain"] == 0:
            raise DataError(f"{source} split {data.retain_split}: every retain question is in the "
                            "forget set")
        datasets["retain"] = tokenized(retain_raw)
        datasets["retain_sample"] = tokenized(retain_raw.limit(data.sample_rows))
    if data.proxy_split and objective.name == "egup":
        datasets["proxy"] = tokenized(read(data.proxy_split).limit(data.sample_rows))
    if kind == "text":  # the number of max_length windows is known once tokenised
        rows = {name: scan(datasets[name]).rows for name in rows}
    return StreamPlan(datasets, rows, forget, overlap)


def _check_scan(result: Scan, source: str, split: str, name: str) -> None:
    if result.rows == 0:
        raise DataError(f"{source} split {split}: the split is empty")
    if result.shared_with.get("stop"):
        raise DataError(f"stop.split shares {result.shared_with['stop']} question(s) with the {name} "
                        "split: it must hold records the model never saw")


def stream_data_config(split: list[str]):
    """Ray Train's DataConfig for a streamed run: ``split`` datasets go to the workers through
    ``streaming_split(N, equal=True)``, in the order the files were read (``preserve_order``), so
    which rows land on which rank does not depend on task timing; the others go whole to each."""
    import copy

    from ray.data import DataContext
    from ray.train import DataConfig

    # A copy of the current options (what Train would apply), without constructing new ones:
    # that passes exclude_resources and prints Ray's deprecation warning on every run.
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(datasets_to_split=split, execution_options=options)


# --------------------------------------------------------------------------- a probe without a model


def probe_worker(config: dict) -> None:
    """Ray Train worker: walk this rank's streamed epochs exactly as training batches them, with
    no model; write what it saw (sample ids per batch when asked), its tokens/s and peak RSS."""
    import time

    import ray.train
    import torch

    from pipelines.train import peak_memory_mib

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    stream = ShardStream(ray.train.get_dataset_shard("forget"), rows=config["rows"], world=world,
                         batch_size=config["batch_size"], pad_token_id=config["pad_token_id"],
                         seed=config["seed"], bucket=True, shuffle_rows=config["shuffle_rows"], name="forget")
    epochs = []
    for epoch in config["epochs"]:
        start, tokens, ids = time.perf_counter(), 0, []
        for batch in stream.epoch(epoch):
            tokens += int(batch["attention_mask"].sum())
            if config["keep_ids"]:
                ids.append(batch["sample_id"].tolist())
        seconds = time.perf_counter() - start
        epochs.append({"batches": stream.expected, "tokens": tokens, "seconds": seconds,
                       "tokens_per_s": tokens / seconds if seconds else float("nan"), "ids": ids})
    record = {"rank": rank, "world": world, "epochs": epochs,
              "peak_rss_mib": peak_memory_mib(torch.device("cpu"))}
    with open(f"{config['out_dir']}/rank{rank}.json", "w") as out:
        json.dump(record, out)
    ray.train.report({"done": 1.0})


def probe_streams(dataset, *, rows: int, workers: int, batch_size: int, pad_token_id: int, seed: int,
                  epochs: list[int], out_dir: str, cpus_per_worker: float = 0.5, shuffle_rows: int = 1024,
                  keep_ids: bool = True) -> list[dict]:
    """Run :func:`probe_worker` on ``workers`` Ray Train workers over ``dataset`` (split equally,
    as training splits ``forget``) for the given epoch numbers (an epoch number again replays that
    epoch); each rank's record, in rank order."""
    from pathlib import Path

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    config = {"rows": rows, "batch_size": batch_size, "pad_token_id": pad_token_id, "seed": seed,
              "epochs": epochs, "shuffle_rows": shuffle_rows, "keep_ids": keep_ids, "out_dir": out_dir}
    trainer = TorchTrainer(probe_worker, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=workers,
                                                        resources_per_worker={"CPU": cpus_per_worker}),
                           run_config=RunConfig(name=f"probe-{Path(out_dir).name}", storage_path=out_dir),
                           datasets={"forget": dataset},
                           dataset_config=stream_data_config(["forget"]))
    trainer.fit()
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(workers)]
