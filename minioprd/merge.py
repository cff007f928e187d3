"""`minioprd merge`: fold a run's LoRA adapter into its base model and export a standalone HF model.

The output directory holds safetensors weights (sharded), config, generation config and the tokenizer with
its chat template; `AutoModelForCausalLM.from_pretrained(OUT)` opens it without peft. How it works:

1. The base loads on CPU in the export dtype. When that is the checkpoint's own dtype, transformers keeps the
   weights memory-mapped: they are file pages the kernel can drop, not a copy in RAM.
   A QLoRA adapter (`student_quant: "4bit"`, or a bnb-4bit base checkpoint) was trained against NF4 weights,
   so the base loads in NF4 exactly as in training and each weight is *dequantized* when it is written. The
   export is never 4-bit, and it never uses the unquantized originals, which the adapter never saw.
2. peft attaches the adapter (unmerged) and gives reference logits on a few fixed prompts.
3. Weights are written shard by shard: for a LoRA layer, W + ΔW is computed in fp32 from the base weight and
   peft's own `get_delta_weight` (or the LoRA variant's `merge_safe`, e.g. DoRA), then rounded once to the
   export dtype. The loaded model is never modified (peft's `merge_and_unload` mutates in place), and only
   one shard of merged tensors is in RAM at a time. Width projections (`projections.safetensors`) are
   distillation-only and never exported.
4. The model is freed, the written directory is reloaded with `AutoModelForCausalLM` alone, and its logits
   are compared with the reference. Above the tolerance (below) the merge fails and nothing is left at OUT.
5. The directory is built under a temporary name next to OUT and renamed into place.

Tolerances on max |logit(merged) - logit(base+adapter)|, relative to the logit scale
s = max(1, max |reference logit|): fp32 1e-4·s, fp16 2e-2·s, bf16 1.5e-1·s. The unmerged reference adds W·x and
ΔW·x separately, while the merged model rounds W + ΔW once to 11 (fp16) or 8 (bf16) significant bits, and the
forward pass amplifies that through the layers. Measured on random-weight Qwen2.5 configs with a large random
LoRA (r=16, all-linear), bf16: 2.7% of s (0.5B), 4.0% (1.5B), 7.4-7.9% (7B); fp32: ~1e-7·s. The report also gives
the adapter's own effect on the logits: when it is below the tolerance, the check cannot tell a merged adapter
from a missing one, and the log says so.

Memory: when the export dtype is the checkpoint's dtype (bf16 base, bf16 export), the resident memory that is
not file-backed peaks at about one shard plus ~0.6 GB (libraries, tokenizer, logits): 2.7 GiB for a 7B model
with 2 GB shards. Peak RSS was 15.8 GiB; the rest is the memory-mapped base, which the kernel can evict.
Otherwise the base is converted on load, which adds one copy of the model in the export dtype. A QLoRA base
adds its NF4 copy (~0.5 byte/parameter plus the embeddings).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from minioprd.errors import MinioprdError
from minioprd.memory import MemoryMonitor, trim_heap

DTYPES = ("bf16", "fp16", "fp32")
RTOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1.5e-1}
RUN_META = "minioprd.json"
PROJECTIONS = "projections.safetensors"
# Fixed verification prompts: prose, arithmetic, code and unicode; each is cut to MAX_PROMPT_TOKENS tokens.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is 123+456? Please reason step by step, and put your final answer within \\boxed{}.",
    "def square(x):\n    return x * x  # naïve café, 数学 🙂",
)
CHAT_PROMPT = "Explain in one sentence why the sky is blue."
MAX_PROMPT_TOKENS = 32


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def parse_size(size: int | str) -> int:
    """`2GB`, `500MB`, `1.5GiB` or a byte count -> bytes (GB = 10^9, GiB = 2^30, as in huggingface_hub)."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT](?:i?B)?|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise MinioprdError(f"max shard size {size!r} is not a size: use a number of bytes or e.g. 2GB, 500MB")
        unit = (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        n = int(float(m.group(1)) * base ** " KMGT".index(unit[0] if unit != "B" else " "))
    if n <= 0:
        raise MinioprdError(f"max shard size {size!r} must be positive: e.g. 2GB")
    return n


# ---------------------------------------------------------------------------------------------- inputs


def find_adapter_dir(adapter: str | Path) -> Path:
    """RUN_DIR/adapter, or RUN_DIR itself (then its adapter/ subdirectory)."""
    p = Path(adapter).expanduser()
    if not p.exists():
        raise MinioprdError(f"adapter directory {str(p)!r} does not exist: pass a run's adapter directory "
                            f"(RUN_DIR/adapter) or the run directory")
    if not p.is_dir():
        raise MinioprdError(f"adapter {str(p)!r} is a file: pass the directory that holds adapter_config.json "
                            f"(RUN_DIR/adapter)")
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise MinioprdError(f"{str(p)!r} has no adapter_config.json (nor has {str(p / 'adapter')!r}): pass a run's "
                        f"adapter directory (RUN_DIR/adapter) or a PEFT adapter saved with save_pretrained")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinioprdError(f"cannot read {what} {str(path)!r} ({type(e).__name__}): it is damaged; "
                            f"re-save the adapter") from None
    if not isinstance(obj, dict):
        raise MinioprdError(f"{what} {str(path)!r} is not a JSON object: it is damaged; re-save the adapter")
    return obj


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, minioprd.json or {}), checked for what merging needs."""
    cfg = _read_json(adapter_dir / "adapter_config.json", "adapter config")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise MinioprdError(f"adapter {str(adapter_dir)!r} is a {kind or 'unknown'} adapter: only LoRA adapters "
                            f"can be merged")
    if not any((adapter_dir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise MinioprdError(f"adapter {str(adapter_dir)!r} has no adapter_model.safetensors: the run did not "
                            f"finish saving; use a complete adapter directory")
    meta: dict[str, Any] = {}
    if (adapter_dir / RUN_META).is_file():
        meta = _read_json(adapter_dir / RUN_META, "run metadata")
        if not isinstance(meta.get("format", 1), int) or meta.get("format", 1) > 1:
            raise MinioprdError(f"{str(adapter_dir / RUN_META)!r} was written by a newer minioprd (format "
                                f"{meta.get('format')}): upgrade minioprd to merge it")
        quant = meta.get("student_quant", "none")
        if quant not in ("none", "4bit"):
            raise MinioprdError(f"{RUN_META} says student_quant={quant!r}: only none and 4bit can be merged")
    return cfg, meta


def resolve_base(base: str | None, adapter_cfg: dict[str, Any], meta: dict[str, Any]) -> Any:
    """--base, else the run's student_path (then what the user typed), else the adapter's base_model_name_or_path."""
    from minioprd.models import resolve_model

    if base:
        return resolve_model(base, role="base model")
    cands = [c for c in (meta.get("student_path"), meta.get("student"), adapter_cfg.get("base_model_name_or_path"))
             if isinstance(c, str) and c]
    if not cands:
        raise MinioprdError("the adapter does not name its base model: pass it with --base")
    first: MinioprdError | None = None
    for c in dict.fromkeys(cands):
        try:
            return resolve_model(c, role="base model")
        except MinioprdError as e:
            first = first or e
    raise MinioprdError(f"{first} (or pass the base with --base)")


def _is_within(inner: Path, outer: Path) -> bool:
    try:
        inner.resolve().relative_to(outer.resolve())
        return True
    except ValueError:
        return False


def check_output(output: Path, force: bool, keep: list[Path]) -> None:
    """Refuse a non-empty output without force, and any output whose replacement would delete an input."""
    if output.exists() and not output.is_dir():
        raise MinioprdError(f"output {str(output)!r} is a file: pass a directory path to --output")
    for k in keep:
        if _is_within(k, output):
            raise MinioprdError(f"output {str(output)!r} contains the input {str(k)!r}, which replacing it would "
                                f"delete: choose another --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise MinioprdError(f"output directory {str(output)!r} is not empty: pass --force to replace it, or "
                            f"choose another --output")


# ---------------------------------------------------------------------------------------------- memory


# ---------------------------------------------------------------------------------------------- models


def _base_config(path: str) -> dict[str, Any]:
    """The config.json of a base checkpoint (local dir or cached hub id), or {} when there is none to read."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
            cfg_path = Path(cached) if isinstance(cached, str) else cfg_path
    if not cfg_path.is_file():
        return {}
    return _read_json(cfg_path, "base config")


def _base_quantization(path: str) -> dict[str, Any] | None:
    """The quantization_config of a base checkpoint, if it has one."""
    qc = _base_config(path).get("quantization_config")
    return qc if isinstance(qc, dict) else None


def load_base(path: str, dtype: str, four_bit: bool) -> Any:
    """The base on CPU in `dtype`; in NF4 (as in QLoRA training, computing in `dtype`) when `four_bit`."""
    from transformers import AutoModelForCausalLM

    from minioprd.models import keep_cpu_nf4_layout, quantization_config

    kw: dict[str, Any] = {"dtype": _torch_dtype(dtype)}
    if four_bit:
        kw["device_map"] = {"": "cpu"}
        if _base_quantization(path) is None:
            kw["quantization_config"] = quantization_config("4bit", _torch_dtype(dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinioprdError(f"could not load the base model from {path!r}: {first}") from None
    model.eval()
    model.requires_grad_(False)
    # the NF4 weights the adapter was trained against, not bitsandbytes' bf16-rounded CPU repacking of them
    keep_cpu_nf4_layout(model)
    for mod in model.modules():
        if hasattr(mod, "compute_type_is_set"):  # a pre-quantized checkpoint brings its own compute dtype
            mod.compute_dtype, mod.compute_type_is_set = _torch_dtype(dtype), True
    return model


def attach_adapter(model: Any, adapter_dir: Path) -> Any:
    """PeftModel.from_pretrained, failing with one line when the adapter does not fit this base."""
    import warnings

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from safetensors import SafetensorError

    hint = "pass the base model it was trained on with --base"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (SafetensorError, OSError, EOFError) as e:
        raise MinioprdError(f"cannot read the adapter weights in {str(adapter_dir)!r} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:120]}): the file is damaged; re-save the adapter") from None
    except (RuntimeError, ValueError, KeyError) as e:
        msg = " ".join(str(e).split())
        m = re.search(r"size mismatch for ([^:]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)).*?"
                      r"current model is (torch\.Size\(\[[^\]]*\]\))", msg)
        detail = (f"{m.group(1)} has shape {m.group(2)[11:-1]} in the adapter but {m.group(3)[11:-1]} in the base"
                  if m else msg[:200])
        raise MinioprdError(f"the adapter in {str(adapter_dir)!r} does not fit this base model ({detail}): "
                            f"{hint}") from None
    # Keys that load nowhere are only a warning in peft: a wrong base must be an error here.
    saved = _adapter_keys(adapter_dir)
    expected = set(get_peft_model_state_dict(pm).keys())
    stray, missing = sorted(saved - expected), sorted(expected - saved)
    if stray:
        raise MinioprdError(f"{len(stray)} of the adapter's {len(saved)} weights match nothing in this base model "
                            f"(e.g. {stray[0]}): {hint}")
    if missing:
        raise MinioprdError(f"the adapter file lacks {len(missing)} of its {len(expected)} weights (e.g. "
                            f"{missing[0]}): it is incomplete; re-save it from the run")
    pm.eval()
    return pm


def _adapter_keys(adapter_dir: Path) -> set[str]:
    f = adapter_dir / "adapter_model.safetensors"
    if f.is_file():
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            return set(fh.keys())
    import torch

    return set(torch.load(adapter_dir / "adapter_model.bin", map_location="meta", weights_only=True).keys())


def load_export_tokenizer(adapter_dir: Path, base_path: str) -> Any:
    """The run's tokenizer (saved next to the adapter), else the base's; with a chat template if either has one."""
    from transformers import AutoTokenizer

    has_own = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    errors = []
    for src in ([str(adapter_dir)] if has_own else []) + [base_path]:
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError, TypeError) as e:
            errors.append(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            continue
        if not getattr(tok, "chat_template", None) and src != base_path:
            with contextlib.suppress(OSError, ValueError, TypeError):
                tmpl = getattr(AutoTokenizer.from_pretrained(base_path), "chat_template", None)
                if tmpl:
                    tok.chat_template = tmpl
        return tok
    raise MinioprdError(f"no tokenizer found next to the adapter or in the base {base_path!r} ({errors[-1]}): "
                        f"pass a --base that has its tokenizer")


def prompt_texts(tok: Any) -> list[str]:
    """The fixed verification prompts, plus the chat prompt in the tokenizer's chat template if it has one."""
    texts = list(PROMPTS)
    if getattr(tok, "chat_template", None):
        with contextlib.suppress(Exception):
            texts.append(tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], tokenize=False,
                                                 add_generation_prompt=True))
    return texts


def prompt_ids(tok: Any, vocab_rows: int) -> list[Any]:
    import torch

    out = []
    for t in prompt_texts(tok):
        ids = tok(t, add_special_tokens=False)["input_ids"][:MAX_PROMPT_TOKENS]
        if ids and max(ids) < vocab_rows:
            out.append(torch.tensor([ids], dtype=torch.long))
    if not out:
        raise MinioprdError("the tokenizer maps the verification prompts to ids outside the model's vocabulary: "
                            "the tokenizer does not belong to this model; pass the matching --base")
    return out


def logits_on(model: Any, prompts: list[Any]) -> list[Any]:
    import torch

    with torch.inference_mode():
        return [model(input_ids=ids, use_cache=False).logits[0].float() for ids in prompts]


def max_abs_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- export plan


def _dense(param: Any) -> Any:
    """A parameter as a plain tensor; a bnb 4-bit weight is dequantized (what the forward pass computes with)."""
    if type(param).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        if getattr(param.quant_state, "packing_format_for_cpu", False):  # see load_base
            raise RuntimeError("4-bit weight was repacked for the CPU fast path; its scales are no longer exact")
        return bnbf.dequantize_4bit(param.data, param.quant_state)
    if type(param).__name__ == "Int8Params":
        raise MinioprdError("the base is loaded in 8-bit, which merge does not dequantize: pass an unquantized "
                            "or 4-bit --base")
    return param.detach()


def base_tensors(model: Any) -> dict[str, tuple[Any, str]]:
    """Checkpoint key -> (module, attribute), for the base model before peft wraps it; tied copies dropped.

    Module objects survive wrapping (peft keeps them as `base_layer`), so the plan can find their LoRA later.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    params: dict[str, Any] = {}
    for name in model.state_dict(keep_vars=True):  # bnb adds quant-state entries; keep real params/buffers
        with contextlib.suppress(AttributeError):
            params[name] = model.get_parameter_or_buffer(name)
    keep = remove_tied_weights_from_state_dict(dict(params), model)
    out = {}
    for name in keep:
        mod_name, _, attr = name.rpartition(".")
        out[name] = (model.get_submodule(mod_name) if mod_name else model, attr)
    return out


def export_plan(pm: Any, keys: dict[str, tuple[Any, str]], dtype: str) -> list[tuple[str, tuple, Callable]]:
    """[(key, shape, make_tensor)] in checkpoint order; make_tensor() gives the final tensor in `dtype`."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    target = _torch_dtype(dtype)
    adapter = pm.active_adapter
    lora_of: dict[int, Any] = {}
    saved_of: dict[int, Any] = {}
    for mod in pm.modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            lora_of[id(mod.get_base_layer())] = mod
        elif isinstance(mod, ModulesToSaveWrapper) and adapter in mod.modules_to_save:
            saved_of[id(mod.original_module)] = mod.modules_to_save[adapter]
        elif type(mod).__name__ in ("TrainableTokensWrapper", "TrainableTokensLayer", "ParamWrapper"):
            raise MinioprdError(f"the adapter uses {type(mod).__name__}, which merge does not support: merge it "
                                f"with peft's merge_and_unload instead")
    covered = {id(m) for m, _ in keys.values()}
    for ident, lw in lora_of.items():
        if ident not in covered:
            raise MinioprdError(f"the adapter changes {type(lw).__name__} weights that the checkpoint stores "
                                f"tied to another tensor (shared embeddings?): merge does not support that")
    param_users: dict[int, int] = {}
    for mod, attr in keys.values():
        p = getattr(mod, attr)
        param_users[id(p)] = param_users.get(id(p), 0) + 1

    for mod in lora_of.values():  # a diverged run leaves NaN/inf in the LoRA factors: check them, not W
        factors = [mod.lora_A[adapter].weight, mod.lora_B[adapter].weight]
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            raise MinioprdError("the adapter's LoRA weights contain NaN or inf: the run diverged; merge an "
                                "earlier checkpoint's adapter")

    def finish(key: str, t: Any) -> Any:
        if not t.is_floating_point():
            return t.contiguous()
        out = t.to(target)
        if target == torch.float16 and t.dtype != torch.float16 and bool(torch.isinf(out).any()):
            raise MinioprdError(f"merged weight {key} has values beyond the fp16 range: use --dtype bf16")
        return out.contiguous()

    plan = []
    for key, (mod, attr) in keys.items():
        lw = lora_of.get(id(mod))
        src = saved_of.get(id(mod))
        shape = tuple(getattr(mod, attr).shape)
        if lw is not None and attr == "weight":
            if type(getattr(mod, attr)).__name__ == "Params4bit":
                shape = tuple(getattr(mod, attr).quant_state.shape)

            def make(key=key, lw=lw, mod=mod) -> Any:
                w = _dense(mod.weight)
                if adapter in getattr(lw, "lora_variant", {}):  # DoRA and friends: peft's own merge formula
                    merged = lw.lora_variant[adapter].merge_safe(lw, adapter, w.float().clone()).float()
                else:
                    merged = lw.get_delta_weight(adapter).float()
                    if merged.shape != w.shape:
                        raise MinioprdError(f"LoRA delta for {key} has shape {tuple(merged.shape)}, the weight "
                                            f"{tuple(w.shape)}: merge does not support this layer type")
                    merged += w  # W + ΔW in fp32, rounded once by finish()
                return finish(key, merged)
        elif lw is not None and attr == "bias" and lw.lora_bias.get(adapter, False):
            def make(key=key, lw=lw, mod=mod) -> Any:
                b = lw.lora_B[adapter].bias.detach().float() * lw.scaling[adapter]
                return finish(key, mod.bias.detach().float() + b)
        elif src is not None:
            def make(key=key, src=src, attr=attr) -> Any:
                return finish(key, _dense(getattr(src, attr)))
        else:
            p = getattr(mod, attr)
            if type(p).__name__ == "Params4bit":
                shape = tuple(p.quant_state.shape)
            if param_users.get(id(p), 0) > 1:
                raise MinioprdError(f"weight {key} is shared with another tensor in an unexpected way: merge does "
                                    f"not support this model")

            def make(key=key, mod=mod, attr=attr) -> Any:
                return finish(key, _dense(getattr(mod, attr)))
        plan.append((key, shape, make))
    return plan


def _nbytes(shape: tuple, dtype: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


def _reversible(conversion: Any) -> bool:
    """Renames can be reverted; load-only steps (e.g. deserializing a bnb-4bit checkpoint) cannot, and the
    weights written here are dense anyway."""
    try:
        conversion.reverse_transform()
        return True
    except NotImplementedError:
        return False


def write_weights(out: Path, plan: list[tuple[str, tuple, Callable]], dtype: str, max_shard: int,
                  model: Any, log: Callable[[str], None]) -> tuple[int, int]:
    """Shards as transformers names them (model.safetensors, or model-0000i-of-0000N + index)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    target = _torch_dtype(dtype)
    shards: list[list[tuple[str, tuple, Callable]]] = [[]]
    size = 0
    for item in plan:
        b = _nbytes(item[1], target)
        if shards[-1] and size + b > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += b
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    conversions = [c for c in getattr(model, "_weight_conversions", None) or [] if _reversible(c)]
    weight_map: dict[str, str] = {}
    total = 0
    for i, (name, shard) in enumerate(zip(names, shards)):
        tensors = {}
        for key, _, make in shard:
            tensors[key] = make()
            trim_heap()  # freed fp32 temporaries of each merged tensor would add up
        if conversions:  # checkpoint key renames transformers applied on load: write the original names back
            from transformers.core_model_loading import revert_weight_conversion

            loaded, model._weight_conversions = model._weight_conversions, conversions
            try:
                tensors = revert_weight_conversion(model, tensors)
            finally:
                model._weight_conversions = loaded
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            save_file(tensors, str(out / name), metadata={"format": "pt"})
        except (OSError, SafetensorError) as e:
            raise MinioprdError(f"could not write {out / name}: {e} (is the disk full?); nothing was written "
                                f"to the output") from None
        weight_map.update({k: name for k in tensors})
        del tensors
        if n > 1:
            log(f"wrote shard {i + 1}/{n}")
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return n, total


def write_config(model: Any, out: Path, dtype: str) -> None:
    """The base's config without quantization (or any peft trace), plus its generation config."""
    cfg = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            with contextlib.suppress(AttributeError):
                delattr(cfg, attr)
    cfg.dtype = _torch_dtype(dtype)
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.can_generate():
        gen.save_pretrained(out)


def _share_permissions(root: Path) -> None:
    """mkdtemp and safetensors create private (0700/0600) entries; an export should follow the umask."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        root.chmod(0o777 & ~mask)
        for f in root.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


def _free_disk_check(parent: Path, need: int) -> None:
    probe = parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need * 1.02 + (64 << 20):
        raise MinioprdError(f"not enough disk space in {str(probe)!r}: the merged model needs about "
                            f"{need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free; free some space or choose "
                            f"another --output")


def push(output: Path, repo: str, log: Callable[[str], None]) -> str:
    """Upload the verified directory as it is (no re-serialization)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        repo_id = api.create_repo(repo, exist_ok=True, repo_type="model").repo_id
        api.upload_folder(folder_path=str(output), repo_id=repo_id, repo_type="model",
                          commit_message="Upload model merged with minioprd")
    except Exception as e:  # noqa: BLE001 - any hub failure is reported in one line; the files stay local
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinioprdError(f"push to {repo!r} failed ({first}); the merged model is safe in {str(output)!r}: "
                            f"upload it with `hf upload {repo} {output}`") from None
    log(f"pushed to https://huggingface.co/{repo_id}")
    return repo_id


def _check_push_possible(repo: str) -> None:
    from minioprd.models import _offline

    if "/" not in repo and not re.fullmatch(r"[\w.-]+", repo):
        raise MinioprdError(f"--push-to-hub {repo!r} is not a repo id: use NAME or USER/NAME")
    if _offline():
        raise MinioprdError("--push-to-hub needs the network but HF_HUB_OFFLINE=1: unset it, or merge without "
                            "--push-to-hub and upload later")
    from huggingface_hub import get_token

    if not get_token():
        raise MinioprdError("--push-to-hub needs a Hugging Face token: run `hf auth login` (or set HF_TOKEN) first")


# ---------------------------------------------------------------------------------------------- main


def merge_adapter(adapter: str | Path, output: str | Path, base: str | None = None, dtype: str = "bf16",
                  force: bool = False, verify: bool = True, max_shard_size: int | str = "2GB",
                  push_to_hub: str | None = None, gguf_type: str | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Merge a LoRA adapter into its base and write a standalone model to `output`; returns a report.

    `gguf_type` (f16, bf16 or q8_0) also writes OUT/<name>-<type>.gguf and an Ollama Modelfile (export_gguf.py),
    run in llama.cpp against transformers when `verify` and llama-cpp-python is installed.

    Report keys: adapter, base, dtype, output, dequantized, shards, size_bytes, max_abs_diff, tolerance,
    adapter_effect (max |logit change| the adapter makes; the check is only meaningful above the tolerance),
    verified, seconds, peak_rss_mb, peak_anon_mb, pushed; gguf (path or None), gguf_size_bytes, gguf_check
    (verify_gguf's report, or None when not run).
    """
    t0 = time.time()
    if dtype not in DTYPES:
        raise MinioprdError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}: e.g. --dtype bf16")
    max_shard = parse_size(max_shard_size)
    adapter_dir = find_adapter_dir(adapter)
    adapter_cfg, meta = read_adapter(adapter_dir)
    resolved = resolve_base(base, adapter_cfg, meta)
    output = Path(output).expanduser()
    keep = [adapter_dir] + ([Path(resolved.path)] if Path(resolved.path).is_dir() else [])
    check_output(output, force, keep)
    if push_to_hub:
        _check_push_possible(push_to_hub)
    if gguf_type is not None:
        from minioprd.export_gguf import check_request

        check_request(_base_config(resolved.path), gguf_type)

    base_quant = _base_quantization(resolved.path)
    if base_quant is not None and not (base_quant.get("quant_method") == "bitsandbytes"
                                       and base_quant.get("load_in_4bit", base_quant.get("_load_in_4bit"))):
        raise MinioprdError(f"the base {resolved.path!r} is {base_quant.get('quant_method', 'quantized')}-"
                            f"quantized, which merge cannot dequantize: pass the original model with --base")
    four_bit = meta.get("student_quant") == "4bit" or base_quant is not None
    log(resolved.note)
    log(f"adapter: {adapter_dir} (LoRA r={adapter_cfg.get('r')}, alpha={adapter_cfg.get('lora_alpha')})")
    if four_bit:
        why = "student_quant=4bit" if meta.get("student_quant") == "4bit" else "the base checkpoint is 4-bit"
        log(f"QLoRA adapter ({why}): merging into the dequantized NF4 base, the weights it was trained "
            f"against, and writing {dtype} weights, never 4-bit ones")
    if (adapter_dir / PROJECTIONS).is_file():
        log(f"not exporting {PROJECTIONS} (width projections are used only during distillation)")

    from minioprd.files import atomic_dir

    report: dict[str, Any] = {"adapter": str(adapter_dir), "base": resolved.path, "dtype": dtype,
                              "output": str(output), "dequantized": four_bit, "max_abs_diff": None,
                              "tolerance": None, "adapter_effect": None, "verified": False, "pushed": None,
                              "gguf": None, "gguf_size_bytes": None, "gguf_check": None}
    with MemoryMonitor() as mem:
        t = time.time()
        model = load_base(resolved.path, dtype, four_bit)
        keys = base_tensors(model)
        pm = attach_adapter(model, adapter_dir)
        log(f"loaded base + adapter on CPU in {time.time() - t:.1f} s")
        tok = load_export_tokenizer(adapter_dir, resolved.path)
        plan = export_plan(pm, keys, dtype)
        need = sum(_nbytes(shape, _torch_dtype(dtype)) for _, shape, _ in plan)
        if gguf_type is not None:
            from minioprd.export_gguf import estimate_bytes

            need += estimate_bytes(sum(math.prod(shape) for _, shape, _ in plan), gguf_type)
        _free_disk_check(output.parent, need)
        ref = None
        if verify:
            prompts = prompt_ids(tok, int(model.get_input_embeddings().weight.shape[0]))
            ref = logits_on(pm, prompts)
            with pm.disable_adapter():
                plain = logits_on(pm, prompts)
            report["adapter_effect"] = max_abs_diff(ref, plain)
            scale = max(1.0, max(float(r.abs().max()) for r in ref))
            report["tolerance"] = RTOL[dtype] * scale
            del plain
        with atomic_dir(output) as tmp:
            t = time.time()
            shards, total = write_weights(tmp, plan, dtype, max_shard, model, log)
            write_config(model, tmp, dtype)
            tok.save_pretrained(str(tmp))
            size = f"{total / 1e9:.2f} GB" if total >= 1e9 else f"{total / 1e6:.1f} MB"
            log(f"wrote {size} of {dtype} weights in {shards} shard(s) in {time.time() - t:.1f} s")
            report.update(shards=shards, size_bytes=total)
            del plan, keys, pm, model
            gc.collect()
            trim_heap()
            if verify:
                _verify(tmp, dtype, prompts, ref, report, log)
            if gguf_type is not None:
                _gguf(tmp, output, gguf_type, verify, report, log)
            _share_permissions(tmp)
    report["peak_rss_mb"] = round(mem.peak_rss / 2**20)
    report["peak_anon_mb"] = round(mem.peak_anon / 2**20)
    log(f"merged model written to {output}")
    if push_to_hub:
        report["pushed"] = push(output, push_to_hub, log)
    report["seconds"] = round(time.time() - t0, 2)
    return report


def _gguf(tmp: Path, output: Path, gguf_type: str, verify: bool, report: dict[str, Any],
          log: Callable[[str], None]) -> None:
    """GGUF + Modelfile next to the merged weights, run in llama.cpp when it is installed (and verify is on)."""
    from transformers import AutoTokenizer

    from minioprd.export_gguf import export_gguf, gguf_file_name, llama_cpp_available, modelfile_text, verify_gguf

    tok = AutoTokenizer.from_pretrained(str(tmp))  # as written: what llama.cpp must reproduce
    name = gguf_file_name(output, gguf_type)
    res = export_gguf(tmp, tmp / name, gguf_type, log=log, tok=tok)
    (tmp / "Modelfile").write_text(modelfile_text(tmp, name, tok=tok))
    report.update(gguf=str(output / name), gguf_size_bytes=res["size_bytes"])
    if not verify:
        return
    if not llama_cpp_available():
        log("note: llama-cpp-python is not installed, so the GGUF was not run in llama.cpp (pip install "
            "llama-cpp-python, then merge again to check it)")
        return
    report["gguf_check"] = verify_gguf(tmp / name, tmp, prompt_texts(tok), gguf_type, log=log,
                                       max_prompt_tokens=MAX_PROMPT_TOKENS, tok=tok)


def _verify(tmp: Path, dtype: str, prompts: list[Any], ref: list[Any], report: dict[str, Any],
            log: Callable[[str], None]) -> None:
    """Reload what was written with transformers alone and compare logits with base+adapter."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=_torch_dtype(dtype))
    merged.eval()
    got = logits_on(merged, prompts)
    del merged
    gc.collect()
    trim_heap()
    diff = max_abs_diff(got, ref)
    tol = report["tolerance"]
    report["max_abs_diff"] = diff
    log(f"verify: max |logit difference| vs base+adapter = {diff:.3g} on {len(prompts)} prompts "
        f"(tolerance {tol:.3g} for {dtype}; the adapter itself moves logits by up to {report['adapter_effect']:.3g})")
    if not diff <= tol:  # also catches NaN
        raise MinioprdError(f"verification failed: the merged model's logits differ from base+adapter by {diff:.3g}, "
                            f"above the {dtype} tolerance {tol:.3g}; nothing was written to the output (rerun "
                            f"with --debug and report it, or try --dtype fp32)")
    if report["adapter_effect"] is not None and report["adapter_effect"] <= tol:
        log(f"note: the adapter changes logits by at most {report['adapter_effect']:.3g}, within the tolerance, "
            f"so this check cannot tell a merged adapter from a missing one; --dtype fp32 checks tighter")
    report["verified"] = True
