"""Toy models and tokenizer built offline, so the whole pipeline runs on a laptop with no downloads.

`builtin:tiny-student` (Qwen2, 2 blocks, width 64) and `builtin:tiny-teacher` (Qwen2, 4 blocks, width 128)
share a byte-level BPE tokenizer trained here with a ChatML template. They differ in width and depth on
purpose (the projection and layer-map paths run), and in padded vocabulary rows (like Qwen2.5-0.5B/7B).
Built once into `$MINIOPRD_HOME/builtin/` (default `~/.cache/minioprd`), atomically (`files.build_once`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from minioprd.errors import MinioprdError
from minioprd.files import build_once, home

VERSION = "v1"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# (hidden, layers, heads, kv heads, mlp, vocab rows rounded up to): shapes, not weights, are what matter here.
SHAPES = {
    "tiny-student": (64, 2, 4, 2, 128, 16),
    "tiny-teacher": (128, 4, 4, 2, 256, 128),
}


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = ("the a of to and is in that it for on with as was at by be this are or from what how why when "
             "which number answer sum difference carry borrow step result total add subtract plus minus equals "
             "please reason step by step and put your final answer within boxed question solve compute").split()
    lines = []
    for _ in range(3000):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"What is {a}+{b}? {a}+{b}={a + b}. \\boxed{{{a + b}}}")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    return lines


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    # Single digits keep arithmetic learnable for tiny models (no "12" vs "1","2" ambiguity).
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def build_model(name: str, vocab: int, seed: int = 0) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, layers, heads, kv, mlp, pad = SHAPES[name]
    cfg = Qwen2Config(vocab_size=-(-vocab // pad) * pad, hidden_size=hidden, intermediate_size=mlp,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=SPECIALS.index(
                          "<|im_end|>"), pad_token_id=0, bos_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def tiny_model_dir(name: str) -> Path:
    """Directory of `builtin:<name>` for a name in SHAPES, built on first use."""
    if name not in SHAPES:
        raise MinioprdError(f"unknown builtin model 'builtin:{name}': known are "
                            + ", ".join(f"builtin:{n}" for n in SHAPES))

    def build(tmp: Path) -> None:
        tok = build_tokenizer()
        model = build_model(name, len(tok), seed=sorted(SHAPES).index(name))
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return build_once(home() / "builtin" / f"{name}-{VERSION}", build)
