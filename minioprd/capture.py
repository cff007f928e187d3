"""Hidden states of selected layers at selected columns, without the LM head and without keeping
every layer.

Forward hooks on the decoder blocks (and on the final norm, for the last layer: HF's hidden_states[L]
is post-norm) slice each wanted layer to the loss window as soon as it is computed. After the deepest
wanted layer the forward is stopped, so a student matched on early layers never runs the rest, and a
teacher never holds `[layers, B, T, D]` of a 7B model.
"""

from __future__ import annotations

from typing import Any

import torch


class _Stop(Exception):
    """Raised from a hook after the deepest wanted layer, to end the forward early."""


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (`model.model` for Qwen/Llama), through any PEFT wrapper; it has .layers, .norm."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dec = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    if not hasattr(dec, "layers") or not hasattr(dec, "norm"):
        raise TypeError(f"{type(base).__name__} has no decoder with .layers and .norm")
    return dec


def output_ptr(output: Any) -> int:
    h = output[0] if isinstance(output, tuple) else output
    return h.untyped_storage().data_ptr()


def num_layers(model: torch.nn.Module) -> int:
    return len(backbone(model).layers)


def capture_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor, layers: list[int], start: int, stop: int,
                   dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """States of `layers` (hidden_states indices 1..L) at columns [start, stop): list of (B, stop-start, D).

    Runs under whatever grad mode the caller chose (no_grad for the teacher). Columns >= stop are never
    needed (causal attention), so the input is cut there.
    """
    dec = backbone(model)
    L = len(dec.layers)
    wanted = {l: None for l in layers}
    deepest = max(layers)
    state = {"active": True}  # hooks also fire when gradient checkpointing recomputes a block in backward

    def make_hook(index: int):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            if not state["active"]:
                return
            h = output[0] if isinstance(output, tuple) else output  # (B, T, D)
            h = h[:, start:stop]
            if dtype is not None:
                h = h.to(dtype)
            if not torch.is_grad_enabled() and h.untyped_storage().data_ptr() == output_ptr(output):
                h = h.clone()  # a view would keep the whole (B, T, D) output alive; under no_grad nothing else does
            wanted[index] = h
            if index == deepest:
                state["active"] = False
                raise _Stop

        return hook

    handles = []
    for l in wanted:
        module = dec.norm if l == L else dec.layers[l - 1]
        handles.append(module.register_forward_hook(make_hook(l)))
    try:
        dec(input_ids=input_ids[:, :stop], attention_mask=attention_mask[:, :stop],
            position_ids=position_ids[:, :stop], use_cache=False)
    except _Stop:
        pass
    finally:
        state["active"] = False
        for h in handles:
            h.remove()
    missing = [l for l, v in wanted.items() if v is None]
    if missing:
        raise RuntimeError(f"layers {missing} produced no output")
    return [wanted[l] for l in layers]
