"""What `minioprd plan` knows without downloading anything: GPU cards by name, and model shapes (layers, widths,
heads, vocabulary) from embedded configs, a local directory's config.json, or the Hugging Face cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minioprd.errors import MinioprdError


@dataclass(frozen=True)
class GPU:
    name: str
    mib: int  # total memory as nvidia-smi reports it
    bf16: bool  # Ampere or newer; the T4 and P100 compute in fp16


# nvidia-smi totals (MiB) of the common cards; the CUDA context is a separate term of the estimate.
GPUS: dict[str, GPU] = {
    "t4": GPU("NVIDIA T4 16 GB (Colab, Kaggle)", 15360, False),
    "p100": GPU("NVIDIA P100 16 GB (Kaggle)", 16384, False),
    "l4": GPU("NVIDIA L4 24 GB", 23034, True),
    "a10": GPU("NVIDIA A10 24 GB", 23028, True),
    "3060": GPU("GeForce RTX 3060 12 GB", 12288, True),
    "3090": GPU("GeForce RTX 3090 24 GB", 24576, True),
    "4090": GPU("GeForce RTX 4090 24 GB", 24564, True),
    "a100-40": GPU("NVIDIA A100 40 GB", 40960, True),
    "a100-80": GPU("NVIDIA A100 80 GB", 81920, True),
    "h100": GPU("NVIDIA H100 80 GB", 81559, True),
}


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs from a model's config.json."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    dtype: str = "bfloat16"  # checkpoint dtype: what non-quantized weights load as
    qkv_bias: bool = False  # Qwen2/2.5
    qk_norm: bool = False  # Qwen3
    fused: bool = False  # Phi-3/4: qkv_proj and gate_up_proj
    source: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def linears(self) -> dict[str, tuple[int, int]]:
        """Linear layers of one block: name -> (in, out), named as in the HF module tree."""
        D, I = self.hidden, self.intermediate
        if self.fused:
            return {"qkv_proj": (D, self.q_dim + 2 * self.kv_dim), "o_proj": (self.q_dim, D),
                    "gate_up_proj": (D, 2 * I), "down_proj": (I, D)}
        return {"q_proj": (D, self.q_dim), "k_proj": (D, self.kv_dim), "v_proj": (D, self.kv_dim),
                "o_proj": (self.q_dim, D), "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}

    def linear_params(self) -> int:
        """Weights of all block linear layers (what bitsandbytes quantizes)."""
        return self.layers * sum(i * o for i, o in self.linears().values())

    def other_params(self) -> int:
        """Everything bitsandbytes leaves unquantized: embeddings, an untied lm_head, norms, biases."""
        per_layer = 2 * self.hidden + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0) \
            + (2 * self.hd if self.qk_norm else 0)
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()


def _m(name: str, layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int, tied: bool,
       **kw: Any) -> ModelShape:
    return ModelShape(name, layers, hidden, inter, heads, kv, vocab, tied, **kw)


# Embedded configs: the numbers of each model's config.json on the Hugging Face hub (num_hidden_layers,
# hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings,
# head_dim where set). Sources: the hub config.json files, cross-checked against the published parameter
# counts (Qwen2.5 model cards: 0.49B/1.54B/3.09B/7.61B/14.7B/32.5B; Qwen3 cards: 0.6B/1.7B/4.0B/8.2B/14.8B/
# 32.8B with their "non-embedding" figures; Llama 3.2/3.1 cards 1.24B/3.21B/8.03B; SmolLM2 134.5M/362M/1.71B;
# DeepSeek-R1-Distill-Qwen-1.5B 1.78B, untied). tests/test_plan.py recomputes these totals.
_Q25 = dict(qkv_bias=True)
_Q3 = dict(head_dim=128, qk_norm=True)
EMBEDDED: dict[str, ModelShape] = {s.name.lower(): s for s in [
    _m("Qwen2.5-0.5B", 24, 896, 4864, 14, 2, 151936, True, **_Q25),
    _m("Qwen2.5-1.5B", 28, 1536, 8960, 12, 2, 151936, True, **_Q25),
    _m("Qwen2.5-3B", 36, 2048, 11008, 16, 2, 151936, True, **_Q25),
    _m("Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, False, **_Q25),
    _m("Qwen2.5-14B", 48, 5120, 13824, 40, 8, 152064, False, **_Q25),
    _m("Qwen2.5-32B", 64, 5120, 27648, 40, 8, 152064, False, **_Q25),
    _m("Qwen2.5-Math-1.5B", 28, 1536, 8960, 12, 2, 151936, True, **_Q25),
    _m("Qwen2.5-Math-7B", 28, 3584, 18944, 28, 4, 152064, False, **_Q25),
    _m("DeepSeek-R1-Distill-Qwen-1.5B", 28, 1536, 8960, 12, 2, 151936, False, **_Q25),
    _m("JustRL-DeepSeek-1.5B", 28, 1536, 8960, 12, 2, 151936, False, **_Q25),  # RL'd copy of the above
    _m("DeepSeek-R1-Distill-Qwen-7B", 28, 3584, 18944, 28, 4, 152064, False, **_Q25),
    _m("DeepSeek-R1-Distill-Qwen-14B", 48, 5120, 13824, 40, 8, 152064, False, **_Q25),
    _m("Qwen3-0.6B", 28, 1024, 3072, 16, 8, 151936, True, **_Q3),
    _m("Qwen3-1.7B", 28, 2048, 6144, 16, 8, 151936, True, **_Q3),
    _m("Qwen3-4B", 36, 2560, 9728, 32, 8, 151936, True, **_Q3),
    _m("Qwen3-8B", 36, 4096, 12288, 32, 8, 151936, False, **_Q3),
    _m("Qwen3-14B", 40, 5120, 17408, 40, 8, 151936, False, **_Q3),
    _m("Qwen3-32B", 64, 5120, 25600, 64, 8, 151936, False, **_Q3),
    _m("Llama-3.2-1B", 16, 2048, 8192, 32, 8, 128256, True, head_dim=64),
    _m("Llama-3.2-3B", 28, 3072, 8192, 24, 8, 128256, True, head_dim=128),
    _m("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256, False),
    _m("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, True),
    _m("SmolLM2-360M", 32, 960, 2560, 15, 5, 49152, True),
    _m("SmolLM2-1.7B", 24, 2048, 8192, 32, 32, 49152, True),
    _m("Phi-4-mini-instruct", 32, 3072, 8192, 24, 8, 200064, True, fused=True),
    _m("Phi-4-mini-reasoning", 32, 3072, 8192, 24, 8, 200064, True, fused=True),
]}
_SUFFIXES = ("-instruct", "-base", "-it")


def _embedded(name: str) -> ModelShape | None:
    key = name.rsplit("/", 1)[-1].lower()
    if key in EMBEDDED:
        return EMBEDDED[key]
    for suffix in _SUFFIXES:  # instruction-tuned variants share their base's shape
        if key.endswith(suffix) and key[: -len(suffix)] in EMBEDDED:
            return EMBEDDED[key[: -len(suffix)]]
    return None


def shape_from_config(data: dict[str, Any], name: str, source: str) -> ModelShape:
    """A ModelShape from a parsed config.json (multimodal configs: their text_config)."""
    data = data.get("text_config") or data
    try:
        heads = int(data["num_attention_heads"])
        model_type = str(data.get("model_type", ""))
        return ModelShape(
            name=name, layers=int(data["num_hidden_layers"]), hidden=int(data["hidden_size"]),
            intermediate=int(data["intermediate_size"]), heads=heads,
            kv_heads=int(data.get("num_key_value_heads") or heads), vocab=int(data["vocab_size"]),
            tied=bool(data.get("tie_word_embeddings", False)), head_dim=int(data.get("head_dim") or 0),
            dtype=str(data.get("dtype") or data.get("torch_dtype") or "bfloat16"),
            qkv_bias=model_type == "qwen2" or bool(data.get("attention_bias", False)),
            qk_norm=model_type.startswith("qwen3"), fused=model_type.startswith("phi3"), source=source)
    except (KeyError, TypeError, ValueError) as e:
        raise MinioprdError(f"{source} lacks {e} (or it is not a number): the planner needs num_hidden_layers, "
                            f"hidden_size, intermediate_size, num_attention_heads and vocab_size") from None


def _read_config(path: Path, name: str) -> ModelShape:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MinioprdError(f"could not read {path}: {e}") from None
    return shape_from_config(data, name, str(path))


def model_shape(name: str) -> ModelShape:
    """Shape of a model named as `distill` takes it: builtin:*, a local directory, a hub id or a short name.

    Offline: embedded configs first, then a local config.json, then the Hugging Face cache.
    """
    if name.startswith("builtin:"):
        from minioprd.builtin import builtin_model_dir

        return _read_config(builtin_model_dir(name) / "config.json", name)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise MinioprdError(f"{name!r} has no config.json: pass a Hugging Face model directory")
        return _read_config(p / "config.json", name)
    if p.suffix == ".json" and p.is_file():
        return _read_config(p, name)
    shape = _embedded(name)
    if shape is not None:
        return ModelShape(**{**shape.__dict__, "name": name.rsplit("/", 1)[-1],
                             "source": f"embedded config of {shape.name}"})
    from minioprd.models import KNOWN_MODELS

    repo = KNOWN_MODELS.get(name.lower(), name)
    if "/" in repo:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(repo, "config.json")
        except Exception:  # noqa: BLE001 - a malformed id or cache: fall through to the message
            cached = None
        if isinstance(cached, str):
            return _read_config(Path(cached), name)
    known = ", ".join(sorted(s.name for s in EMBEDDED.values()))
    raise MinioprdError(f"no config for {name!r}: pass a local model directory or its config.json, or one of "
                        f"the embedded models ({known})")
