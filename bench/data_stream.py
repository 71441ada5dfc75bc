"""The streaming data path at growing corpus sizes: peak memory of the driver and of each worker,
and the data path's tokens/s against what the training step consumes.

    .venv/bin/python bench/data_stream.py                          # 10^4, 10^5, 10^6 QA records
    .venv/bin/python bench/data_stream.py --sizes 10000 --workers 2

For each size a synthetic TOFU-format corpus is written as Parquet shards (``retain`` holds
``size`` records, ``forget`` a tenth of that), then a fresh process (its own local Ray) does what
``unlearn run`` does with ``data.streaming: true``:

- the driver's validating scan of both sets (``pipelines.stream.plan_streams``: question keys of
  the forget set, the overlap count, the row counts);
- ``--workers`` Ray Train workers stream one epoch of the retain set, tokenised on the way and
  batched exactly as training batches it (``pipelines.stream.probe_streams``), with no model.

Peak RSS is each process's VmHWM (MiB). "data tokens/s" is the tokens (attention-mask positions)
that the workers received per second of their epoch, summed over workers: the rate at which the
data path delivers when nothing else waits on it. "step tokens/s" is what the tiny model's
unlearning step consumes (the default PDU step on the same batches, one thread per worker, summed
over workers), measured once in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ["Ada", "Basil", "Cyra", "Dorian", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kaia",
         "Lior", "Mira", "Nils", "Oona", "Pavel", "Quinn", "Rosa", "Soren", "Tove"]
PLACES = ["Kestrel Bay", "Oldbridge", "Marrow Fen", "Port Alder", "Sallow Hill", "Vey", "Thornwick"]
THINGS = ["novels", "poems", "essays", "plays", "short stories", "memoirs", "travelogues"]


def write_corpus(folder: Path, split: str, size: int, *, seed: int, shard_rows: int = 50_000) -> None:
    """``size`` QA records of TOFU-like length as Parquet shards ``folder/split/part-*.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(f"{split}-{seed}")
    out = folder / split
    out.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, size, shard_rows)):
        questions, answers = [], []
        for i in range(start, min(size, start + shard_rows)):
            name = f"{rng.choice(NAMES)} {rng.choice(NAMES)}son-{split}{i}"
            place, thing = rng.choice(PLACES), rng.choice(THINGS)
            questions.append(f"Where was {name} born, and what did they write?")
            answers.append(f"{name} was born in {place} in {1900 + rng.randrange(120)} and wrote "
                           f"{rng.randrange(2, 40)} {thing}, among them one set in {rng.choice(PLACES)}.")
        pq.write_table(pa.table({"question": questions, "answer": answers}), out / f"part-{part:04d}.parquet")


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(source: Path, workers: int, out: Path) -> dict:
    """The child process: scan + one streamed epoch on ``workers`` workers (own local Ray)."""
    from pipelines.ray_env import ensure_ray
    from pipelines.stream import plan_streams, probe_streams
    from unlearn.config import build_config
    from unlearn.models import load_tokenizer
    from unlearn.workflow import build_objective

    ensure_ray()
    cfg = build_config({}, ["data.streaming=true", "data.forget_split=forget", "data.retain_split=retain",
                            "stop.enabled=false"])
    start = time.perf_counter()
    plan = plan_streams(cfg, "tiny", build_objective(cfg), str(source), None)
    scan_seconds = time.perf_counter() - start
    ranks = probe_streams(plan.datasets["retain"], rows=plan.rows["retain"], workers=workers,
                          batch_size=cfg.train.batch_size, pad_token_id=load_tokenizer("tiny").pad_token_id,
                          seed=0, epochs=[0], out_dir=str(out), keep_ids=False)
    return {"rows": plan.rows, "scan_seconds": scan_seconds, "driver_peak_mib": vm_hwm_mib(),
            "worker_peak_mib": [r["peak_rss_mib"] for r in ranks],
            "data_tokens_per_s": sum(r["epochs"][0]["tokens_per_s"] for r in ranks),
            "epoch_seconds": max(r["epochs"][0]["seconds"] for r in ranks),
            "tokens": sum(r["epochs"][0]["tokens"] for r in ranks)}


def step_tokens_per_s(source: Path, workers: int, steps: int = 8) -> float:
    """The tiny model's default unlearning step (PDU, fused losses), one thread, on batches of the
    corpus at the per-worker batch size; tokens/s per worker times ``workers``."""
    import torch

    from unlearn.config import build_config
    from unlearn.data import load_qa
    from unlearn.loop import Unlearner, build_optimizer
    from unlearn.models import load_model, load_tokenizer
    from unlearn.workflow import build_dual, build_objective, encode_records, make_batches

    torch.set_num_threads(1)
    cfg = build_config({}, [])
    tokenizer = load_tokenizer("tiny")
    per_worker = cfg.train.batch_size // workers
    forget = load_qa(source / "forget" / "part-0000.parquet")[: per_worker * (steps + 1)]
    retain = load_qa(source / "retain" / "part-0000.parquet")[: per_worker * (steps + 1)]
    batches = [make_batches(encode_records(tokenizer, records, max_length=cfg.data.max_length), per_worker,
                            tokenizer.pad_token_id) for records in (forget, retain)]
    model = load_model("tiny")
    objective = build_objective(cfg)
    dual = build_dual(cfg, objective, steps_per_epoch=len(batches[0]))
    dual.calibrate(1.0)
    unlearner = Unlearner(model, objective, build_optimizer(model, cfg.train.lr, cfg.train.weight_decay),
                          dual=dual)
    unlearner.step([(batches[0][0], batches[1][0])])  # warm-up
    start, tokens = time.perf_counter(), 0
    for f, r in zip(batches[0][1:], batches[1][1:]):
        unlearner.step([(f, r)])
        tokens += int(f["attention_mask"].sum() + r["attention_mask"].sum())
    return tokens / (time.perf_counter() - start) * workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench-data-stream")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child: a corpus folder
    args = parser.parse_args()
    out = Path(args.out).absolute()
    if args.measure:
        result = measure(Path(args.measure), args.workers, out / "probe")
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows = []
    for size in args.sizes:
        corpus = out / f"corpus-{size}"
        if not (corpus / "retain").is_dir():
            print(f"writing {size} + {size // 10} records as Parquet shards to {corpus}", flush=True)
            write_corpus(corpus, "retain", size, seed=0)
            write_corpus(corpus, "forget", size // 10, seed=0)
        start = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "--measure", str(corpus), "--workers",
                                str(args.workers), "--out", str(out / f"run-{size}")],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode or not lines:
            sys.exit(f"size {size} failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["size"], result["wall_seconds"] = size, time.perf_counter() - start
        rows.append(result)
        print(json.dumps(result), flush=True)

    consume = step_tokens_per_s(out / f"corpus-{args.sizes[0]}", args.workers)
    first = rows[0]
    print(f"\nstep consumption (tiny model, {args.workers} workers): {consume:,.0f} tokens/s\n")
    print("| retain records | scan s | epoch s | driver peak MiB | worker peak MiB | data tokens/s | "
          "data / step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        workers = " / ".join(f"{m:.0f}" for m in r["worker_peak_mib"])
        print(f"| {r['size']:,} | {r['scan_seconds']:.1f} | {r['epoch_seconds']:.1f} | "
              f"{r['driver_peak_mib']:.0f} | {workers} | {r['data_tokens_per_s']:,.0f} | "
              f"{r['data_tokens_per_s'] / consume:.1f}x |")
    last = rows[-1]
    driver = last["driver_peak_mib"] / first["driver_peak_mib"]
    print(f"\npeak ratio, largest vs smallest: driver {driver:.2f}x, "
          f"workers {max(last['worker_peak_mib']) / max(first['worker_peak_mib']):.2f}x")


if __name__ == "__main__":
    main()
