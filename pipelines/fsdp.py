"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for Hugging Face causal LMs.

Every decoder block is its own FSDP unit, then the root (embeddings, final norm, LM head, which
may be tied). The root keeps its parameters gathered after forward, because the fused losses
apply the LM head weight outside the model's forward (``unlearn.objectives.base.forward_output``);
its gradients are reduce-scattered at the end of backward like the rest.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, by the class names HF lists in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found to shard "
                         f"(_no_split_modules={sorted(names)})")
    return blocks


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
