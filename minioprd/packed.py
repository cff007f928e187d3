"""oneDNN-packed linear weights for a CPU rollout.

A CPU decode step of a real-sized model is bound by streaming its weights from memory, and PyTorch's default fp32
`linear` (MKL) re-packs the whole weight matrix on every call when the batch is a few rows: at the Qwen2.5-0.5B
shape with 8 rows it reached 5-8 GB/s where a copy reaches 14 (read side) on this project's 2-core CPU. oneDNN
can pack a weight once into the blocked layout its kernel reads (`mkldnn._reorder_linear_weight`, what
torch.compile's CPU freezing pass uses) and then read it as it lies: 2.0x on the MLP weights, 2.6x on the LM head
(`minioprd bench rollout`, setting `packed`).

Packing is done per rollout, because the adapter moves every optimizer step, and the LoRA update is folded into
the packed copy (W + scale * B @ A, out of place): generation gets a merged model's one matmul per layer while
the base weights are never written, so `rollout.merge_lora`'s merge/unmerge rounding drift does not arise. The
copies live only for the rollout (peak memory: one more copy of the student's linear weights).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# `auto` packs when the student's linear weights exceed this: beyond any CPU's last-level cache, where the decode
# step streams weights from memory. Below it (toy and test models) the per-rollout packing is not worth it, and
# the rollout stays bit-for-bit what the default kernels give.
PACK_MIN_BYTES = 64 * 2**20


def available() -> bool:
    """Whether this torch build has the oneDNN ops (x86 and Arm CPU wheels do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the fp32 CPU weights of the model's nn.Linear layers (what packing would copy)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu")


def pays(model: nn.Module) -> bool:
    """`rollout.pack_weights=auto`: pack when the weights are too big for a cache and the ops exist."""
    return available() and linear_bytes(model) >= PACK_MIN_BYTES


class _Packed:
    """Forward of one linear layer from its packed weight: y = x W^T + b with W in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        # x: (..., d_in) -> (..., d_out)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _lora_weight(m: nn.Module) -> torch.Tensor | None:
    """The weight a peft LoRA linear applies (base + scale * B @ A of its active adapters), or None where the
    layer is not plain LoRA on an fp32 nn.Linear (DoRA and other variants, lora_bias, a quantized base)."""
    base = m.get_base_layer()
    if type(base) is not nn.Linear or base.weight.dtype != torch.float32 or base.weight.device.type != "cpu":
        return None
    weight = base.weight
    if m.disable_adapters or m.merged:  # merged: the base already holds the update
        return weight
    for name in m.active_adapters:
        if name not in m.lora_A:
            continue
        if name in getattr(m, "lora_variant", {}) or getattr(m, "lora_bias", {}).get(name, False):
            return None
        weight = weight + m.get_delta_weight(name)  # out of place: the base is not written
    return weight


@contextmanager
def packed_linears(model: nn.Module, rows: int) -> Iterator[int]:
    """Inside the block every fp32 CPU linear layer of `model` (peft LoRA linears with their adapter folded in)
    computes from a oneDNN-packed copy of its weight, packed for `rows` rows per call; yields how many layers.

    For inference only (the packed op has no backward): the rollout runs under no_grad. Layers that cannot be
    packed (quantized, DoRA, another dtype) keep their own forward.
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLinear = ()  # type: ignore[assignment]
    swapped: list[nn.Module] = []
    inside: set[int] = set()  # a LoRA layer's own sub-linears (base_layer, lora_A/B) never run once it is swapped
    try:
        for m in model.modules():
            if id(m) in inside:
                continue
            weight, bias = None, None
            if type(m) is LoraLinear:
                weight, bias = _lora_weight(m), m.get_base_layer().bias
                if weight is not None:
                    inside.update(id(sub) for sub in m.modules())
            elif type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
                weight, bias = m.weight, m.bias
            if weight is not None:
                m.__dict__["forward"] = _Packed(weight, bias, rows)  # an instance attribute shadows the class's
                swapped.append(m)
        yield len(swapped)
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)
