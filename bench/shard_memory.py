"""Peak resident memory per worker: loading a model and its first training step, three ways.

    .venv/bin/python bench/shard_memory.py                  # SmolLM2-135M, 2 workers
    .venv/bin/python bench/shard_memory.py --model tiny --workers 2

- ``one process``: ``from_pretrained`` (``unlearn.models.load_model``), no FSDP;
- ``replicated``: each of N gloo ranks loads the whole model, then ``fully_shard`` (how the Ray
  workers loaded before ``load_sharded``);
- ``sharded``: each rank builds the model on the meta device, shards it and reads only its shard
  (``pipelines.fsdp.load_sharded``, what the Ray workers do now).

Figures in MiB from Linux /proc (VmHWM, the peak resident set, reset after the imports):
``load`` is the peak while loading, ``step`` the peak during one AdamW step on a global batch of
8 x 128 tokens, each rank taking its 1/N of it (``--no-split``: all of it), forward, backward,
optimizer states created; and ``floor`` the process before loading (Python,
torch, transformers). Each configuration runs in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


BATCH = 8  # sequences of 128 tokens in the measured step (one process); each rank takes 1/N


def status_mib(field: str) -> float:
    """A memory field of this process's /proc status (VmRSS, VmHWM...), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _step(model, vocab: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, 128), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()


def _measure(rank: int, mode: str, spec: str, world: int, port: int, out: str, rows: int) -> None:
    import torch.distributed as dist
    from transformers import AutoConfig

    from pipelines.fsdp import load_sharded, shard_model
    from unlearn.models import load_model, resolve_model_path

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if mode != "one process":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    vocab = AutoConfig.from_pretrained(resolve_model_path(spec)).vocab_size
    _reset_peak()
    floor = status_mib("VmRSS")
    if mode == "sharded":
        model = load_sharded(spec)
    else:
        model = load_model(spec)
        if mode == "replicated":
            shard_model(model)
    load = status_mib("VmHWM")
    _reset_peak()
    _step(model, vocab, rows)
    step = status_mib("VmHWM")
    Path(f"{out}.{rank}").write_text(json.dumps({"floor": floor, "load": load, "step": step}))
    if dist.is_initialized():
        dist.barrier()  # a peer torn down mid-traffic can abort gloo
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(mode: str, spec: str, workers: int, out: str, split: bool) -> list[dict]:
    world = 1 if mode == "one process" else workers
    rows = BATCH // world if split else BATCH
    mp.spawn(_measure, args=(mode, spec, world, free_port(), out, rows), nprocs=world)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-split", dest="split", action="store_false",
                        help="every rank steps on the whole batch (default: its 1/N of it, as data "
                             "parallel training does)")
    args = parser.parse_args(argv)
    from unlearn.models import resolve_model_path

    spec = resolve_model_path(args.model)  # converted once here, not by every rank at once
    out = f"/tmp/shard_memory_{os.getpid()}"
    rows = {mode: run(mode, spec, args.workers, out, args.split)
            for mode in ("one process", "replicated", "sharded")}
    single = rows["one process"][0]
    per_rank = BATCH // args.workers if args.split else BATCH
    print(f"{args.model}, {args.workers} workers, step on {BATCH} x 128 tokens in one process and "
          f"{per_rank} x 128 per rank; MiB per process (worst worker); ratio = x one process")
    print(f"{'mode':<12} {'floor':>7} {'load peak':>10} {'ratio':>6} {'step peak':>10} {'ratio':>6}")
    for mode, ranks in rows.items():
        worst = {key: max(r[key] for r in ranks) for key in ("floor", "load", "step")}
        print(f"{mode:<12} {worst['floor']:7.0f} {worst['load']:10.0f} {worst['load'] / single['load']:6.2f} "
              f"{worst['step']:10.0f} {worst['step'] / single['step']:6.2f}")


if __name__ == "__main__":
    main()
