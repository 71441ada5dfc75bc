"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for Hugging Face causal LMs.

Every decoder block is its own FSDP unit, then the root (embeddings, final norm, LM head, which
may be tied). The root keeps its parameters gathered after forward, because the fused losses
apply the LM head weight outside the model's forward (``unlearn.objectives.base.forward_output``);
its gradients are reduce-scattered at the end of backward like the rest.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from unlearn.models import LoraSettings, decoder_blocks, is_lora_tensor


def shard_model(model: nn.Module, *, mixed_precision: bool = False, device_type: str = "cpu") -> nn.Module:
    """Apply ``fully_shard`` to each decoder block, then to the root; returns the model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs: dict = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def load_sharded(spec: str, *, dtype: str = "float32", device: torch.device | str = "cpu",
                 mixed_precision: bool = False, gradient_checkpointing: bool = False,
                 frozen: bool = False, lora: LoraSettings | None = None) -> nn.Module:
    """Build ``spec``'s model on the meta device, shard it, and load only this rank's shard.

    Parameters are created on the meta device (buffers such as the rotary frequencies are
    computed on the host as usual, they are small), ``fully_shard`` splits them, each rank
    allocates its own shard and reads that shard's rows from the Hugging Face safetensors files
    (only those bytes, with plain reads). No rank ever holds the full
    model. Tied embeddings are one parameter, loaded once. With ``lora`` the adapters are added
    before sharding (only they train) and initialised as in one process
    (``unlearn.models.init_lora_weights``).
    """
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from unlearn.models import (
        DTYPES,
        ModelLoadError,
        apply_lora,
        enable_gradient_checkpointing,
        init_lora_weights,
        is_adapter_folder,
        resolve_model_path,
    )

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = _local_folder(resolve_model_path(spec))
    if is_adapter_folder(path):
        raise ModelLoadError(f"{spec!r} holds LoRA adapters only, and sharded loading needs full weights: "
                             "start from their base model, or from a run with model.lora.merge=true")
    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        model.tie_weights()  # the empty-weights context leaves a tied head as its own parameter
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not build model {spec!r} ({path}): {exc}") from exc
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None:
        model = apply_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    if frozen:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    device = torch.device(device)
    buffers = {name: buffer.detach().to(device, copy=True) for name, buffer in model.named_buffers()}
    shard_model(model, mixed_precision=mixed_precision, device_type=device.type)
    model.to_empty(device=device)  # this rank's shard only; buffers come back below
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    state = get_model_state_dict(model)
    tied = _tied_names(model)
    # the files' names for the base weights (a LoRA model's differ); the adapters are not in them
    stored = {base_name(name): value for name, value in state.items()
              if name not in tied and not is_lora_tensor(name)}
    entries = _stored_entries(Path(path))
    missing = sorted(set(stored) - set(entries))
    if missing:
        raise ModelLoadError(f"could not load the shards of {spec!r} from {path}: its safetensors "
                             f"files lack {len(missing)} parameter(s): {', '.join(missing[:5])}")
    for name, value in stored.items():  # each value's local tensor is the parameter's own shard
        _read_own_rows(value, entries[name])
    if lora is not None:
        init_lora_weights(model, lora.init_seed)
    return model


def base_name(name: str) -> str:
    """A parameter's name in the base model's files: a LoRA model's ``base_model.model.`` prefix
    and ``.base_layer`` are dropped."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _local_folder(path: str) -> str:
    """A hub id's files in the local Hugging Face cache (each node fetches them once): the
    shards are read from safetensors files on disk."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                      "F16": torch.float16, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}


def _stored_entries(folder: Path) -> dict[str, tuple[Path, int, str, list[int]]]:
    """Each tensor of a folder's safetensors files: (file, byte offset, dtype, shape), from the
    files' headers (8-byte length, then JSON) only."""
    import json
    import struct

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        from unlearn.models import ModelLoadError

        raise ModelLoadError(f"{folder} has no safetensors files: sharded loading reads only those "
                             "(a hub id must be downloaded first, a .bin checkpoint converted)")
    entries = {}
    for file in files:
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                entries[name] = (file, 8 + size + info["data_offsets"][0], info["dtype"], info["shape"])
    return entries


@torch.no_grad()
def _read_own_rows(value: torch.Tensor, entry: tuple[Path, int, str, list[int]]) -> None:
    """Read into ``value`` (a DTensor shard, or a whole tensor) its rows of the stored tensor, with
    plain reads of those bytes only: neither the whole tensor nor a memory map of the file ever
    sits in this process (DCP's HuggingFaceStorageReader peaked at ~2.6x the shard)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    file, start, dtype, stored_shape = entry
    if isinstance(value, DTensor):
        shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh,
                                                              value.placements)
        local = value.to_local()
    else:
        shape, offset, local = tuple(value.shape), (0,) * value.ndim, value
    if list(value.shape) != list(stored_shape) or any(offset[1:]):
        from unlearn.models import ModelLoadError

        raise ModelLoadError(f"{file.name}: a tensor of shape {stored_shape}, the model wants "
                             f"{list(value.shape)} split on its first dimension only")
    if 0 in shape:
        return  # a rank past the end of a short tensor holds no rows
    kind = _SAFETENSORS_DTYPES[dtype]
    row_bytes = kind.itemsize * math.prod(stored_shape[1:])
    buffer = bytearray(row_bytes * (shape[0] if shape else 1))
    with open(file, "rb") as handle:
        handle.seek(start + (offset[0] if shape else 0) * row_bytes)
        handle.readinto(buffer)
    local.copy_(torch.frombuffer(buffer, dtype=kind).view(shape))


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that alias another parameter (a tied LM head): not in the files."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def export_sharded(model: nn.Module, tokenizer, spec: str, out_dir: Path,
                   max_shard_bytes: int = 2 << 30) -> Path | None:
    """Write the sharded ``model`` as a Hugging Face folder (collective): safetensors files of at
    most ``max_shard_bytes`` each (and their index when there are several), config, tokenizer.

    Tensor by tensor, the ranks gather one full tensor, rank 0 moves it to host memory and writes
    a file as soon as it is complete: rank 0 holds at most one file's worth in host memory and a
    GPU one full tensor beside its shards. Nothing needs a file system shared by the ranks.
    Returns the folder on rank 0, None elsewhere.
    """
    import json

    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from transformers import AutoConfig, GenerationConfig

    from unlearn.models import resolve_model_path

    rank = dist.get_rank() if dist.is_initialized() else 0
    tied = _tied_names(model)
    state = {name: value for name, value in get_model_state_dict(model).items() if name not in tied}
    scaling = _lora_scaling(model)
    # the files' tensors: the base weights under their own names, LoRA's merged into them
    state_of = {base_name(key): key for key in state if not is_lora_tensor(key)}
    plan = _file_plan({name: state[key] for name, key in state_of.items()}, max_shard_bytes)
    files = max(plan.values())
    out_dir = Path(out_dir)
    weight_map: dict[str, str] = {}

    for number in range(1, files + 1):
        name = "model.safetensors" if files == 1 else f"model-{number:05d}-of-{files:05d}.safetensors"
        tensors = {}
        for out_name in (out_name for out_name, index in plan.items() if index == number):
            key = state_of[out_name]
            value = _full_tensor(state[key])
            layer = key.removesuffix(".base_layer.weight")
            if layer in scaling:  # W + (alpha / r) * B @ A
                down = _full_tensor(state[f"{layer}.lora_A.default.weight"])
                up = _full_tensor(state[f"{layer}.lora_B.default.weight"])
                value = value + scaling[layer] * (up.float() @ down.float()).to(value.dtype)
            if rank == 0:
                tensors[out_name] = value.to("cpu", copy=True).contiguous()
                weight_map[out_name] = name
            del value
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        del tensors
    if rank != 0:
        return None
    if files > 1:
        total = sum(state[key].numel() * state[key].element_size() for key in state_of.values())
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    source = _local_folder(resolve_model_path(spec))
    config = AutoConfig.from_pretrained(source)
    config.dtype = next(iter(state.values())).dtype
    config.save_pretrained(out_dir)
    if (Path(source) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def export_adapter(model: nn.Module, tokenizer, spec: str, out_dir: Path) -> Path | None:
    """Write a sharded LoRA model's adapters as a PEFT folder (collective; only the adapters are
    gathered, a small fraction of the model), its base model ``spec``'s resolved path; the folder
    on rank 0, None elsewhere."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from unlearn.models import resolve_model_path, write_adapter

    adapters = {name: _full_tensor(value).cpu() for name, value in get_model_state_dict(model).items()
                if is_lora_tensor(name)}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return write_adapter(model, adapters, tokenizer, resolve_model_path(spec), out_dir)


def _full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) state-dict value; a collective for a DTensor."""
    from torch.distributed.tensor import DTensor

    return (value.full_tensor() if isinstance(value, DTensor) else value).detach()


def _lora_scaling(model: nn.Module) -> dict[str, float]:
    """Each LoRA layer's name (as in the state dict) and its scaling alpha / r."""
    return {name: float(module.scaling["default"]) for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in getattr(module, "scaling", {})}


def _file_plan(state: dict, max_bytes: int) -> dict[str, int]:
    """Each tensor's file number (1..N), in state-dict order, starting a new file whenever the
    current one would pass ``max_bytes`` (a larger tensor gets a file of its own)."""
    plan, index, used = {}, 1, 0
    for name, value in state.items():
        size = value.numel() * value.element_size()  # the global tensor's size
        if used and used + size > max_bytes:
            index, used = index + 1, 0
        plan[name] = index
        used += size
    return plan
