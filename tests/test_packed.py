"""oneDNN-packed weights for CPU rollouts: the same layer outputs (adapter folded in, base untouched), the same
rollout tokens, restored afterwards, `auto` only where the weights outgrow a cache, a fallback that says so."""

from __future__ import annotations

import pytest
import torch

from minioprd import packed
from minioprd.packed import packed_linears
from minioprd.rollout import rollout, rollout_notes

pytestmark = pytest.mark.skipif(not packed.available(), reason="this torch build has no oneDNN packed-linear ops")

_PROMPTS = ("What is 1+2?", "Hi", "What is 45+67? Please reason step by step.", "a")


def _lora_model(tiny_dirs, seed: int = 0):
    """The tiny student under a LoRA adapter whose B is not zero (as after training), so folding it matters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _lora_linears(model):
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if type(m) is Linear]


def _count_packing(monkeypatch) -> list[int]:
    """Record the rows of every `packed_linears` block a rollout enters (one per rollout that packs)."""
    entered: list[int] = []

    def counting(m, rows):
        entered.append(rows)
        return packed_linears(m, rows)

    monkeypatch.setattr("minioprd.rollout.packed_linears", counting)
    return entered


def test_packed_forward_matches_and_restores(tiny_dirs, tiny_tokenizer):
    """Inside the block every LoRA linear (adapter folded in) and the LM head run from packed weights: the logits
    equal the unpacked model's up to float rounding, the adapter really counts (differs from the base), the base
    weights are not written, and afterwards every layer has its own forward back."""
    model = _lora_model(tiny_dirs)
    ids = torch.tensor([tiny_tokenizer("What is 12+30? Think.")["input_ids"]] * 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = packed._Packed.__call__
    with torch.no_grad():
        ref = model(ids).logits  # (3, T, V)
        with model.disable_adapter():
            base_logits = model(ids).logits
        with packed_linears(model, rows=3) as n:
            for m in model.modules():  # count the packed layers that really run
                if "forward" in m.__dict__:
                    m.__dict__["forward"] = lambda x, *a, _f=m.__dict__["forward"], **k: calls.append(1) or real(_f, x)
            out = model(ids).logits
    lora = _lora_linears(model)
    assert n == len(lora) + 1 == len(calls)  # every adapted linear + the (untargeted) LM head, each run once
    assert (base_logits - ref).abs().max() > 1e-3  # the adapter changes the outputs ...
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # ... and the packed model keeps that change
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(ids).logits.detach(), ref)


def test_packed_without_adapter_and_with_merged_adapter(tiny_dirs, tiny_tokenizer):
    """Adapters disabled: the packed copy is the base alone. Adapter merged (rollout.merge_lora): the base already
    holds it, so it is not added twice."""
    model = _lora_model(tiny_dirs)
    ids = torch.tensor([tiny_tokenizer("a b c d")["input_ids"]])
    with torch.no_grad():
        with model.disable_adapter():
            base = model(ids).logits
            with packed_linears(model, rows=1):
                torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-5)
        full = model(ids).logits
        model.merge_adapter()
        try:
            with packed_linears(model, rows=1):
                torch.testing.assert_close(model(ids).logits, full, rtol=1e-4, atol=1e-4)
        finally:
            model.unmerge_adapter()


def test_rollout_tokens_unchanged_with_packing(tiny_dirs, tiny_tokenizer):
    """Greedy and seeded sampled rollouts: the same tokens, masks and positions with pack_weights on and off
    (the tiny model's logits are far enough apart that rounding cannot flip a choice)."""
    model = _lora_model(tiny_dirs)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in _PROMPTS]
    for temperature, seeds in ((0.0, None), (1.0, list(range(100, 108)))):
        runs = []
        for pack in (False, True):
            torch.manual_seed(5)
            runs.append(rollout(model, tiny_tokenizer, prompts, n=2, temperature=temperature, max_new_tokens=12,
                                seeds=seeds, pack_weights=pack))
        a, b = runs
        assert a.responses.shape[1] == 12
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
        assert torch.equal(a.position_ids(), b.position_ids())
    assert rollout_notes(model) == []


def test_auto_packs_only_weights_bigger_than_a_cache(tiny_dirs, tiny_tokenizer, monkeypatch):
    """`auto`: the tiny model (well under PACK_MIN_BYTES) decodes with the usual kernels; with the threshold under
    its size it packs. Never together with compile."""
    from minioprd.rollout import usable_packing

    model = _lora_model(tiny_dirs)
    size = packed.linear_bytes(model)
    assert 0 < size < packed.PACK_MIN_BYTES
    entered = _count_packing(monkeypatch)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in _PROMPTS[:2]]
    rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=3, pack_weights="auto")
    assert entered == []
    monkeypatch.setattr(packed, "PACK_MIN_BYTES", size)
    rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=3, pack_weights="auto")
    assert entered == [4]  # packed once per rollout, for its 2 prompts x n=2 rows
    assert usable_packing(model, "auto", compile=True) is False
    assert usable_packing(model, True, compile=True) is False
    assert any("not combined with rollout.compile" in n for n in rollout_notes(model))


def test_packing_failure_falls_back_with_one_note(tiny_dirs, tiny_tokenizer, monkeypatch):
    """A packed layer that fails: the rollout reruns with the usual kernels from the same random state (same
    tokens as an unpacked rollout), notes it once, and does not try packing again on that model."""
    model = _lora_model(tiny_dirs)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in _PROMPTS]
    torch.manual_seed(9)
    ref = rollout(model, tiny_tokenizer, prompts, n=2, temperature=1.0, max_new_tokens=8)

    def broken(self, x, *a, **k):
        raise RuntimeError("oneDNN: unsupported")

    monkeypatch.setattr(packed._Packed, "__call__", broken)
    for _ in range(2):
        torch.manual_seed(9)
        out = rollout(model, tiny_tokenizer, prompts, n=2, temperature=1.0, max_new_tokens=8, pack_weights=True)
        assert torch.equal(out.input_ids, ref.input_ids)
    notes = rollout_notes(model)
    assert len(notes) == 1 and "packed weights failed" in notes[0] and "oneDNN: unsupported" in notes[0]
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_quantized_or_other_dtype_layers_are_left_alone(tiny_dirs):
    """Only fp32 CPU nn.Linear layers are packed: a bf16 model has nothing to pack, and its forward is its own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.bfloat16)
    assert packed.linear_bytes(model) == 0
    with packed_linears(model, rows=2) as n:
        assert n == 0


def test_eval_decodes_from_packed_weights_where_auto_packs(tiny_dirs, tiny_tokenizer, monkeypatch):
    """`evaluate_task` (minioprd eval and the in-loop evaluation) packs where `auto` would: not the tiny model at
    the real threshold; with the threshold under its size every batch's rollout packs, and the graded samples
    (greedy and sampled) are the same as with the usual kernels."""
    from minioprd.data import load_examples
    from minioprd.evaluate import evaluate_task

    model = _lora_model(tiny_dirs)
    examples = load_examples("builtin:arithmetic", split="test")[:5]
    entered = _count_packing(monkeypatch)
    kw = dict(max_new_tokens=8, batch_size=2, return_samples=True)

    def samples() -> dict[bool, list[dict]]:  # greedy (k=1: greedy samples would all be equal) and sampled (k=2)
        return {g: evaluate_task(model, tiny_tokenizer, examples, greedy=g, k=1 if g else 2, **kw)["samples"]
                for g in (True, False)}

    usual = samples()
    assert entered == []
    monkeypatch.setattr(packed, "PACK_MIN_BYTES", packed.linear_bytes(model))
    packed_ = samples()
    assert entered == [2, 2, 1] + [2] * 5  # batches of 2 rows: greedy 5 problems x 1, sampled 5 x k=2
    for greedy in (True, False):
        a, b = usual[greedy], packed_[greedy]
        assert [r["response"] for r in a] == [r["response"] for r in b]
        assert [r["length"] for r in a] == [r["length"] for r in b] and sum(r["length"] for r in a) > 0
