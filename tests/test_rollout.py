"""Rollouts: left padding, the response mask (up to and including the first EOS), padding invariance."""

from __future__ import annotations

import torch

from minioprd.rollout import response_mask_from, rollout


def test_response_mask_stops_after_first_eos_even_when_pad_is_eos():
    eos = 7
    responses = torch.tensor([
        [3, 4, 7, 7, 7],  # EOS at 2, then padding with the same id
        [3, 7, 5, 7, 9],  # tokens after the first EOS never count
        [1, 2, 3, 4, 5],  # no EOS: all tokens (cut by max_new_tokens)
        [7, 7, 7, 7, 7],  # EOS first
    ])
    m = response_mask_from(responses, [eos])
    assert m.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True] * 5,
        [True, False, False, False, False],
    ]
    assert response_mask_from(responses, [5, 9])[2].tolist() == [True] * 5


def _load(tiny_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.float32)


def test_rollout_left_pads_and_masks(tiny_dirs, tiny_tokenizer):
    model = _load(tiny_dirs)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("What is 1+2?", "Hi", "What is 45+67? Please reason.")]
    torch.manual_seed(0)
    ro = rollout(model, tiny_tokenizer, prompts, n=2, temperature=1.0, max_new_tokens=12)
    B, P = len(prompts) * 2, max(map(len, prompts))
    assert ro.input_ids.shape[0] == B and ro.prompt_len == P
    # prompt-major rows, left padded: each prompt's tokens end exactly at column P
    for r in range(B):
        p = prompts[r // 2]
        assert ro.input_ids[r, P - len(p):P].tolist() == p
        assert ro.attention_mask[r, :P].tolist() == [0] * (P - len(p)) + [1] * len(p)
    eos = tiny_tokenizer.eos_token_id
    for row, m in zip(ro.responses, ro.response_mask):
        n_valid = int(m.sum())
        assert m[:n_valid].all() and not m[n_valid:].any()  # a prefix
        hits = (row == eos).nonzero().flatten().tolist()
        if hits:
            assert n_valid == hits[0] + 1  # up to and including the first EOS
        else:
            assert n_valid == row.shape[0]
    assert torch.equal(ro.attention_mask[:, P:].bool(), ro.response_mask)


def test_rollout_forced_early_eos(tiny_dirs, tiny_tokenizer):
    """Make EOS the argmax after a few tokens: the mask must end on it, later columns are padding."""
    model = _load(tiny_dirs)
    eos = tiny_tokenizer.eos_token_id

    class EosAfter(torch.nn.Module):
        pass

    with torch.no_grad():
        model.lm_head.weight[eos] *= 0  # tied to the embeddings: copy, don't share
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight)
        head.bias.zero_()
        head.bias[eos] = 1e4  # EOS always wins under greedy decoding
    model.lm_head = head
    model.config.tie_word_embeddings = False
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("a b c", "What is 2+2?")]
    ro = rollout(model, tiny_tokenizer, prompts, n=1, temperature=0.0, max_new_tokens=8)
    assert ro.response_mask.sum(1).tolist() == [1, 1]
    assert ro.responses[:, 0].tolist() == [eos, eos]


def test_greedy_rollout_is_padding_invariant(tiny_dirs, tiny_tokenizer):
    """A prompt batched with a longer one (so left-padded) yields the same greedy response as alone."""
    model = _load(tiny_dirs)
    short, long = tiny_tokenizer("What is 3+4?")["input_ids"], tiny_tokenizer("What is 345+678? Think.")["input_ids"]
    both = rollout(model, tiny_tokenizer, [short, long], n=1, temperature=0.0, max_new_tokens=10)
    alone = rollout(model, tiny_tokenizer, [short], n=1, temperature=0.0, max_new_tokens=10)
    n = int(alone.response_mask[0].sum())
    assert both.responses[0, :n].tolist() == alone.responses[0, :n].tolist()
