"""The streaming data path (data.streaming): shard folders and URIs, validation in the stream,
bounded batching windows, each worker its own slice, and the pipeline end to end."""

import json
import shutil
from pathlib import Path

import pytest

from unlearn.data import DataError, load_qa, read_rows
from unlearn.data.loaders import fingerprint, question_key, record_digest
from unlearn.data.synthetic import synthetic_source

SPLITS = ("forget10", "retain90", "validation10", "holdout10", "full")


def write_shards(source: Path, out: Path, *, parts: int = 3) -> Path:
    """The synthetic TOFU source, its training splits cut into shards of mixed formats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.stem not in SPLITS:
            shutil.copy(path, out / path.name)
    for split in SPLITS:
        rows, _ = read_rows(source, split)
        folder = out / split
        folder.mkdir()
        for i in range(parts):
            part = rows[i * len(rows) // parts:(i + 1) * len(rows) // parts]
            if i == 1:  # one shard as JSON Lines, the others Parquet
                (folder / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
            else:
                pq.write_table(pa.Table.from_pylist(part), folder / f"part-{i}.parquet")
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return synthetic_source("tofu", tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory):
    return write_shards(source, tmp_path_factory.mktemp("sharded") / "data")


# --------------------------------------------------------------------------- reading, no Ray


def test_a_folder_of_shards_and_its_uri_read_like_the_single_file(source, shards):
    whole = load_qa(source, "forget10")
    assert load_qa(shards, "forget10") == whole  # shards in name order, mixed formats
    assert load_qa(f"file://{shards}", "forget10") == whole
    assert load_qa(f"file://{source}", "forget10") == whole


def test_a_bad_row_names_the_shard_the_row_and_the_field(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    shard = bad / "forget10" / "part-1.jsonl"
    rows = [json.loads(line) for line in shard.read_text().splitlines()]
    rows[2]["answer"] = "  "
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"forget10/part-1\.jsonl row 2: field 'answer' is empty"):
        load_qa(bad, "forget10")
    with pytest.raises(DataError, match="no file for split 'forget99'.*folder forget99/"):
        load_qa(bad, "forget99")
    with pytest.raises(DataError, match="not found"):
        load_qa("file:///no/such/place", "forget10")


def test_fingerprint_ignores_order_and_sharding_but_not_content(source):
    records = load_qa(source, "forget10")
    digests = [record_digest(r) for r in records]
    assert fingerprint(digests) == fingerprint(digests[::-1])
    edited = records[0].__class__(question=records[0].question, answer="other")
    changed = [record_digest(edited)] + digests[1:]
    assert fingerprint(changed) != fingerprint(digests)


def test_question_keys_ignore_case_and_spacing_only():
    assert question_key("Where was  Ada born?") == question_key("where was ada born? ")
    assert question_key("Where was Ada born?") != question_key("Where was Ada raised?")
    assert 0 <= question_key("x") < 2**63


def test_raw_text_is_cut_into_windows_that_cover_it(tmp_path):
    from unlearn.data import encode_text, encode_text_windows
    from unlearn.data.synthetic import corpus_texts, generate_tofu
    from unlearn.models import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(corpus_texts(generate_tofu(seed=0)), vocab_size=400)
    text = " ".join(corpus_texts(generate_tofu(seed=0))[:6])
    windows = encode_text_windows(tokenizer, text, max_length=16)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for w in windows for t in w["input_ids"]] == ids
    assert all(len(w["input_ids"]) == 16 for w in windows[:-1])
    assert 1 <= len(windows[-1]["input_ids"]) <= 16
    assert all(w["labels"] == w["input_ids"] for w in windows)
    short = encode_text_windows(tokenizer, "Ada", max_length=16)
    assert short == [encode_text(tokenizer, "Ada", max_length=16)]


# --------------------------------------------------------------------------- batching windows


def _features(n, seed=0):
    import random

    rng = random.Random(seed)
    return [{"input_ids": [1] * rng.randint(2, 40), "attention_mask": [1] * 2, "labels": [1] * 2,
             "sample_id": i} for i in range(n)]


def test_windowed_batches_cover_each_row_once_within_bounded_windows():
    pytest.importorskip("ray")
    from pipelines.stream import windowed_batches

    features = _features(100)
    for f in features:  # collate needs equal-length columns
        f["attention_mask"] = f["labels"] = [1] * len(f["input_ids"])
    def make(seed):
        return list(windowed_batches(iter(features), batch_size=3, pad_token_id=0, seed=seed, bucket=True,
                                     window=4))

    batches = make(5)
    ids = [b["sample_id"].tolist() for b in batches]
    assert sorted(i for batch in ids for i in batch) == list(range(100))
    assert len(batches) == 8 * 4 + 2  # 8 full windows of 12 rows = 4 batches each; 4 rows left: 2 batches
    # bounded: a batch only mixes rows of its own window of 12
    assert all(len({i // 12 for i in batch}) == 1 for batch in ids)
    assert [b["sample_id"].tolist() for b in make(5)] == ids
    assert [b["sample_id"].tolist() for b in make(6)] != ids


def test_steps_are_counted_from_rows_and_the_global_batch():
    pytest.importorskip("ray")
    from pipelines.stream import batches_per_epoch, local_batch_size

    assert local_batch_size(4, 2) == 2 and local_batch_size(5, 2) == 2
    assert batches_per_epoch(33, 2, 2) == 8  # 16 rows per rank (one dropped), 2 a batch
    with pytest.raises(DataError, match="train.batch_size 1 is smaller than ray.num_workers 2"):
        local_batch_size(1, 2)


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from pipelines.ray_env import ensure_ray

    ensure_ray()


def _plan(source, *overrides, stop=None):
    from pipelines.stream import plan_streams
    from unlearn.config import build_config
    from unlearn.workflow import build_objective

    cfg = build_config({}, ["data.streaming=true", *overrides])
    return cfg, plan_streams(cfg, "tiny", build_objective(cfg), str(source), stop)


def _all_ids(dataset):
    batches = dataset.iter_batches(batch_size=256, batch_format="numpy")
    return [int(i) for batch in batches for i in batch["sample_id"]]


@pytest.mark.slow
def test_scan_counts_validates_and_drops_the_overlap_by_question_key(ray_cluster, source, shards, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unlearn.workflow import UnlearnData

    forget, retain = load_qa(source, "forget10"), load_qa(source, "retain90")
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    leaked = [{"question": "  " + r.question.upper(), "answer": r.answer} for r in forget[:3]]
    pq.write_table(pa.Table.from_pylist(leaked), data / "retain90" / "part-9.parquet")

    _, plan = _plan(f"file://{data}")
    assert plan.rows == {"forget": len(forget), "retain": len(retain)} and plan.overlap == 3
    assert plan.forget_identity() == UnlearnData(forget, retain, None, None, "").forget_identity()
    kept = _all_ids(plan.datasets["retain"])
    assert len(kept) == len(retain) and not set(kept) & {question_key(r.question) for r in forget}
    assert len(_all_ids(plan.datasets["retain_sample"])) == min(2048, len(retain))

    # a bad row in a later shard fails the scan, naming it, before anything trains
    (data / "retain90" / "part-3.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": 7}\n')
    with pytest.raises(DataError, match=r"retain90/part-3\.jsonl row 1: field 'answer' is missing") as err:
        _plan(f"file://{data}")
    assert "Traceback" not in str(err.value)
    # early stopping's never-seen split must not share a question with the training data
    with pytest.raises(DataError, match="stop.split shares 1 question"):
        _plan(source, stop=forget[:1])


@pytest.mark.slow
def test_each_worker_streams_only_its_own_slice_reproducibly(ray_cluster, shards, tmp_path):
    from pipelines.stream import probe_streams

    _, plan = _plan(shards)
    rows = plan.rows["retain"]
    ranks = probe_streams(plan.datasets["retain"], rows=rows, workers=2, batch_size=4, pad_token_id=0, seed=3,
                          epochs=[0, 1, 0], out_dir=str(tmp_path))
    seen = [[i for batch in r["epochs"][0]["ids"] for i in batch] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == rows // 2  # equal halves ...
    assert not set(seen[0]) & set(seen[1])  # ... and disjoint: each rank holds its own slice
    assert all(len(e["ids"]) == e["batches"] == -(-(rows // 2) // 2) for r in ranks for e in r["epochs"])
    # the global batch of 4, halved
    assert all(len(batch) <= 2 for r in ranks for batch in r["epochs"][0]["ids"])
    for r in ranks:
        first, second, replayed = (e["ids"] for e in r["epochs"])
        assert second != first  # every epoch is shuffled anew ...
        assert replayed == first  # ... from its seed: epoch 0 again streams the same batches


@pytest.mark.slow
def test_streamed_pipeline_from_a_uri_on_two_workers(ray_cluster, finetuned, shards, tmp_path):
    from mlflow import MlflowClient

    from pipelines.run import run_pipeline
    from unlearn.config import build_config

    _, report, _ = finetuned
    cfg = build_config({}, [f"output_dir={tmp_path / 'out'}", "run_name=streamed",
                            f"data.source=file://{shards}",
                            "data.streaming=true", "ray.cpus_per_worker=0.5", "train.epochs=2",
                            "train.lr=1e-3",  # 5x the defaults': 2 epochs of them barely move some targets
                            "eval.before=false", "eval.max_new_tokens=16", "ray.checkpoint_every=2",
                            "stop.checks_per_epoch=1",
                            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    summary = run_pipeline(cfg, report["target"], reference=report["retain"])
    forget_rows = len(load_qa(shards, "forget10"))
    steps_per_epoch = -(-(forget_rows // 2) // 2)  # each rank: half the rows, half the global batch of 4
    client = MlflowClient(summary["mlflow_tracking_uri"])
    logged = sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "forget_loss"))
    assert logged == list(range(1, 2 * steps_per_epoch + 1))  # every step once, on every rank alike
    assert summary["after"]["forget_prob"] < report["forget_prob"]["target"] - 0.03
    assert list(summary["stop"]["auc_by_epoch"]) == ["1"]  # checked on the forget sample after epoch 1
    assert (Path(summary["model_dir"]) / "config.json").is_file()


@pytest.mark.slow
def test_raw_text_streams_as_max_length_windows(ray_cluster, tmp_path):
    from unlearn.data import encode_text_windows, load_texts
    from unlearn.models import load_tokenizer

    muse = synthetic_source("muse", tmp_path)
    _, plan = _plan(muse, "data.benchmark=muse", "data.forget_split=raw/forget",
                    "data.retain_split=raw/retain1", "data.proxy_split=null", "data.full_split=null",
                    "stop.enabled=false", "method.name=npo", "data.max_length=32")
    tokenizer = load_tokenizer("tiny")
    texts = load_texts(muse, "raw/forget")
    expected = {question_key(text): [i for window in encode_text_windows(tokenizer, text, max_length=32)
                                     for i in window["input_ids"]] for text in texts}
    streamed: dict[int, list[int]] = {}
    for batch in plan.datasets["forget"].iter_batches(batch_size=64, batch_format="numpy"):
        for key, ids in zip(batch["sample_id"], batch["input_ids"]):
            assert len(ids) <= 32
            streamed.setdefault(int(key), []).extend(int(i) for i in ids)
    assert streamed == expected  # every text whole, in order, cut into windows of at most 32
    assert plan.rows["forget"] == sum(-(-len(ids) // 32) for ids in expected.values())


def test_streaming_keeps_cpus_for_the_data_path_or_refuses_to_start(ray_cluster, shards, tmp_path):
    from pipelines.run import PipelineError, run_pipeline
    from unlearn.config import build_config

    from pipelines.ray_env import cluster_cpus

    # one worker per CPU of the cluster leaves none to read and tokenise with
    cpus = cluster_cpus()
    cfg = build_config({}, [f"output_dir={tmp_path}", f"data.source={shards}", "data.streaming=true",
                            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"ray.num_workers={cpus}",
                            "ray.cpus_per_worker=1"])
    with pytest.raises(PipelineError, match=f"CPU: {cpus + 1:g} needed.*keeps ray.data_cpus free"):
        run_pipeline(cfg, "tiny")
    assert not (tmp_path / "ray").exists()  # nothing started
