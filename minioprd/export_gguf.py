"""GGUF export of a merged model, for llama.cpp, Ollama and LM Studio: `minioprd merge ... --gguf`.

The GGUF is converted from the merged transformers directory that `merge` has just written and verified, with
the `gguf` package's writer (and its quantizer for q8_0); an Ollama `Modelfile` is written next to it. What
llama.cpp expects, family by family (checked against llama.cpp's own loader and converter):

- Architectures: Qwen2ForCausalLM -> `qwen2` (Qwen2, Qwen2.5), Qwen3ForCausalLM -> `qwen3`, LlamaForCausalLM ->
  `llama` (Llama-3.x, SmolLM/SmolLM2). Anything else is refused in one line before any work.
- Tensors: `model.layers.N.self_attn.q_proj.weight` -> `blk.N.attn_q.weight` and so on, names from the `gguf`
  package's tables, every one checked against the tensors llama.cpp defines for the architecture. Tied
  embeddings write no `output.weight` (llama.cpp reuses `token_embd`). Qwen2's q/k/v biases and Qwen3's q/k norms
  are ordinary tensors of their block.
- Llama's q/k rows are permuted: transformers rotates the two halves of each head (rotate_half), llama.cpp's
  `llama` graph rotates adjacent pairs, so each head's rows [0..d/2) and [d/2..d) are interleaved. Qwen2/Qwen3
  run llama.cpp's NEOX rope, which is transformers' layout: no permutation.
- Llama-3 rope scaling (`rope_type: llama3`) becomes the `rope_freqs.weight` tensor of per-frequency divisors,
  computed here as transformers' plain inverse frequencies over its llama3-scaled ones; linear and YaRN scaling
  become metadata.
- Precision: norms, biases and rope factors stay F32 (llama.cpp's kernels want them so); matrices are F16, BF16
  or Q8_0 (blocks of 32 along a row; a row length that is not a multiple of 32 falls back to F16).
- Tokenizer: byte-level BPE only (all four families): the vocabulary padded with `[PADi]` (UNUSED) up to the
  embedding rows, token types (special added tokens CONTROL, other added tokens USER_DEFINED), merges, BOS/EOS/
  PAD/UNK ids, whether BOS/EOS are added (measured by encoding a text with and without special tokens), the
  chat template, and llama.cpp's pre-tokenizer name, read off the tokenizer's own pre-tokenizer (Qwen2 regex ->
  `qwen2`, Llama-3 regex -> `llama-bpe`, single digits + GPT-2 regex -> `smollm`, GPT-2 regex -> `gpt-2`). An
  unknown pre-tokenizer is refused rather than exported to tokenize differently.

Verification (`verify_gguf`, run by merge after every export when `llama-cpp-python` is installed): the merged
transformers model (loaded in fp32) and llama.cpp each tokenize the fixed prompts (ids must be identical),
continue the first MAX_PROMPT_TOKENS tokens greedily for GREEDY_TOKENS tokens, and give logits on the same
prompt + continuation. Fails when max |logit difference| exceeds GGUF_RTOL[type] * s (s = max(1, max |logit|)),
or when the greedy continuations part where transformers' top-1/top-2 margin is above 2 * tolerance (only a
near-tie may flip within the tolerance). The check loads the merged model in fp32: 4 bytes per parameter.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from minioprd.errors import MinioprdError

GGUF_TYPES = ("f16", "bf16", "q8_0")
# HF architecture -> llama.cpp architecture and whether q/k rows need the rotate_half -> pairwise permutation.
FAMILIES = {"Qwen2ForCausalLM": ("qwen2", False), "Qwen3ForCausalLM": ("qwen3", False),
            "LlamaForCausalLM": ("llama", True)}
SUPPORTED = "Qwen2/Qwen2.5, Qwen3 and Llama (Llama-3.x, SmolLM2)"
# Tolerance on max |logit(llama.cpp) - logit(transformers, fp32)|, relative to s = max(1, max |logit|). llama.cpp
# also rounds activations (to f16/bf16 in the matrix products, f16 in the KV cache); for q8_0 weights its CPU
# kernels quantize the activations to 8 bits as well. Measured (README, "Run it in llama.cpp / Ollama"): f16
# 0.1-0.2% of s, bf16 0.7-1.3%, q8_0 1.2-2.8% on tiny 2-layer models and 9.5% on SmolLM2-135M (30 layers).
GGUF_RTOL = {"f16": 2e-2, "bf16": 6e-2, "q8_0": 2e-1}
GREEDY_TOKENS = 32
# Pre-tokenizer regexes as the model families' tokenizer.json files spell them.
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
_LLAMA3_RE = _QWEN2_RE.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_PRE_TOKENIZERS = {
    (("split", _QWEN2_RE), ("bytelevel", False)): "qwen2",
    (("split", _LLAMA3_RE), ("bytelevel", False)): "llama-bpe",
    (("digits", True), ("bytelevel", True)): "smollm",
    (("bytelevel", True),): "gpt-2",
}
# Checkpoint module (inside model.layers.N) -> gguf MODEL_TENSOR member name.
_BLOCK_TENSORS = {
    "input_layernorm": "ATTN_NORM", "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V", "self_attn.o_proj": "ATTN_OUT", "self_attn.q_norm": "ATTN_Q_NORM",
    "self_attn.k_norm": "ATTN_K_NORM", "post_attention_layernorm": "FFN_NORM", "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN",
}
_TOP_TENSORS = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}
_INSTALL = "pip install 'minioprd[gguf]'"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MinioprdError(f"--gguf needs the gguf package: {_INSTALL} (or pip install gguf)") from None
    return gguf


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_request(config: dict[str, Any], gguf_type: str) -> tuple[str, bool]:
    """(llama.cpp architecture, permute q/k) for a base config, or one clear error before any work."""
    if gguf_type not in GGUF_TYPES:
        raise MinioprdError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}: e.g. --gguf-type f16")
    _gguf()
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "unknown")
    if arch not in FAMILIES:
        raise MinioprdError(f"GGUF export supports {SUPPORTED} models; this base is {arch}: drop --gguf (the "
                            f"merged transformers directory needs no GGUF)")
    return FAMILIES[arch]


def gguf_file_name(output: Path, gguf_type: str) -> str:
    stem = re.sub(r"[^\w.-]+", "-", Path(output).name).strip("-.") or "model"
    return f"{stem}-{gguf_type}.gguf"


def estimate_bytes(n_params: int, gguf_type: str) -> int:
    return int(n_params * (34 / 32 if gguf_type == "q8_0" else 2)) + (16 << 20)


# ---------------------------------------------------------------------------------------------- tensors


def _checkpoint_tensors(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a (possibly sharded) transformers directory."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {k: model_dir / "model.safetensors" for k in f.keys()}


def _gguf_name(gguf: Any, arch: str, key: str) -> str:
    """Checkpoint key -> GGUF tensor name, checked against the tensors llama.cpp defines for `arch`."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    member, bid = (None, None)
    if m:
        member, bid, suffix = _BLOCK_TENSORS.get(m.group(2)), int(m.group(1)), m.group(3)
    else:
        m = re.fullmatch(r"(.+)\.(weight|bias)", key)
        if m:
            member, suffix = _TOP_TENSORS.get(m.group(1)), m.group(2)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    if member is None or gguf.MODEL_TENSOR[member] not in gguf.MODEL_TENSORS[model_arch]:
        raise MinioprdError(f"the merged model has a tensor {key!r} that llama.cpp's {arch} architecture does not "
                            f"have: this model variant cannot be exported to GGUF; drop --gguf")
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]]
    return (name.format(bid=bid) if bid is not None else name) + "." + suffix


def _rope_interleave(w: Any, n_head: int) -> Any:
    """transformers' rotate_half row order -> llama.cpp's pairwise order: per head, rows i and d/2+i adjacent."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def _llama3_rope_factors(model_dir: Path) -> Any:
    """Per-frequency divisors llama.cpp applies (`rope_freqs`): transformers' default inverse frequencies over
    its llama3-scaled ones, computed by transformers itself so the two cannot disagree."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(str(model_dir))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = _rope_params(config.to_dict())["rope_theta"]
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (plain / scaled.double()).float().numpy()


def _tensor_plan(gguf: Any, model_dir: Path, cfg: dict[str, Any], arch: str, permute: bool,
                 gguf_type: str) -> list[tuple[str, tuple[int, ...], Any, Callable[[], Any]]]:
    """[(gguf name, shape, GGML type, load() -> float32 numpy)] in checkpoint order."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    matrix_type = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    files = _checkpoint_tensors(model_dir)
    tied = bool(cfg.get("tie_word_embeddings", False))
    from safetensors import safe_open

    plan = []
    rp = _rope_params(cfg)
    if rp["rope_type"] == "llama3":
        factors = _llama3_rope_factors(model_dir)
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", tuple(factors.shape), Q.F32,
                     lambda f=factors: f))
    for key, file in files.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = _gguf_name(gguf, arch, key)
        with safe_open(str(file), framework="pt") as f:
            shape = tuple(f.get_slice(key).get_shape())

        def load(key=key, file=file) -> Any:
            with safe_open(str(file), framework="pt") as f:
                t = f.get_tensor(key).float()
            if permute and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", key):
                t = _rope_interleave(t, n_head if ".q_proj." in key else n_kv)
            return np.ascontiguousarray(t.numpy(), dtype=np.float32)

        if len(shape) <= 1 or name.endswith("_norm.weight"):
            qtype = Q.F32
        elif matrix_type == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            qtype = Q.F16
        else:
            qtype = matrix_type
        plan.append((name, shape, qtype, load))
    if not any(n == "token_embd.weight" for n, *_ in plan):
        raise MinioprdError(f"the merged model in {str(model_dir)!r} has no model.embed_tokens.weight: it is not a "
                            f"complete {arch} checkpoint")
    if not tied and not any(n == "output.weight" for n, *_ in plan):
        raise MinioprdError("the merged model has untied embeddings but no lm_head.weight: it is incomplete")
    return plan


def _encode(gguf: Any, name: str, data: Any, qtype: Any) -> Any:
    import numpy as np

    out = gguf.quants.quantize(data, qtype)
    if qtype == gguf.GGMLQuantizationType.F16 and not bool(np.isfinite(out).all()) and bool(np.isfinite(data).all()):
        raise MinioprdError(f"tensor {name} has values beyond the f16 range: use --gguf-type bf16")
    return out


# ---------------------------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(tj: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, read off tokenizer.json; refuses unknown ones."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape: list[tuple[Any, ...]] = []
    for s in steps:
        kind = s.get("type")
        if kind == "Split":
            shape.append(("split", (s.get("pattern") or {}).get("Regex")))
        elif kind == "ByteLevel" and not s.get("add_prefix_space", False):
            shape.append(("bytelevel", bool(s.get("use_regex", True))))
        elif kind == "Digits":
            shape.append(("digits", bool(s.get("individual_digits", False))))
        else:
            shape.append((str(kind), json.dumps(s, sort_keys=True)[:60]))
    name = _PRE_TOKENIZERS.get(tuple(shape))
    norm = (tj.get("normalizer") or {}).get("type")
    if name is None or norm not in (None, "NFC"):
        raise MinioprdError("the tokenizer's pre-tokenizer is not one llama.cpp implements for this export "
                            f"({', '.join(str(s[0]) for s in shape) or 'none'}; normalizer {norm}): GGUF export "
                            f"supports the tokenizers of {SUPPORTED}; drop --gguf")
    return name


def _vocab(gguf: Any, tok: Any, n_rows: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, pre-tokenizer) for a byte-level BPE tokenizer, padded to n_rows."""
    tj = json.loads(tok.backend_tokenizer.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MinioprdError(f"the tokenizer is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}, "
                            f"not byte-level BPE: GGUF export supports the tokenizers of {SUPPORTED}; drop --gguf")
    pre = _pre_tokenizer(tj)
    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise MinioprdError(f"tokenizer merge {m!r} cannot be written to GGUF (spaces inside a merge part)")
        merges.append(f"{pair[0]} {pair[1]}")
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= n_rows:
        raise MinioprdError(f"the tokenizer has ids up to {max(vocab.values())} but the model has {n_rows} embedding "
                            f"rows: the tokenizer does not belong to this model")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
            continue
        text = by_id[i]
        tokens.append(text)
        if i in added:
            # <|...|> added tokens are control tokens even where a tokenizer forgot to mark them special.
            special = added[i].special or (text.startswith("<|") and text.endswith("|>"))
            types.append(int(T.CONTROL if special else T.USER_DEFINED))
        else:
            types.append(int(T.NORMAL))
    return tokens, types, merges, pre


def _adds_special(tok: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding with special tokens, as measured on a sample text."""
    text = "Hello world"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    full = tok(text)["input_ids"]
    bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    return bos, eos


def _eos_ids(tok: Any, gen: dict[str, Any]) -> list[int]:
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    g = gen.get("eos_token_id")
    ids += g if isinstance(g, list) else ([g] if isinstance(g, int) else [])
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


# ---------------------------------------------------------------------------------------------- writing


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _read_dir_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def export_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: str = "f16",
                log: Callable[[str], None] = print, tok: Any = None) -> dict[str, Any]:
    """Convert a merged transformers directory to one GGUF file (written to a temporary name, then renamed).

    Returns {"path", "size_bytes", "tensors", "arch", "pre_tokenizer", "seconds"}. `tok`: the directory's
    tokenizer if already loaded.
    """
    t0 = time.time()
    gguf = _gguf()
    model_dir, out_file = Path(model_dir), Path(out_file)
    cfg = _read_dir_json(model_dir / "config.json")
    arch, permute = check_request(cfg, gguf_type)
    rp = _rope_params(cfg)
    if rp["rope_type"] not in ("default", "linear", "yarn", "llama3") or (rp["rope_type"] == "llama3"
                                                                          and arch != "llama"):
        raise MinioprdError(f"rope scaling {rp['rope_type']!r} is not supported by the GGUF export: drop --gguf")
    gen = _read_dir_json(model_dir / "generation_config.json")
    tok = tok if tok is not None else _load_tokenizer(model_dir)
    plan = _tensor_plan(gguf, model_dir, cfg, arch, permute, gguf_type)
    n_rows = next(shape[0] for name, shape, *_ in plan if name == "token_embd.weight")
    tokens, types, merges, pre = _vocab(gguf, tok, n_rows)

    w = gguf.GGUFWriter(None, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(out_file.name.removesuffix(".gguf"))
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(rp["rope_theta"])
    if cfg.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(n_rows)
        w.add_rope_dimension_count(head_dim)
    if rp["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    elif rp["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = _eos_ids(tok, gen)
    for add, tid in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, eos[0] if eos else None),
                     (w.add_pad_token_id, tok.pad_token_id), (w.add_unk_token_id, tok.unk_token_id)):
        if tid is not None:
            add(int(tid))
    add_bos, add_eos = _adds_special(tok)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    if isinstance(getattr(tok, "chat_template", None), str):
        w.add_chat_template(tok.chat_template)
    if gen.get("do_sample"):  # llama.cpp's defaults for sampling, as generation_config sets them
        if isinstance(gen.get("temperature"), (int, float)):
            w.add_sampling_temp(float(gen["temperature"]))
        if isinstance(gen.get("top_k"), int):
            w.add_sampling_top_k(gen["top_k"])
        if isinstance(gen.get("top_p"), (int, float)):
            w.add_sampling_top_p(float(gen["top_p"]))

    import numpy as np

    for name, shape, qtype, _ in plan:
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(name, shape, np.dtype(dt), math.prod(shape) * np.dtype(dt).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.", dir=out_file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, shape, qtype, load) in enumerate(_progress(plan, f"writing {out_file.name}")):
            w.write_tensor_data(_encode(gguf, name, load(), qtype))
        w.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_file)
    except OSError as e:
        raise MinioprdError(f"could not write {out_file}: {e.strerror or e} (is the disk full?)") from None
    finally:
        w.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        out_file.chmod(0o666 & ~mask)
    size = out_file.stat().st_size
    log(f"wrote {out_file.name}: {_size(size)}, {len(plan)} tensors ({arch}, {gguf_type}, pre-tokenizer {pre}) "
        f"in {time.time() - t0:.1f} s")
    return {"path": str(out_file), "size_bytes": size, "tensors": len(plan), "arch": arch, "pre_tokenizer": pre,
            "seconds": round(time.time() - t0, 2)}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _progress(items: list[Any], what: str) -> Any:
    """Iterate with a transient rich progress bar on a terminal (quantizing a 7B model takes minutes)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as p:
        yield from p.track(items, description=what)


# ---------------------------------------------------------------------------------------------- Ollama


def _ollama_template(chat_template: str) -> str | None:
    """Ollama's Go template for the two chat formats these families use; None: Ollama reads the GGUF's own."""
    if "<|im_start|>" in chat_template:
        return ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                '<|im_start|>assistant\n')
    if "<|start_header_id|>" in chat_template:
        return ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
                '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
                '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
    return None


def _default_system(tok: Any) -> str | None:
    """The system prompt a ChatML template adds when the conversation has none (Qwen2.5, SmolLM2 do)."""
    with contextlib.suppress(Exception):
        text = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
        m = re.match(r"\s*<\|im_start\|>system\n(.*?)<\|im_end\|>", text, flags=re.DOTALL)
        if m and "\x00" not in m.group(1):
            return m.group(1)
    return None


def modelfile_text(model_dir: str | Path, gguf_name: str, tok: Any = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, its chat format, stop tokens and generation_config's sampling."""
    model_dir = Path(model_dir)
    tok = tok if tok is not None else _load_tokenizer(model_dir)
    gen = _read_dir_json(model_dir / "generation_config.json")
    lines = [f"# Ollama: ollama create {gguf_name.removesuffix('.gguf')} -f Modelfile && ollama run "
             f"{gguf_name.removesuffix('.gguf')}", f"FROM ./{gguf_name}"]
    chat = getattr(tok, "chat_template", None)
    tmpl = _ollama_template(chat) if isinstance(chat, str) else None
    if tmpl is not None:
        lines.append(f'TEMPLATE """{tmpl}"""')
        system = _default_system(tok)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF")
    stops = [tok.convert_ids_to_tokens(i) for i in _eos_ids(tok, gen)]
    if isinstance(chat, str):
        stops += [s for s in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>") if s in chat and s in tok.get_vocab()]
    for s in dict.fromkeys(s for s in stops if isinstance(s, str)):
        lines.append(f'PARAMETER stop "{s}"')
    if gen.get("do_sample"):
        for hf, ol in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                       ("repetition_penalty", "repeat_penalty")):
            if isinstance(gen.get(hf), (int, float)) and not isinstance(gen.get(hf), bool):
                lines.append(f"PARAMETER {ol} {gen[hf]}")
    else:  # transformers decodes greedily without do_sample
        lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- verification


def _hf_reference(model_dir: Path, prompts: list[list[int]], n_new: int) -> list[dict[str, Any]]:
    """Greedy continuation (with KV cache) and logits on prompt + continuation, transformers in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            res = model(input_ids=x, use_cache=True)
            past, gen, margins = res.past_key_values, [], []
            for _ in range(n_new):
                last = res.logits[0, -1].float()
                top2 = torch.topk(last, 2).values
                margins.append(float(top2[0] - top2[1]))
                nxt = int(last.argmax())
                gen.append(nxt)
                res = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = res.past_key_values
            seq = ids + gen
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float().numpy()
            out.append({"prompt": ids, "greedy": gen, "margins": margins, "logits": logits})
    del model
    return out


def verify_gguf(gguf_file: str | Path, model_dir: str | Path, texts: list[str], gguf_type: str,
                log: Callable[[str], None] = print, max_prompt_tokens: int = 32,
                n_new: int = GREEDY_TOKENS, tok: Any = None) -> dict[str, Any]:
    """Run the GGUF in llama.cpp (llama-cpp-python) against transformers on the merged directory.

    Returns {"max_abs_diff", "tolerance", "greedy_match" (identical leading tokens per prompt), "greedy_tokens",
    "tokenization_match" (prompts tokenized identically), "prompts"}; raises MinioprdError when it fails.
    """
    import gc

    import numpy as np
    import torch

    model_dir = Path(model_dir)
    tok = tok if tok is not None else _load_tokenizer(model_dir)
    pairs = [(t, tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    pairs = [(t, ids) for t, ids in pairs if ids]
    full = [ids for _, ids in pairs]
    prompts = [ids[:max_prompt_tokens] for ids in full]
    ref = _hf_reference(model_dir, prompts, n_new)
    gc.collect()
    from llama_cpp import Llama

    n_ctx = max(len(r["prompt"]) + n_new for r in ref) + 8
    with _quiet_stderr():
        llm = Llama(model_path=str(gguf_file), n_ctx=max(n_ctx, 128), n_batch=max(n_ctx, 128), logits_all=True,
                    n_threads=max(1, torch.get_num_threads()), n_gpu_layers=0, verbose=False)
    try:
        tok_ok = [llm.tokenize(t.encode(), add_bos=False, special=True) == ids for t, ids in pairs]
        diff, scale, greedy = 0.0, 1.0, []
        for r in ref:
            seq = r["prompt"] + r["greedy"]
            llm.reset()
            llm.eval(seq)
            got = np.asarray(llm.scores[:len(seq)], dtype=np.float32)
            diff = max(diff, float(np.abs(got - r["logits"]).max()))
            scale = max(scale, float(np.abs(r["logits"]).max()))
            llm.reset()
            llm.eval(r["prompt"])
            gen = []
            for _ in range(n_new):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                gen.append(nxt)
                llm.eval([nxt])
            greedy.append(gen)
    finally:
        with contextlib.suppress(Exception):
            llm.close()
        del llm
        gc.collect()
    tol = GGUF_RTOL[gguf_type] * scale
    match = []
    unexplained = []
    for r, gen in zip(ref, greedy):
        k = next((i for i, (a, b) in enumerate(zip(r["greedy"], gen)) if a != b), n_new)
        match.append(k)
        if k < n_new and r["margins"][k] > 2 * tol:
            unexplained.append((k, r["margins"][k]))
    report = {"max_abs_diff": diff, "tolerance": tol, "greedy_match": match, "greedy_tokens": n_new,
              "tokenization_match": sum(tok_ok), "prompts": len(ref)}
    log(f"llama.cpp check ({gguf_type}): max |logit difference| vs transformers = {diff:.3g} (tolerance {tol:.3g}); "
        f"greedy tokens identical: {', '.join(f'{k}/{n_new}' for k in match)}; prompts tokenized identically: "
        f"{sum(tok_ok)}/{len(tok_ok)}")
    problems = []
    if not diff <= tol:  # also catches NaN
        problems.append(f"logits differ by {diff:.3g}, above the {gguf_type} tolerance {tol:.3g}")
    if not all(tok_ok):
        problems.append(f"llama.cpp tokenizes {len(tok_ok) - sum(tok_ok)} of {len(tok_ok)} prompts differently")
    if unexplained:
        k, m = unexplained[0]
        problems.append(f"greedy decoding parts at token {k + 1} where transformers' top-2 margin {m:.3g} exceeds "
                        f"twice the tolerance")
    if problems:
        raise MinioprdError(f"GGUF verification failed: {'; '.join(problems)}; nothing was written to the output "
                            f"(rerun with --debug and report it, or use --no-verify to keep an unchecked file)")
    return report


@contextlib.contextmanager
def _quiet_stderr() -> Any:
    """llama.cpp prints its load log from C to fd 2 even with verbose=False on some builds."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def summary(report: dict[str, Any]) -> str:
    """One line on the GGUF for the CLI, from merge_adapter's report."""
    chk = report.get("gguf_check")
    if chk:
        check = (f"llama.cpp max |Δlogit| {chk['max_abs_diff']:.3g} ≤ {chk['tolerance']:.3g}, identical greedy tokens "
                 f"{','.join(map(str, chk['greedy_match']))} of {chk['greedy_tokens']}")
    else:
        check = "not run in llama.cpp" + (" (--no-verify)" if not report.get("verified") else
                                          " (llama-cpp-python is not installed)")
    return f"gguf: {report['gguf']} ({_size(report['gguf_size_bytes'])}); {check}"
