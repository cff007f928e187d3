"""Model arguments, the 4-bit teacher, the LoRA student and the tokenizer check."""

from __future__ import annotations

import time

import pytest
import torch

from minioprd.config import LoraConfig
from minioprd.errors import MinioprdError
from minioprd.models import (KNOWN_MODELS, check_tokenizers, load_student, load_teacher, load_tokenizer,
                             resolve_model)


def test_known_names_resolve_to_hub_ids(monkeypatch):
    assert KNOWN_MODELS["qwen2.5-7b"] == "Qwen/Qwen2.5-7B"
    assert KNOWN_MODELS["qwen2.5-0.5b-instruct"] == "Qwen/Qwen2.5-0.5B-Instruct"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(MinioprdError, match=r"'Qwen/Qwen2.5-7B' is not in the local Hugging Face cache"):
        resolve_model("Qwen2.5-7B", "teacher")
    assert time.time() - t0 < 5  # fails at once, not after a 46 s hub timeout


def test_missing_and_wrong_paths_are_clear(tmp_path):
    with pytest.raises(MinioprdError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), "student")
    with pytest.raises(MinioprdError, match="no config.json"):
        resolve_model(str(tmp_path), "student")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(MinioprdError, match="LoRA adapter"):
        resolve_model(str(tmp_path), "student")
    with pytest.raises(MinioprdError, match="unknown teacher"):
        resolve_model("NotAModel", "teacher")


def test_teacher_4bit_is_frozen_linear4bit(tiny_dirs):
    import bitsandbytes as bnb

    t = load_teacher(resolve_model(str(tiny_dirs["teacher"])), "4bit", "cpu")
    linears = [m for m in t.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    q = linears[0].weight.quant_state
    assert q.quant_type == "nf4" and q.nested  # NF4 with double quantization
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    t8 = load_teacher(resolve_model(str(tiny_dirs["teacher"])), "8bit", "cpu")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in t8.modules())
    tn = load_teacher(resolve_model(str(tiny_dirs["teacher"])), "none", "cpu")
    assert next(tn.parameters()).dtype == torch.float32  # fp32 on CPU
    # a run's GPU dtype (fp16 for a T4) does not apply on a CPU: every caller passes it, the CPU keeps fp32/bf16
    tn16 = load_teacher(resolve_model(str(tiny_dirs["teacher"])), "none", "cpu", dtype=torch.float16)
    assert next(tn16.parameters()).dtype == torch.float32
    t4 = load_teacher(resolve_model(str(tiny_dirs["teacher"])), "4bit", "cpu", dtype=torch.float16)
    assert [m for m in t4.modules() if isinstance(m, bnb.nn.Linear4bit)][0].compute_dtype == torch.bfloat16


def test_student_lora_trains_only_adapters(tiny_dirs):
    s = load_student(resolve_model(str(tiny_dirs["student"])), LoraConfig(r=4, alpha=8), "none", "cpu")
    trainable = {n for n, p in s.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all linear layers of the blocks are adapted (q,k,v,o,gate,up,down), the LM head is not
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(proj in n for n in trainable), proj
    assert not any("lm_head" in n for n in trainable)
    q = load_student(resolve_model(str(tiny_dirs["student"])), LoraConfig(r=4, target_modules=["q_proj"]), "4bit",
                     "cpu", torch.float32)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())  # QLoRA base
    with pytest.raises(MinioprdError, match="target_modules"):
        load_student(resolve_model(str(tiny_dirs["student"])), LoraConfig(target_modules=["nope_proj"]), "none", "cpu")


def test_tokenizer_check_accepts_padded_vocab_difference(tiny_dirs):
    s_tok = load_tokenizer(resolve_model(str(tiny_dirs["student"])))
    t_tok = load_tokenizer(resolve_model(str(tiny_dirs["teacher"])))
    from transformers import AutoConfig

    rows = (AutoConfig.from_pretrained(tiny_dirs["student"]).vocab_size,
            AutoConfig.from_pretrained(tiny_dirs["teacher"]).vocab_size)
    assert rows[0] != rows[1]  # like Qwen2.5-0.5B (151936) vs 7B (152064)
    check_tokenizers(s_tok, t_tok, rows[1])  # no error
    with pytest.raises(MinioprdError, match="embedding has only"):
        check_tokenizers(s_tok, t_tok, len(s_tok) - 5)


def test_tokenizer_mismatch_is_an_error(tiny_dirs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the quick brown fox " * 50, "jumps over 12345"],
                           trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_end|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>")
    s_tok = load_tokenizer(resolve_model(str(tiny_dirs["student"])))
    with pytest.raises(MinioprdError, match="tokenizers differ") as e:
        check_tokenizers(s_tok, other, 10_000)
    assert "`minioprd eval --teacher` handle" in str(e.value)  # says where different tokenizers do work
