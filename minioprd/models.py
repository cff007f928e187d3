"""Loading the teacher (frozen, 4-bit by default) and the LoRA student, and checking they share a tokenizer;
and the model specs `minioprd eval` takes (a model, an adapter or run dir, BASE+ADAPTER, @4bit).

Model arguments are a local directory, a hub id (`Qwen/Qwen2.5-7B`), a known short name (`Qwen2.5-7B`,
resolved to its hub id), or `builtin:*` (models built offline, see `builtin/`).
"""

from __future__ import annotations

import json
import logging
import re
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minioprd.errors import MinioprdError

# bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward from kernels-community" on import.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

_FAMILIES = {
    "Qwen/": [f"Qwen2.5-{s}{v}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")
              for v in ("", "-Instruct")]
    + [f"Qwen2.5-Math-{s}{v}" for s in ("1.5B", "7B") for v in ("", "-Instruct")]
    + [f"Qwen3-{s}{v}" for s in ("0.6B", "1.7B", "4B", "8B", "14B", "32B") for v in ("", "-Base")],
    "HuggingFaceTB/": [f"SmolLM2-{s}{v}" for s in ("135M", "360M", "1.7B") for v in ("", "-Instruct")],
    "meta-llama/": [f"Llama-3.2-{s}{v}" for s in ("1B", "3B") for v in ("", "-Instruct")]
    + ["Llama-3.1-8B", "Llama-3.1-8B-Instruct"],
    "deepseek-ai/": [f"DeepSeek-R1-Distill-Qwen-{s}" for s in ("1.5B", "7B", "14B")],
    "microsoft/": ["Phi-4-mini-reasoning", "Phi-4-mini-instruct"],
    "hbx/": ["JustRL-DeepSeek-1.5B"],  # the paper's RL'd teacher of DeepSeek-R1-Distill-Qwen-1.5B
}
KNOWN_MODELS: dict[str, str] = {name.lower(): org + name for org, names in _FAMILIES.items() for name in names}


@dataclass
class ResolvedModel:
    name: str  # what the user typed
    path: str  # local directory or hub id handed to from_pretrained
    note: str  # one line for the console, e.g. "Qwen2.5-7B -> Qwen/Qwen2.5-7B"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model(name: str, role: str = "model") -> ResolvedModel:
    """Map a model argument to something `from_pretrained` can open, failing fast and clearly.

    Fails within seconds (not a 46-second hub timeout) when the model is neither local nor reachable.
    """
    if name.startswith("builtin:"):
        from minioprd.builtin import builtin_model_dir

        path = builtin_model_dir(name)
        return ResolvedModel(name, str(path), f"{role}: {name} (built offline at {path})")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            hint = " (it looks like a LoRA adapter: pass its base model, or merge it first)" \
                if (p / "adapter_config.json").is_file() else ""
            raise MinioprdError(f"{role} directory {name!r} has no config.json{hint}: "
                                f"pass a Hugging Face model directory or hub id")
        return ResolvedModel(name, str(p), f"{role}: {p}")
    # A hub id is `org/name`; anything else with a slash, or starting like a path, is a (missing) path.
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 \
        or p.suffix in (".safetensors", ".bin", ".gguf")
    if looks_like_path:
        raise MinioprdError(f"{role} path {name!r} does not exist: check the path, or pass a hub id such "
                            f"as Qwen/Qwen2.5-0.5B")
    repo = KNOWN_MODELS.get(name.lower(), name)
    note = f"{role}: {name} -> {repo}" if repo != name else f"{role}: {repo}"
    if "/" not in repo:
        raise MinioprdError(f"unknown {role} {name!r}: pass a local directory, a hub id (org/name), or a "
                            f"known name such as Qwen2.5-0.5B, Qwen3-1.7B, SmolLM2-135M-Instruct")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return ResolvedModel(name, repo, note + " (local cache)")
    if _offline():
        raise MinioprdError(f"{role} {repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: "
                            f"download it first (`hf download {repo}`) or pass a local directory")
    from huggingface_hub import HfApi

    try:  # a short probe, so a missing network costs seconds rather than the client's long retries
        HfApi().model_info(repo, timeout=8)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot fetch this model"
        kind = type(e).__name__
        raise MinioprdError(f"cannot fetch {role} {repo!r} from the Hugging Face hub ({kind}): check the name "
                            f"and your network, or pass a local directory") from None
    return ResolvedModel(name, repo, note)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MinioprdError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the GPU supports it, fp16 on older cards (T4), fp32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def quantization_config(quant: str, compute_dtype: torch.dtype, skip_modules: list[str] | None = None) -> Any:
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        # NF4 + double quantization: ~0.5 byte/param, so a 7B teacher fits a T4 beside the student.
        # skip_modules (None: transformers' default, the LM head) stay in the compute dtype.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _from_pretrained(path: str, role: str, **kw: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kw)
    except torch.cuda.OutOfMemoryError:
        raise MinioprdError(f"out of GPU memory while loading the {role} {path!r}: use a 4-bit {role}, a smaller "
                            f"model, or run `minioprd plan` to see what fits") from None
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinioprdError(f"could not load the {role} from {path!r}: {first}") from None


# bitsandbytes' CPU 4-bit kernel repacks each weight on its first no-grad forward into blocks of 32 output rows
# and 64 input columns (bitsandbytes 0.50: functional._convert_weight_packed_for_cpu); any other shape fails
# there with a reshape error, so such linears are not quantized on a CPU.
CPU_NF4_BLOCK_IN, CPU_NF4_BLOCK_OUT = 64, 32


def cpu_nf4_unpackable(path: str, trust_remote_code: bool = False) -> tuple[list[str], int]:
    """(names of the linear layers bitsandbytes cannot run in 4 bit on a CPU, number of linear layers), read
    from the model's config on the meta device (no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # loading the weights reports this better
        return [], 0
    head = skeleton.get_output_embeddings()
    linears = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    bad = [n for n, m in linears if m is not head
           and (m.in_features % CPU_NF4_BLOCK_IN or m.out_features % CPU_NF4_BLOCK_OUT)]
    if bad:  # naming modules replaces transformers' default skip list: keep the LM head unquantized too
        bad += [n for n, m in linears if m is head]
    return bad, len(linears) - (head is not None)


def load_teacher(resolved: ResolvedModel, quant: str = "4bit", device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, trust_remote_code: bool = False, log: Any = None) -> Any:
    """The frozen teacher: eval mode, no gradients (callers also run it under torch.no_grad()).

    dtype: the run's compute dtype, used on a GPU (fp16 on a T4, which has no fast bf16; bf16 when None). On a
    CPU it is ignored: NF4 layers compute in bf16 and unquantized weights stay fp32.
    """
    device = torch.device(device)
    if device.type != "cuda":
        dtype = None
    compute = dtype or (torch.bfloat16 if device.type == "cuda" or quant == "4bit" else torch.float32)
    kw: dict[str, Any] = {"device_map": {"": str(device)}, "trust_remote_code": trust_remote_code}
    skips, total = cpu_nf4_unpackable(resolved.path, trust_remote_code) if quant == "4bit" and \
        device.type == "cpu" else ([], 0)
    qc = quantization_config(quant, compute, skips or None)
    if qc is not None:
        kw["quantization_config"] = qc
    else:
        kw["dtype"] = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = _from_pretrained(resolved.path, "teacher", **kw)
    if skips:
        kept = model.get_submodule(skips[0]).weight.dtype
        n = len(skips) - (model.get_output_embeddings() is not None)
        (log or print)(f"note: {n} of the teacher's {total} linear layers have shapes bitsandbytes' CPU 4-bit kernel "
                       f"cannot pack (inputs a multiple of {CPU_NF4_BLOCK_IN}, outputs of {CPU_NF4_BLOCK_OUT}): "
                       f"they stay in {str(kept).removeprefix('torch.')}, the rest is NF4")
    model.eval()
    model.requires_grad_(False)
    return model


def load_student(resolved: ResolvedModel, lora: Any, quant: str = "none", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, trust_remote_code: bool = False) -> Any:
    """The student: base weights frozen (optionally 4-bit, i.e. QLoRA) with a trainable LoRA adapter."""
    device = torch.device(device)
    kw: dict[str, Any] = {"device_map": {"": str(device)}, "dtype": dtype, "trust_remote_code": trust_remote_code}
    qc = quantization_config(quant, dtype if dtype != torch.float32 else torch.bfloat16)
    if qc is not None:
        kw["quantization_config"] = qc
    model = _from_pretrained(resolved.path, "student", **kw)
    if qc is not None:
        keep_cpu_nf4_layout(model)
    return attach_lora(model, lora, quantized=qc is not None, seed=seed)


def keep_cpu_nf4_layout(model: Any) -> None:
    """Stop bitsandbytes' CPU fast path (avx512_bf16) from repacking 4-bit weights on their first eval forward:
    the repacked layout rounds the scales to bf16 (no longer the NF4 weights) and has no backward, so a QLoRA
    student that rolled out in eval mode then failed its training forward on such CPUs."""
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False


def attach_lora(model: Any, lora: Any, quantized: bool = False, seed: int = 0) -> Any:
    """Make a loaded base the trainable student: gradient checkpointing, then a LoRA adapter (or every weight
    trainable when lora.r=0). Also used on bases built in place from a config (`gpucheck`, random weights)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=lora.gradient_checkpointing)
    elif lora.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if lora.r == 0:  # full fine-tuning: a reference point (the paper's setting), not what a T4 can hold
        if quantized:
            raise MinioprdError("full fine-tuning (lora.r=0) needs an unquantized student: set model.student_quant=none")
        model.requires_grad_(True)
        return model
    targets = lora.target_modules
    torch.manual_seed(seed)  # LoRA A matrices are random: seed them for reproducible runs
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                              target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise MinioprdError(f"lora.target_modules={targets!r} does not fit this student: "
                            f"{str(e).splitlines()[0]}") from None
    return model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())  # 4-bit packs 2/byte
    return trainable, total


def load_tokenizer(resolved: ResolvedModel, role: str = "student", trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinioprdError(f"could not load the {role} tokenizer from {resolved.path!r}: {first}") from None
    if tok.pad_token_id is None:  # generate needs a pad id for left padding; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


_PROBES = [
    "The quick brown fox jumps over the lazy dog.",
    "Solve 12345 + 67890 = ? Please reason step by step, and put your final answer within \\boxed{}.",
    "def f(x):\n    return x ** 2  # naïve café, 数学, émoji 🙂",
    "  leading spaces, tabs\tand\nnewlines\n\n",
]


def check_tokenizers(student_tok: Any, teacher_tok: Any, teacher_vocab_rows: int) -> None:
    """The student's tokenizer drives everything, so the teacher must map the same text to the same ids.

    Padded vocabulary sizes may differ (Qwen2.5-0.5B: 151936 rows, 7B: 152064); only the ids matter.
    """
    texts = list(_PROBES)
    if getattr(student_tok, "chat_template", None):
        msgs = [{"role": "user", "content": "What is 2+2?"}]
        texts.append(student_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    for text in texts:
        s = student_tok(text, add_special_tokens=False)["input_ids"]
        t = teacher_tok(text, add_special_tokens=False)["input_ids"]
        if s != t:
            raise MinioprdError(
                f"teacher and student tokenizers differ (text {text[:30]!r} -> {s[:6]}... vs {t[:6]}...): "
                f"this needs the teacher to read the student's tokens; pick a teacher of the student's family "
                f"(`minioprd distill` with loss.objective=oprd, `minioprd bridge` and `minioprd eval --teacher` "
                f"handle different tokenizers)")
    biggest = len(student_tok) - 1
    if biggest >= teacher_vocab_rows:
        raise MinioprdError(f"the student's tokenizer has ids up to {biggest} but the teacher's embedding has "
                            f"only {teacher_vocab_rows} rows: the models do not share a vocabulary")


# --------------------------------------------------------------------------------------------- eval model specs


@dataclass
class ModelSpec:
    label: str  # the spec as typed: the model's name in the table and in samples.jsonl
    base: str  # what `resolve_model` opens
    adapter: Path | None = None
    quant: str = "none"

    def describe(self) -> dict[str, Any]:
        return {"base": self.base, "adapter": str(self.adapter) if self.adapter else None, "quant": self.quant}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MinioprdError(f"could not read {path}: {e}; is the adapter directory complete?") from None
    return data if isinstance(data, dict) else {}


def adapter_base(adapter: Path) -> tuple[str, str]:
    """(base model, quant) an adapter was trained on: minioprd.json's student, else PEFT's base path."""
    candidates: list[str] = []
    quant = "none"
    if (adapter / "minioprd.json").is_file():
        meta = read_json(adapter / "minioprd.json")
        candidates += [str(meta[k]) for k in ("student_path", "student") if meta.get(k)]
        quant = str(meta.get("student_quant") or "none")
    cfg = read_json(adapter / "adapter_config.json")
    if cfg.get("base_model_name_or_path"):
        candidates.append(str(cfg["base_model_name_or_path"]))
    if not candidates:
        raise MinioprdError(f"adapter {str(adapter)!r} does not say which base model it belongs to; "
                            f"pass it as BASE+{adapter}")
    first: MinioprdError | None = None
    for c in dict.fromkeys(candidates):  # a run's student_path can be gone (a builtin under another home)
        try:
            resolve_model(c, "model")
            return c, quant
        except MinioprdError as e:
            first = first or e
    raise MinioprdError(f"the base model of adapter {str(adapter)!r} cannot be opened ({first}); "
                        f"pass it as BASE+{adapter}")


def as_adapter_dir(p: Path) -> Path | None:
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "adapter" / "adapter_config.json").is_file():  # a run directory
        return p / "adapter"
    return None


def parse_model_spec(spec: str) -> ModelSpec:
    """A `--model` value as base + optional adapter + quantization (module docstring); checks it exists."""
    text = spec.strip()
    if not text:
        raise MinioprdError("empty --model value: pass a model name, directory, adapter or run directory")
    quant = None
    m = re.search(r"@(none|4bit|8bit)$", text)
    if m:
        text, quant = text[:m.start()], m.group(1)
    base, sep, tail = text.rpartition("+")
    if sep and base and Path(tail).expanduser().is_dir():
        adapter = as_adapter_dir(Path(tail).expanduser())
        if adapter is None:
            raise MinioprdError(f"{tail!r} in --model {spec!r} is not a LoRA adapter (no adapter_config.json)")
        resolve_model(base, "model")
        return ModelSpec(spec, base, adapter, quant or "none")
    p = Path(text).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        adapter = as_adapter_dir(p)
        if adapter is None:
            raise MinioprdError(f"model directory {text!r} is neither a model (config.json), a LoRA adapter "
                                f"(adapter_config.json) nor a run directory (adapter/)")
        base, run_quant = adapter_base(adapter)
        return ModelSpec(spec, base, adapter, quant or run_quant)
    resolve_model(text, "model")  # fails fast on a missing path, an unknown name or no network
    return ModelSpec(spec, text, None, quant or "none")


def load_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a spec; the adapter's own tokenizer is used when it saved one."""
    resolved = resolve_model(spec.base, "model")
    kw: dict[str, Any] = {"device_map": {"": str(device)}, "dtype": dtype}
    qc = quantization_config(spec.quant, dtype if dtype != torch.float32 else torch.bfloat16)
    if qc is not None:
        kw["quantization_config"] = qc
    model = _from_pretrained(resolved.path, "model", **kw)
    tok_source = resolved
    if spec.adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(spec.adapter), is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MinioprdError(f"could not load adapter {str(spec.adapter)!r} onto {spec.base!r}: {first}; "
                                f"is it the adapter's base model?") from None
        if (spec.adapter / "tokenizer_config.json").is_file():
            tok_source = ResolvedModel(spec.label, str(spec.adapter), "")
    model.eval()
    model.requires_grad_(False)
    return model, load_tokenizer(tok_source, "model")
