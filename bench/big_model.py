"""A model bigger than one worker may hold, trained on 2 sharded workers under a memory limit.

    .venv/bin/python bench/big_model.py                 # ~0.5B Llama shape, 6 GiB per worker
    .venv/bin/python bench/big_model.py --control       # and one process under the same limit

A random-init Llama-shaped model (hidden 1280, 24 layers, MLP 3584, vocab 32000, untied head:
~511M parameters) is saved as a safetensors folder. Its fp32 weights, gradients and AdamW states
need ~8.2 GB, more than the limit. Each of 2 gloo ranks puts itself in its own memory cgroup
(v1, ``memory.limit_in_bytes``; root only: without one the limit is reported as not enforced),
loads its shard (``pipelines.fsdp.load_sharded``), trains 3 AdamW steps on 2 x 128 random tokens
and the ranks export the model (``export_sharded``), which ``from_pretrained`` reads back. Printed:
each rank's peak resident memory (VmHWM) and the cgroup's peak, the seconds per step, the
export's files. glibc's ``MALLOC_MMAP_THRESHOLD_`` is set to 1 MiB for the workers.
``--control`` runs the same in one process, unsharded, under the same limit
(expected: killed by the kernel when AdamW creates its states).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shard_memory import free_port, status_mib  # noqa: E402 - bench/ is the script's own folder

CGROUPS = Path("/sys/fs/cgroup/memory")
SHAPE = {"hidden_size": 1280, "intermediate_size": 3584, "num_hidden_layers": 24, "num_attention_heads": 20,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 512,
         "tie_word_embeddings": False}


def _limit_memory(name: str, limit_bytes: int) -> Path | None:
    """Move this process into its own memory cgroup capped at ``limit_bytes`` (None: not possible)."""
    group = CGROUPS / name
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        (group / "memory.max_usage_in_bytes").write_text("0")
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError:
        return None
    return group


def make_model(folder: Path) -> int:
    """Save a random-init model of ``SHAPE`` (and the tiny model's tokenizer) into ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from unlearn.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="1GB")
    load_tokenizer("tiny").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _train(rank: int, world: int, folder: str, port: int, limit: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from unlearn.models import load_model, load_tokenizer

    group = _limit_memory(f"unlearn-bench-{os.getpid()}", limit)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    record: dict = {"cgroup": group is not None}
    start = time.perf_counter()
    if world > 1:
        from pipelines.fsdp import export_sharded, load_sharded

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = load_sharded(folder)
    else:
        model = load_model(folder)
    record["load_s"] = time.perf_counter() - start
    record["load_peak_mib"] = status_mib("VmHWM")
    print(f"rank {rank}: loaded in {record['load_s']:.1f} s, peak {record['load_peak_mib']:.0f} MiB",
          flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, SHAPE["vocab_size"], (2, 128), generator=generator)
        began = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
        print(f"rank {rank}: step {len(times)} in {times[-1]:.1f} s, peak {status_mib('VmHWM'):.0f} MiB",
              flush=True)
    record["step_s"] = times
    record["step_peak_mib"] = status_mib("VmHWM")
    if world > 1:
        began = time.perf_counter()
        export_sharded(model, load_tokenizer("tiny"), folder, Path(out + ".export"), max_shard_bytes=1 << 30)
        record["export_s"] = time.perf_counter() - began
        record["export_peak_mib"] = status_mib("VmHWM")
        dist.barrier()  # a peer torn down mid-traffic can abort gloo
        dist.destroy_process_group()
    if group is not None:
        record["cgroup_peak_mib"] = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
    Path(f"{out}.{rank}").write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-gib", type=float, default=6.0, help="memory limit per worker")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--control", action="store_true", help="also one unsharded process under the limit")
    args = parser.parse_args(argv)
    limit = int(args.limit_gib * 2**30)
    # glibc returns freed blocks above 1 MiB to the OS instead of keeping them in its heap (the
    # workers' peaks were 6.6 GiB without, 5.1 with; bench/step.py measures the same effect)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        params = make_model(folder)
        need = params * 4 * 4 / 2**30
        print(f"model: {params / 1e6:.0f}M parameters; fp32 weights + gradients + AdamW states "
              f"{need:.1f} GiB; limit {args.limit_gib:g} GiB per worker")
        out = str(Path(tmp) / "result")
        mp.spawn(_train, args=(2, str(folder), free_port(), limit, args.steps, out), nprocs=2)
        for rank in range(2):
            r = json.loads(Path(f"{out}.{rank}").read_text())
            print(f"rank {rank}: load {r['load_s']:.1f} s, peak {r['load_peak_mib']:.0f} MiB; steps "
                  f"{', '.join(f'{s:.1f}' for s in r['step_s'])} s, peak {r['step_peak_mib']:.0f} MiB; "
                  f"export {r['export_s']:.1f} s, peak {r['export_peak_mib']:.0f} MiB; cgroup peak "
                  + (f"{r['cgroup_peak_mib']:.0f} MiB" if r["cgroup"] else "n/a (limit not enforced)"))
        export = Path(out + ".export")
        files = sorted(p.name for p in export.glob("*.safetensors"))
        from transformers import AutoModelForCausalLM

        read_back = AutoModelForCausalLM.from_pretrained(export)
        print(f"export: {len(files)} safetensors files + index; from_pretrained reads back "
              f"{sum(p.numel() for p in read_back.parameters()) / 1e6:.0f}M parameters")
        del read_back
        if args.control:
            context = mp.spawn(_train, args=(1, str(folder), 0, limit, args.steps, out + "-one"), nprocs=1,
                               join=False)
            try:
                context.join()
                r = json.loads(Path(f"{out}-one.0").read_text())
                print(f"one process: finished, step peak {r['step_peak_mib']:.0f} MiB")
            except Exception as exc:  # noqa: BLE001 - the kernel's OOM kill surfaces as a spawn error
                print(f"one process under the same limit: {type(exc).__name__}: {exc}".splitlines()[0])
    for group in CGROUPS.glob("unlearn-bench-*"):  # empty once their process has exited
        try:
            group.rmdir()
        except OSError:
            pass


if __name__ == "__main__":
    main()
