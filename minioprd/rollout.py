"""On-policy rollouts: the student, adapter active, samples responses with HF generate and its KV cache.

Speed-ups (each leaves the sampled tokens what they were, up to float rounding; greedy rollouts are identical):
- `share_prefill`: the n responses of a prompt share one prefill of it; the prompt's KV cache is repeated n
  times after the prefill instead of prefilling n copies.
- `cache="static"`: a preallocated KV cache of a fixed length (rounded up to `CACHE_BUCKET` and never shrunk), so
  a decode step has the same shapes at every step of every call: what `compile` needs to compile it once.
- `compile`: `torch.compile` of the decode step (transformers' generate compiles it when the cache is static).
  Where a model or its quantization cannot do either, the rollout falls back to the dynamic cache with one note.
- `pack_weights` (CPU): every linear layer computes from a oneDNN-packed copy of its weight with the adapter folded
  in (`minioprd.packed`), instead of MKL re-packing the weight on every call of a few-row decode step.
- the batch stops when every row has hit EOS (HF generate's stopping criteria), and with the dynamic cache rows
  that have hit EOS leave the batch every `SEGMENT` tokens (`drop_finished`; greedy or per-row seeded sampling
  only, where it leaves every row's tokens as they were).
LoRA merging for the rollout (`rollout.merge_lora`) is done by the caller around this function.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from minioprd.config import CACHE_BUCKET
from minioprd.packed import packed_linears

logger = logging.getLogger(__name__)

CACHES = ("dynamic", "static")
SEGMENT = 32  # new tokens per generate call when finished rows leave the batch (dynamic cache)
COMPILE_BACKEND: Any = "inductor"  # torch.compile backend of the decode step (tests count compilations with their own)


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P+R) left-padded prompts, then responses (pad after EOS)
    attention_mask: torch.Tensor  # (B, P+R) 1 on prompt tokens and on response tokens up to EOS
    response_mask: torch.Tensor  # (B, R) bool: generated tokens up to and including the first EOS
    prompt_len: int  # P

    @property
    def responses(self) -> torch.Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_len:]

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.response_mask.sum(1)

    def select(self, rows: slice | torch.Tensor) -> "Rollout":
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows], self.prompt_len)

    def position_ids(self) -> torch.Tensor:
        """Positions as generate saw them: counted from each row's first real token."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def response_mask_from(responses: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """(B, R) bool: tokens up to and including the first EOS; everything when there is none.

    Found by position, not by `!= pad`, since pad and EOS are often the same id.
    """
    is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))  # (B, R)
    # tokens strictly after the first EOS have at least one EOS before them
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return ~after


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (generate, its compiled call and quantizer live there)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _note(model: torch.nn.Module, key: str, message: str) -> None:
    """One line per model and kind of fallback, also kept on the model for `minioprd bench rollout`."""
    notes = _base(model).__dict__.setdefault("_minioprd_rollout_notes", {})
    if key not in notes:
        notes[key] = message
        logger.warning("rollout: %s", message)


def rollout_notes(model: torch.nn.Module) -> list[str]:
    """The fallbacks this model's rollouts took (static cache or compile not available), one line each."""
    return list(_base(model).__dict__.get("_minioprd_rollout_notes", {}).values())


def usable_speedups(model: torch.nn.Module, cache: str, compile: bool) -> tuple[str, bool]:
    """The (cache, compile) this model can run, with a note for each fallback.

    Static cache: models transformers marks as compilable (`_can_compile_fullgraph`). Compile: additionally not
    quantized weights that cannot be compiled (bitsandbytes 4/8-bit); it needs the static cache.
    """
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
    base = _base(model)
    notes = base.__dict__.get("_minioprd_rollout_notes", {})
    if cache == "static" and ("static" in notes or not getattr(base, "_can_compile_fullgraph", False)):
        _note(model, "static", f"{type(base).__name__} does not support a static KV cache; using the dynamic cache")
        return "dynamic", False
    if compile:
        quantizer = getattr(base, "hf_quantizer", None)
        if quantizer is not None and not quantizer.is_compileable:
            _note(model, "compile", f"{type(quantizer).__name__} weights cannot be compiled; decoding uncompiled")
            compile = False
        elif cache != "static":
            _note(model, "compile-dynamic", "rollout.compile needs rollout.cache=static; decoding uncompiled")
            compile = False
        elif "compile" in notes:
            compile = False
    return cache, compile


def rollout_options(rc: Any, device: torch.device | str) -> dict[str, Any]:
    """rollout()'s speed-up arguments from the config's rollout section: `auto` is the static cache and a compiled
    decode step on a GPU, the dynamic cache uncompiled on a CPU (where a real model's decode step is bound by
    streaming its weights, the static cache measured no gain in `minioprd bench rollout`, and compiling takes
    minutes), with packed weights where the model is too big for a cache (decided by rollout() on the model)."""
    gpu = torch.device(device).type != "cpu"
    compile = gpu if rc.compile == "auto" else rc.compile in (True, "true")
    pack = "auto" if rc.pack_weights == "auto" else rc.pack_weights in (True, "true")
    return {"cache": ("static" if gpu else "dynamic") if rc.cache == "auto" else rc.cache, "compile": compile,
            "share_prefill": rc.share_prefill, "pack_weights": pack}


def usable_packing(model: torch.nn.Module, pack_weights: bool | str, compile: bool) -> bool:
    """Whether this rollout packs the weights (`minioprd.packed`): asked for (or `auto` and the weights are too big
    for a cache), on a CPU, not compiled (the compiled decode step keeps the weights it traced), ops present."""
    from minioprd import packed

    if pack_weights is False or pack_weights == "false" or "pack" in _base(model).__dict__.get(
            "_minioprd_rollout_notes", {}):  # off, or it failed on this model before
        return False
    on_cpu = next(model.parameters()).device.type == "cpu"
    if pack_weights == "auto":
        return on_cpu and not compile and packed.pays(model)
    if not on_cpu:
        _note(model, "pack-gpu", "rollout.pack_weights is for a CPU (oneDNN); decoding with the usual kernels")
    elif compile:
        _note(model, "pack-compile", "rollout.pack_weights is not combined with rollout.compile; decoding compiled")
    elif not packed.available():
        _note(model, "pack", "this torch build has no oneDNN packed-linear ops; decoding with the usual kernels")
    else:
        return True
    return False


def _compile_config(device: torch.device) -> Any:
    from transformers import CompileConfig

    # CUDA graphs (reduce-overhead) take the Python launch cost out of a decode step on a GPU; a CPU has none.
    cc = CompileConfig(fullgraph=False, dynamic=False, backend=COMPILE_BACKEND,
                       mode="reduce-overhead" if device.type == "cuda" else "default")
    cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return cc


def _positions(attn: torch.Tensor) -> torch.Tensor:
    """Position ids exactly as generate makes them from a left-padded attention mask."""
    return (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)


def _shared_prefill(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, n: int) -> Any:
    """Prefill each distinct prompt once, all but its last token, and repeat its cache for its n responses.

    Generate then runs the prompts' last token on all n rows (it needs at least one uncached token to produce
    the first response token's logits) and decodes as usual.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=_base(model).config)
    model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=_positions(attn[:, :-1]), cache=cache,
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(n)
    return cache


def _static_cache(model: torch.nn.Module, prefilled: Any, rows: int, length: int) -> Any:
    """A static cache of `length` positions; holds the shared prefill's keys and values when there is one.

    The same cache object (same tensors, reset) serves every call with the same shape, so a compiled decode step
    (and its CUDA graphs, which are recorded for fixed addresses) is reused from step to step.
    """
    from transformers import StaticCache

    base = _base(model)
    # never shrink: a later call with a shorter prompt keeps the compiled decode step's shapes
    length = max(-(-length // CACHE_BUCKET) * CACHE_BUCKET, base.__dict__.get("_minioprd_cache_len", 0))
    base.__dict__["_minioprd_cache_len"] = length
    static = base.__dict__.get("_minioprd_static_cache")
    layer = static.layers[0] if static is not None else None
    if layer is not None and layer.is_initialized and layer.max_cache_len == length and layer.batch_size == rows:
        static.reset()
    else:
        static = base.__dict__["_minioprd_static_cache"] = StaticCache(config=base.config, max_cache_len=length)
    if prefilled is not None:
        for i, layer in enumerate(prefilled.layers):
            static.update(layer.keys, layer.values, i)
    return static


class RowStreams:
    """A logits processor that samples each row from a random stream of its own (Gumbel-max: the argmax of
    temperature/top-p-warped scores plus Gumbel noise is a draw from their softmax), so a row's tokens do not
    depend on which other rows share its batch. Generate runs greedy behind it."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        V = scores.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))
        return scores.float() + gumbel

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows (bool or indices, in the current batch's order) go on; each keeps its own stream."""
        idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
        self.generators = [self.generators[int(i)] for i in idx]


def _generate_dropping_finished(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, cache: Any,
                                max_new_tokens: int, eos: list[int], pad: int, streams: RowStreams | None,
                                **kwargs: Any) -> torch.Tensor:
    """HF generate in segments of `SEGMENT` tokens over one DynamicCache: between segments the rows that have hit
    EOS leave the batch (their cache rows, their sampling streams), so the rest decode at a smaller batch.

    Generate resumes from a cache holding every token but the last it sampled (it feeds only the uncached tail),
    so each row sees the same inputs and positions as in one call; with greedy decoding or a stream per row its
    tokens are the same. Returns what one generate call would: (B, P + width), pad after each row's EOS, width the
    step at which the last row stopped (or max_new_tokens).
    """
    from transformers import DynamicCache

    B, prompt = ids.shape[0], ids
    cache = cache if cache is not None else DynamicCache(config=_base(model).config)
    out = torch.full((B, max_new_tokens), pad, dtype=ids.dtype, device=ids.device)  # (B, R) responses
    alive = torch.arange(B, device=ids.device)  # the batch's rows, by their place in `out`
    done = 0
    while done < max_new_tokens:
        step = min(SEGMENT, max_new_tokens - done)
        seq = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=step, use_cache=True, cache=cache,
                             eos_token_id=eos, pad_token_id=pad, **kwargs)
        new = seq[:, ids.shape[1]:]  # (b, <= step): shorter when every row stopped
        out[alive, done:done + new.shape[1]] = new
        done += new.shape[1]
        going = ~torch.isin(new, torch.tensor(eos, device=new.device)).any(1)  # (b,) no EOS yet
        if new.shape[1] < step or not going.any():
            break
        attn = torch.cat([attn, torch.ones_like(new)], 1)
        if not going.all():
            keep = going.nonzero().flatten()
            cache.batch_select_indices(keep)
            if streams is not None:
                streams.keep(keep)
            seq, attn, alive = seq[keep], attn[keep], alive[keep]
        ids = seq
    return torch.cat([prompt, out[:, :done]], 1)


@torch.no_grad()
def rollout(model: torch.nn.Module, tokenizer, prompts: list[list[int]], n: int = 1, temperature: float = 1.0,
            top_p: float = 1.0, max_new_tokens: int = 256, cache: str = "dynamic", compile: bool = False,
            share_prefill: bool = True, seeds: list[int] | None = None,
            pack_weights: bool | str = False, drop_finished: bool = True) -> Rollout:
    """Sample `n` responses per prompt (rows are prompt-major: p0 r0, p0 r1, p1 r0, ...).

    `seeds` (one per row) gives every row its own random stream (`RowStreams`); without them rows draw from
    torch's global generator."""
    was_training = model.training
    model.eval()  # no dropout, and gradient checkpointing (train-mode only) stays out of the KV-cache path
    device = next(model.parameters()).device
    batch = tokenizer.pad({"input_ids": list(prompts)}, padding=True, padding_side="left", return_tensors="pt")
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    rows_ids, rows_attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
    P = ids.shape[1]
    eos = eos_ids(model, tokenizer)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    cache, compile = usable_speedups(model, cache, compile)
    pack = usable_packing(model, pack_weights, compile)
    rng = torch.random.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    if seeds is not None and temperature > 0 and len(seeds) != rows_ids.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {rows_ids.shape[0]} rows")

    def generate(kind: str, compiled: bool) -> torch.Tensor:
        streams = None
        if seeds is not None and temperature > 0:  # fresh streams: a fallback samples what the failed try would have
            streams = RowStreams(seeds, temperature, top_p, device)
            sampling.update(do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=[streams])
        past = _shared_prefill(model, ids, attn, n) if share_prefill and n > 1 and P > 1 else None
        # a static cache has one shape for every step; with global-RNG sampling a smaller batch would draw other
        # numbers, so rows leave only where every row's tokens stay what they were
        if kind == "dynamic" and drop_finished and (temperature <= 0 or streams is not None):
            return _generate_dropping_finished(model, rows_ids, rows_attn, past, max_new_tokens, eos,
                                               tokenizer.pad_token_id, streams, **sampling)
        extra: dict[str, Any] = {}
        if kind == "static":
            past = _static_cache(model, past, rows_ids.shape[0], P + max_new_tokens)
            extra = {"compile_config": _compile_config(device)} if compiled else {"disable_compile": True}
        return model.generate(input_ids=rows_ids, attention_mask=rows_attn, max_new_tokens=max_new_tokens,
                              use_cache=True, cache=past, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                              **sampling, **extra)

    def attempt(kind: str, compiled: bool, packing: bool) -> torch.Tensor:
        with packed_linears(model, rows_ids.shape[0]) if packing else nullcontext():
            return generate(kind, compiled)

    try:
        try:
            out = attempt(cache, compile, pack)
        except Exception as e:  # noqa: BLE001 - any failure of the optional path falls back to the plain one
            if cache == "dynamic" and not pack:
                raise
            why = f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
            if pack:  # packing is never combined with compile: only the weights' kernels go back
                _note(model, "pack", f"decoding from packed weights failed {why}; using the usual kernels")
                fallback = (cache, compile, False)
            else:
                what = "compile" if compile else "static"
                _note(model, what, f"{'compiling the decode step' if compile else 'the static KV cache'} failed "
                                   f"{why}; using {'the static cache uncompiled' if compile else 'the dynamic cache'}")
                fallback = ("static", False, False) if compile else ("dynamic", False, False)
            torch.random.set_rng_state(rng[0])  # the fallback samples what the failed try would have
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], device)
            out = attempt(*fallback)
    finally:
        model.train(was_training)
    responses = out[:, P:]
    if responses.shape[1] == 0:  # max_new_tokens reached 0 tokens: keep one column so shapes stay valid
        responses = torch.full((out.shape[0], 1), eos[0], dtype=out.dtype, device=out.device)
        out = torch.cat([out, responses], 1)
    rmask = response_mask_from(responses, eos)
    attention = torch.cat([rows_attn, rmask.long()], 1)
    return Rollout(input_ids=out, attention_mask=attention, response_mask=rmask, prompt_len=P)
