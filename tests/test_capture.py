"""Hook-based capture equals HF output_hidden_states, stops early, and keeps gradients for the student."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from minioprd.capture import capture_hidden, num_layers


def _batch(tok):
    enc = tok(["What is 12+34?", "Hi there"], padding=True, padding_side="left", return_tensors="pt")
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return enc["input_ids"], enc["attention_mask"], pos


def test_capture_matches_output_hidden_states(tiny_dirs, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"], dtype=torch.float32).eval()
    ids, attn, pos = _batch(tiny_tokenizer)
    L = num_layers(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True).hidden_states
        got = capture_hidden(model, ids, attn, pos, list(range(1, L + 1)), start=2, stop=ids.shape[1])
    assert len(ref) == L + 1
    for l in range(1, L + 1):
        torch.testing.assert_close(got[l - 1], ref[l][:, 2:], rtol=1e-5, atol=1e-5)
    # the last layer is after the final norm, exactly what the LM head reads
    torch.testing.assert_close(model.lm_head(got[-1]), model(input_ids=ids, attention_mask=attn,
                                                             position_ids=pos).logits[:, 2:], rtol=1e-4, atol=1e-4)


def test_capture_stops_after_deepest_layer(tiny_dirs, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"], dtype=torch.float32).eval()
    ids, attn, pos = _batch(tiny_tokenizer)
    ran = []
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, blk in enumerate(model.model.layers)]
    norm_calls = []
    hooks.append(model.model.norm.register_forward_hook(lambda *a: norm_calls.append(1)))
    with torch.no_grad():
        out = capture_hidden(model, ids, attn, pos, [1, 2], start=0, stop=3)
    for h in hooks:
        h.remove()
    assert ran == [0, 1] and not norm_calls  # blocks 3, 4 and the final norm never ran
    assert [o.shape for o in out] == [torch.Size([2, 3, model.config.hidden_size])] * 2


def test_capture_keeps_student_gradients_and_cuts_the_input(tiny_dirs, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, attn, pos = _batch(tiny_tokenizer)
    (h,) = capture_hidden(model, ids, attn, pos, [2], start=1, stop=4)
    assert h.shape[1] == 3 and h.requires_grad
    h.pow(2).mean().backward()  # recomputation in backward must not re-trigger capture or raise
    grads = [p.grad for p in model.model.layers[0].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # columns >= stop cannot influence earlier states (causal), so the cut input gives the same states
    with torch.no_grad():
        (full,) = capture_hidden(model.eval(), ids, attn, pos, [2], start=1, stop=ids.shape[1])
        (cut,) = capture_hidden(model, ids, attn, pos, [2], start=1, stop=4)
    torch.testing.assert_close(full[:, :3], cut, rtol=1e-5, atol=1e-5)


def test_teacher_capture_keeps_only_the_window(tiny_dirs, tiny_tokenizer):
    """Under no_grad a slice must not keep the whole (B, T, D) layer output alive."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"], dtype=torch.float32).eval()
    ids, attn, pos = _batch(tiny_tokenizer)
    with torch.no_grad():
        got = capture_hidden(model, ids, attn, pos, [1, 2, 4], start=3, stop=5)
    for h in got:
        assert h.untyped_storage().nbytes() == h.numel() * h.element_size()
