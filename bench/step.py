"""Seconds per optimizer step, tokens/s and peak memory: plain vs fused losses.

    .venv/bin/python bench/step.py                       # tiny model and SmolLM2-135M
    .venv/bin/python bench/step.py --models tiny --steps 3
    .venv/bin/python bench/step.py --models smollm2-135m --data ../shared/data/tofu \
        --forget-split forget01 --batch-size 4 --repeats 3     # real TOFU, 4 + 4 pairs a step

Each (model, method, path) runs in its own process, so peak memory is its own; with
``--repeats R`` each runs R times, the paths alternating, and every figure is the median.
Batch: 8 forget + 8 retain QA pairs of the synthetic TOFU set (TOFU-like lengths,
length-bucketed), AdamW; ``--data`` takes a TOFU folder instead (``--forget-split``, retain90).

Memory, two figures (Linux /proc, in MiB):
- ``peak``: the process's peak resident memory during the timed steps (VmHWM, reset after the
  warm-up step);
- ``above floor``: ``peak`` minus the floor that the loss cannot change: the process before the
  model was loaded + the parameters, their gradients and AdamW's two states (4 x parameter
  bytes, 3 x with bf16 states; + the reference model's parameters for methods that keep one).

Paths (each adds one thing to the one before):
- ``plain``: losses on the full logits ``[B,T,V]``, one backward of the whole loss (the reference);
- ``fused``: chunked losses from hidden states (``unlearn.fused``), never the full logits;
- ``fused+split``: and the backward of the forget term before the retain forward
  (``train.backward_per_term``), so one batch's activations are alive at a time; the default;
- ``fused+split+ckpt``: and activation checkpointing per decoder block;
- ``fused+split+bf16``: the default path under bf16 autocast (``train.precision: bf16``), without
  checkpointing: matmuls in bf16, fp32 weights, gradients and AdamW states;
- ``fused+split+bf16+compile``: and each decoder block compiled (``train.compile``, regional
  ``torch.compile``); the compilation itself happens in the warm-up step, outside the timing;
- ``fused+split+bf16+bf16adam``: bf16 compute and AdamW's moments stored in bf16
  (``train.optimizer_states: bf16``), and ``...+bf16adam+ckpt`` with activation checkpointing;
- ``fused+split+bf16+bf16weights``: bf16 compute with the weights, gradients and AdamW states in
  bf16 (``train.master_weights: bf16``, updates rounded stochastically): the default (``auto``)
  where the compute is bf16.

On CPU the peak resident memory also counts freed memory that glibc's heap keeps (activations
below its mmap threshold, which grows to 32 MiB); ``MALLOC_MMAP_THRESHOLD_=1048576`` in the
environment (inherited by every worker process) returns it to the OS, at some step time.
Each fresh allocation the size of the LM head (113 MB for SmolLM2) costs ~0.1 s of page faults on
a VM; ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch backs large CPU tensors with transparent huge pages)
made every path ~9% faster here, at a slightly higher peak.

On a GPU (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated`` during the timed steps
and the floor is the parameters, gradients and AdamW states alone (the allocator's own figures,
so no CUDA context and no cache). ``--random-init`` builds the model from its config with random
weights (a step's time and memory do not depend on the weights), for a machine that has the
model's config and tokenizer but not its weights: ``--models`` then takes that folder.

``--fsdp`` wraps the model (and the reference) in FSDP2 as the Ray worker does
(``pipelines.fsdp.shard_model``, one rank: gloo on CPU, NCCL on GPU, where its parameters are
gathered in bf16 for compute, fp32 for the optimizer).

``--length N`` makes every QA pair N tokens long (answers of the synthetic set joined until the
pair reaches N tokens, then cut to N) instead of the set's own TOFU-like lengths (~55 tokens with
SmolLM2's chat template).

Model FLOP utilisation (``mfu``): the FLOPs a step needs by the usual count (PaLM's: 6 per
weight of every linear layer, LM head included, per token in the batches, plus 12 x layers x
attention width x the sequence's length per token for attention; 2 and 4 of those per token for a
frozen reference's forward), over the step time and ``--peak-tflops`` (default: an H100's or
H200's dense bf16 peak, 989 TFLOP/s, where the GPU is one; none on CPU). Recomputation under
checkpointing does not count, so MFU falls with it, as it should.
``--shape llama3.2-1b`` (with ``--random-init``) swaps the model's architecture for Llama-3.2-1B's
(hidden 2048, 16 layers, MLP 8192, 32 heads, 8 KV heads, vocab 128256, tied head) and keeps its
tokenizer (``--shape smollm2-135m``: SmolLM2-135M's), so a GPU machine needs no weights at all
(``bench/gpu_check.sh`` runs both):
``bench/step.py --models tiny --random-init --shape llama3.2-1b --device cuda --fsdp
--batch-size 32 --length 256 --methods pdu --paths fused+split+bf16``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PATHS = ("plain", "fused", "fused+split", "fused+split+ckpt", "fused+split+bf16",
         "fused+split+bf16+compile", "fused+split+bf16+bf16adam", "fused+split+bf16+bf16adam+ckpt",
         "fused+split+bf16+bf16weights")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def long_records(records: list, tokenizer, length: int) -> list:
    """Each record with answers of the following records appended until it has ``length`` tokens."""
    import dataclasses

    out = []
    for i, record in enumerate(records):
        answer, j = record.answer, i + 1
        while len(tokenizer(record.question + " " + answer)["input_ids"]) < length:
            answer += " " + records[j % len(records)].answer
            j += 1
        out.append(dataclasses.replace(record, answer=answer, sensitive_spans=None))
    return out


SHAPES = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                     "vocab_size": 49152, "tie_word_embeddings": True},
    "llama3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                    "vocab_size": 128256, "tie_word_embeddings": True},
}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, per GPU


def step_flops(model, batches: list[dict], reference_batches: list[dict] = ()) -> float:
    """Model FLOPs of one training step over ``batches`` (forward + backward) and of a frozen
    reference's forward over ``reference_batches``: per token 6 (2) x the linear layers' weights,
    plus 12 (4) x layers x attention width x the sequence's length for attention."""
    from torch import nn

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = config.num_hidden_layers * config.num_attention_heads * head_dim

    def flops(batch, per_weight, per_attention):
        lengths = batch["attention_mask"].sum(dim=1).double()
        attention = per_attention * attention_width * (lengths ** 2).sum()
        return float(per_weight * linear * lengths.sum() + attention)

    return (sum(flops(b, 6, 12) for b in batches)
            + sum(flops(b, 2, 4) for b in reference_batches))


def device_peak_tflops(device: str, given: float | None) -> float | None:
    """``given``, else the dense bf16 peak of a known GPU (None on CPU or an unknown GPU)."""
    if given or not device.startswith("cuda"):
        return given
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for gpu, peak in PEAK_BF16_TFLOPS.items() if gpu in name), None)


def shaped_config(model_folder: str, shape: str | None = None):
    """The model's config, its architecture replaced by ``shape``'s where one is named."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folder)
    for key, value in SHAPES[shape].items() if shape else ():
        setattr(config, key, value)
    return config


def bench_model(model_name: str, checkpointing: bool, random_init: bool, device: str,
                shape: str | None = None):
    """The model to train: its weights, or its architecture (or ``shape``'s) with random weights."""
    from unlearn.models import enable_gradient_checkpointing, load_model, resolve_model_path

    if not random_init:
        return load_model(model_name, gradient_checkpointing=checkpointing, device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(shaped_config(resolve_model_path(model_name), shape))
    model.to(device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def shard_one_rank(models: list, cuda: bool) -> None:
    """FSDP2 over a one-rank process group, as ``pipelines.train`` shards the worker's models."""
    import torch.distributed as dist

    from pipelines.fsdp import shard_model

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    for model in models:
        shard_model(model, mixed_precision=cuda, device_type="cuda" if cuda else "cpu")


def worker(model_name: str, method: str, path: str, steps: int, batch_size: int,
           length: int | None = None, device: str = "cpu", random_init: bool = False,
           fsdp: bool = False, data: str = "synthetic", forget_split: str = "forget10",
           shape: str | None = None, peak_tflops: float | None = None) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from unlearn.data import generate_tofu, load_qa
    from unlearn.dual import DualController
    from unlearn.loop import Unlearner, build_optimizer
    from unlearn.models import frozen_copy, load_tokenizer
    from unlearn.objectives import get_objective
    from unlearn.workflow import encode_records, make_batches

    torch.manual_seed(0)
    tokenizer = load_tokenizer(model_name)
    if data == "synthetic":
        splits = generate_tofu(seed=0)
        forget_records, retain_records = splits[forget_split], splits["retain90"]
    else:
        forget_records, retain_records = load_qa(data, forget_split), load_qa(data, "retain90")
    retain_records = retain_records[:8 * batch_size]
    pad = tokenizer.pad_token_id
    if length:
        forget_records = long_records(forget_records, tokenizer, length)
        retain_records = long_records(retain_records, tokenizer, length)
    max_length = length or 256
    forget = make_batches(encode_records(tokenizer, forget_records, max_length=max_length),
                          batch_size, pad, bucket=True)
    retain = make_batches(encode_records(tokenizer, retain_records, max_length=max_length),
                          batch_size, pad, shuffle=True, bucket=True)
    cuda = device.startswith("cuda")
    before_model_kib = 0 if cuda else _status_kib("VmRSS")
    model = bench_model(model_name, "+ckpt" in path, random_init, device, shape)
    if "+bf16weights" in path:
        model.to(torch.bfloat16)
    objective = get_objective(method)
    ref = frozen_copy(model) if objective.needs_ref else None
    dual = DualController(lam_0=1.0, eta_dual=1.0, eps=1.0) if objective.uses_dual else None
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    states = "bf16" if "+bf16adam" in path or "+bf16weights" in path else "fp32"
    numel = sum(p.numel() for p in model.parameters())
    state_bytes = 2 * numel * (2 if states == "bf16" else 4)  # AdamW's two moments
    ref_bytes = param_bytes if ref is not None else 0
    floor_kib = before_model_kib + (2 * param_bytes + state_bytes + ref_bytes) / 1024
    if fsdp:
        shard_one_rank([model] + ([ref] if ref is not None else []), cuda)
    unlearner = Unlearner(model, objective, build_optimizer(model, 1e-5, 0.0, states=states), ref_model=ref,
                          dual=dual, fused=path != "plain", backward_per_term="split" in path,
                          precision="bf16" if "+bf16" in path else "fp32", compile=path.endswith("+compile"))
    def on_device(batch):
        return {key: value.to(device) for key, value in batch.items()}

    pairs = [(on_device(forget[i % len(forget)]), on_device(retain[i % len(retain)]))
             for i in range(steps + 1)]
    unlearner.step([pairs[0]])  # warm-up: allocates gradients and optimizer states
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    flops = [step_flops(model, pair, pair[:1] if ref is not None else ()) for pair in pairs[1:]]
    times, tokens = [], []
    for pair in pairs[1:]:
        start = time.perf_counter()
        metrics = unlearner.step([pair])
        if cuda:
            torch.cuda.synchronize()  # the optimizer's kernels may still be queued
        times.append(time.perf_counter() - start)
        tokens.append(metrics["tokens"])
    peak_kib = torch.cuda.max_memory_allocated() / 1024 if cuda else _status_kib("VmHWM")
    step_s = statistics.median(times)
    flops_per_s = statistics.median(f / s for f, s in zip(flops, times))
    peak = device_peak_tflops(device, peak_tflops)
    return {
        "model": os.path.basename(model_name.rstrip("/")) + (f" ({shape})" if shape else ""),
        "device": device + (" fsdp2" if fsdp else ""),
        "data": f"{os.path.basename(data.rstrip('/'))} {forget_split}",
        "method": method, "path": path, "step_s": step_s,
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times)),
        "tflops": flops_per_s / 1e12, "mfu": flops_per_s / (peak * 1e12) if peak else None,
        "peak_mib": peak_kib / 1024, "above_floor_mib": (peak_kib - floor_kib) / 1024,
        "floor_mib": floor_kib / 1024, "vocab": model.config.vocab_size,
        "tokens_per_batch": statistics.median(int(b["attention_mask"].sum()) for b in forget),
    }


WORKER_OPTIONS = ("steps", "batch_size", "length", "device", "random_init", "fsdp", "data",
                  "forget_split", "shape", "peak_tflops")


def run_all(models, methods, paths, repeats=1, **options) -> list[dict]:
    """One worker process per (model, method, path, repeat); methods and paths alternate within
    each repeat, so a drift of the machine's speed touches every (method, path) alike (the PDU to
    GradDiff ratio included). Each figure: the median over repeats. ``options``: ``worker``'s."""
    rows = []
    for model in models:
        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(repeats):
            for method in methods:
                for path in paths:
                    if path.endswith("+ckpt") and method != "pdu":  # checkpointing costs alike
                        continue
                    row = run_worker(model, method, path, **options)
                    runs.setdefault((method, path), []).append(row)
                    print(f"  {model:14s} {method:10s} {path:16s} {row['step_s']:.3f} s/step", flush=True)
        rows += [median_row(method_path_runs) for method_path_runs in runs.values()]
    return rows


def worker_flags(options: dict) -> list[str]:
    """``options`` as this script's command-line flags (a flag for a true bool, none for None)."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value not in (None, False):
            flags += [flag, str(value)]
    return flags


def run_worker(model, method, path, **options) -> dict:
    cmd = [sys.executable, __file__, "--worker", model, method, path, *worker_flags(options)]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict]) -> dict:
    row = dict(runs[0], runs=len(runs), step_s_runs=[r["step_s"] for r in runs])
    for key in ("step_s", "tokens_per_s", "peak_mib", "above_floor_mib", "tflops", "mfu"):
        if runs[0].get(key) is not None:
            row[key] = statistics.median(r[key] for r in runs)
    return row


def print_table(rows: list[dict]) -> None:
    from unlearn.report import format_table

    plain = {(r["model"], r["method"]): r for r in rows if r["path"] == "plain"}
    graddiff = {(r["model"], r["path"]): r for r in rows if r["method"] == "grad_diff"}
    table = []
    for r in rows:
        base = plain.get((r["model"], r["method"]))  # ratios need the plain path among --paths
        gd = graddiff.get((r["model"], r["path"]))
        table.append([
            r["model"], r.get("device", "cpu"), r.get("data"), r["method"], r["path"],
            r.get("tokens_per_batch"),
            r["step_s"], r["tokens_per_s"], r.get("tflops"), r.get("mfu"), r["peak_mib"],
            r["above_floor_mib"],
            *((base["step_s"] / r["step_s"], r["peak_mib"] / base["peak_mib"],
               r["above_floor_mib"] / base["above_floor_mib"]) if base else (None, None, None)),
            r["step_s"] / gd["step_s"] if gd and r["method"] == "pdu" else None,
        ])
    print(format_table(
        ["model", "device", "data", "method", "path", "tokens/batch", "s/step", "tok/s", "TFLOP/s", "MFU",
         "peak MiB", "above floor MiB", "speed vs plain", "peak vs plain", "above-floor vs plain",
         "pdu/graddiff time"],
        table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--methods", nargs="+", default=["pdu", "npo", "grad_diff"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (their median)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each path, alternating (the median of their medians)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=None,
                        help="tokens per QA pair (default: the synthetic TOFU lengths)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights from the model's config (same time and memory per step)")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 on one rank, as the Ray worker")
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a TOFU folder (local)")
    parser.add_argument("--forget-split", default="forget10")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES),
                        help="with --random-init: this architecture instead of the model's")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for MFU (default: known GPUs' dense bf16 peak)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "METHOD", "PATH"))
    args = parser.parse_args(argv)
    if args.shape and not args.random_init:
        parser.error("--shape needs --random-init: the shape has no weights")
    options = {key: getattr(args, key) for key in WORKER_OPTIONS}
    if args.worker:
        print(json.dumps(worker(*args.worker, **options)))
        return
    rows = run_all(args.models, args.methods, args.paths, args.repeats, **options)
    print()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
