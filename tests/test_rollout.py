"""Rollouts: left padding, the response mask (up to and including the first EOS), padding invariance."""

from __future__ import annotations

import pytest
import torch

from minioprd.rollout import response_mask_from, rollout, rollout_notes


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


# --- speed-ups: each must leave the rollout what it was -------------------------------------------------------

_PROMPTS = ("What is 1+2?", "Hi", "What is 45+67? Please reason step by step.", "a")


def _prompts(tok):
    return [tok(t)["input_ids"] for t in _PROMPTS]


def _same(a, b):
    assert a.prompt_len == b.prompt_len
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.position_ids(), b.position_ids())


def test_greedy_rollout_identical_with_static_cache_and_shared_prefill(tiny_dirs, tiny_tokenizer):
    model = _load(tiny_dirs)
    prompts = _prompts(tiny_tokenizer)
    ref = rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=12, share_prefill=False)
    assert ref.responses.shape[1] == 12  # long enough to compare many decode steps
    for cache in ("dynamic", "static"):
        for share in (False, True):
            _same(rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=12, cache=cache,
                          share_prefill=share), ref)
    assert rollout_notes(model) == [] and model._minioprd_cache_len == 128  # the static cache really ran


def test_sampled_rollout_same_tokens_for_same_seed_with_speedups(tiny_dirs, tiny_tokenizer):
    """Sampling draws the same random numbers in the same order with each speed-up, on the same distribution
    (up to float rounding), so the same seed gives the same tokens on a small model."""
    model = _load(tiny_dirs)
    prompts = _prompts(tiny_tokenizer)
    runs = []
    for cache, share in (("dynamic", False), ("dynamic", True), ("static", True)):
        torch.manual_seed(3)
        runs.append(rollout(model, tiny_tokenizer, prompts, n=3, temperature=1.0, max_new_tokens=10, cache=cache,
                            share_prefill=share))
    for other in runs[1:]:
        _same(other, runs[0])
    torch.manual_seed(4)  # and a different seed really samples something else
    other = rollout(model, tiny_tokenizer, prompts, n=3, temperature=1.0, max_new_tokens=10)
    assert not torch.equal(other.input_ids, runs[0].input_ids)


def test_n_responses_share_one_prefill(tiny_dirs, tiny_tokenizer):
    """With n > 1 each prompt is prefilled once: the prefill forward sees the distinct prompts, not n copies."""
    model = _load(tiny_dirs)
    prompts = _prompts(tiny_tokenizer)
    calls = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    try:
        for share in (False, True):
            calls.clear()
            rollout(model, tiny_tokenizer, prompts, n=3, temperature=0.0, max_new_tokens=4, share_prefill=share)
            P = max(map(len, prompts))
            prefills = [c for c in calls if c[1] > 1]
            if share:  # one forward over the 4 distinct prompts (all but their last token), then 1-token steps
                assert prefills == [(4, P - 1)]
                assert calls[1:] == [(12, 1)] * 4
            else:  # the 12 rows prefilled together
                assert prefills == [(12, P)]
                assert calls[1:] == [(12, 1)] * 3
    finally:
        hook.remove()




def test_early_eos_masks_unchanged_and_batch_stops(tiny_dirs, tiny_tokenizer):
    """Rows that hit EOS early keep the same response masks with every speed-up, and the batch stops as soon as
    every row has hit EOS (not at max_new_tokens)."""
    model = _load(tiny_dirs)
    eos = tiny_tokenizer.eos_token_id
    prompts = _prompts(tiny_tokenizer)
    ref = rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=40, share_prefill=False)
    # boost EOS until some rows (not all) end early in the plain greedy rollout
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight)
        head.bias.zero_()
    model.lm_head, model.config.tie_word_embeddings = head, False
    for bias in (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0):
        with torch.no_grad():
            head.bias[eos] = bias
        ref = rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=40, share_prefill=False)
        lengths = ref.lengths.tolist()
        if min(lengths) < 40 and len(set(lengths)) > 1:
            break
    assert min(lengths) < ref.responses.shape[1] and len(set(lengths)) > 1, lengths  # ragged early EOS
    for cache in ("dynamic", "static"):
        _same(rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=40, cache=cache), ref)
    with torch.no_grad():
        head.bias[eos] = 1e4  # every row ends at once: the batch must stop after one step
    for cache in ("dynamic", "static"):
        ro = rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=40, cache=cache)
        assert ro.responses.shape[1] == 1 and ro.lengths.tolist() == [1] * 8


def test_static_cache_falls_back_with_one_note(tiny_dirs, tiny_tokenizer, caplog):
    """A model transformers cannot run with a static cache gets the dynamic one, the same tokens and one note."""
    from minioprd.rollout import rollout_notes

    model = _load(tiny_dirs)
    prompts = _prompts(tiny_tokenizer)
    ref = rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=6)
    model._can_compile_fullgraph = False  # as for an architecture without static-cache support
    with caplog.at_level("WARNING", logger="minioprd.rollout"):
        for _ in range(2):
            _same(rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=6, cache="static",
                          compile=True), ref)
    notes = rollout_notes(model)
    assert len(notes) == 1 and "dynamic cache" in notes[0]
    assert sum("rollout:" in r.message for r in caplog.records) == 1  # said once, not every step


def _compiled_rollouts_match(model, tok, monkeypatch):
    """Greedy rollouts with the compiled decode step equal the plain ones, and prompts of another length (in the
    same cache bucket) or the next call reuse the compiled step: no recompilation across steps."""
    import minioprd.rollout as R

    compiled = []

    def backend(gm, example_inputs):  # counts each graph dynamo hands to the backend, then runs it as traced
        compiled.append(len(gm.graph.nodes))
        return gm.forward

    if monkeypatch is not None:
        monkeypatch.setattr(R, "COMPILE_BACKEND", backend)
    prompts = _prompts(tok)
    counts, ptrs = [], []
    for batch in (prompts, [p[:3] + p for p in prompts], prompts):  # P changes between calls, B stays
        ref = rollout(model, tok, batch, n=2, temperature=0.0, max_new_tokens=10, share_prefill=False)
        _same(rollout(model, tok, batch, n=2, temperature=0.0, max_new_tokens=10, cache="static", compile=True), ref)
        counts.append(len(compiled))
        ptrs.append(model._minioprd_static_cache.layers[0].keys.data_ptr())
    assert R.rollout_notes(model) == []
    assert len(set(ptrs)) == 1  # one cache, reset between calls: CUDA graphs recorded for its addresses stay valid
    return counts


def test_compiled_decode_step_identical_and_not_recompiled(tiny_dirs, tiny_tokenizer, monkeypatch):
    """Through dynamo with a counting backend (fast); the real inductor build is the slow test below."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _load(tiny_dirs)
    counts = _compiled_rollouts_match(model, tiny_tokenizer, monkeypatch)
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == counts[0], counts


@pytest.mark.slow
def test_inductor_compiled_rollout_identical(tiny_dirs, tiny_tokenizer):
    """torch.compile with inductor (minutes of CPU the first time): same greedy tokens as uncompiled."""
    import torch._dynamo

    torch._dynamo.reset()
    _compiled_rollouts_match(_load(tiny_dirs), tiny_tokenizer, None)


def test_rollout_options_auto_means_static_compiled_on_gpu_only():
    from minioprd.config import RolloutConfig
    from minioprd.rollout import rollout_options

    rc = RolloutConfig()
    auto = {"share_prefill": True, "pack_weights": "auto"}  # packing decided by rollout() on the model's size
    assert rollout_options(rc, "cpu") == {"cache": "dynamic", "compile": False, **auto}
    assert rollout_options(rc, "cuda:0") == {"cache": "static", "compile": True, **auto}
    rc.cache, rc.compile, rc.share_prefill, rc.pack_weights = "static", "true", False, "false"
    assert rollout_options(rc, "cpu") == {"cache": "static", "compile": True, "share_prefill": False,
                                          "pack_weights": False}
    rc.compile, rc.pack_weights = "false", "true"
    assert rollout_options(rc, "cuda") == {"cache": "static", "compile": False, "share_prefill": False,
                                           "pack_weights": True}


def test_compile_skipped_with_one_note_for_weights_that_cannot_compile(tiny_dirs, tiny_tokenizer, monkeypatch):
    """A quantizer transformers marks as not compilable (bitsandbytes 4-bit): the static cache stays, the decode
    step runs uncompiled (nothing reaches the compile backend), one note says so."""

    import minioprd.rollout as R

    monkeypatch.setattr(R, "COMPILE_BACKEND", lambda gm, inputs: pytest.fail("compiled despite the quantizer"))
    model = _load(tiny_dirs)
    prompts = _prompts(tiny_tokenizer)
    ref = rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=6)

    class Bnb4BitHfQuantizer:  # stands in for transformers' own (is_compileable False for bitsandbytes 4-bit)
        is_compileable = False

    model.hf_quantizer = Bnb4BitHfQuantizer()
    for _ in range(2):
        _same(rollout(model, tiny_tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=6, cache="static",
                      compile=True), ref)
    assert R.rollout_notes(model) == ["Bnb4BitHfQuantizer weights cannot be compiled; decoding uncompiled"]
    assert model._minioprd_cache_len == 128  # the static cache itself still ran


def _eos_prone(tiny_dirs, tokenizer, bias: float):
    """The tiny student with a bias towards EOS, so sampled rows end at scattered lengths."""
    model = _load(tiny_dirs)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_input_embeddings().weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = bias
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


def test_finished_rows_leave_the_batch_and_tokens_stay(tiny_dirs, tiny_tokenizer, monkeypatch):
    """With the dynamic cache, rows that hit EOS leave the batch between segments: later forwards see fewer rows,
    yet every row's tokens, masks and positions equal one generate call's (per-row streams; greedy too)."""
    import minioprd.rollout as R

    monkeypatch.setattr(R, "SEGMENT", 6)
    model = _eos_prone(tiny_dirs, tiny_tokenizer, bias=4.0)
    rows_seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    prompts = _prompts(tiny_tokenizer)
    seeds = list(range(40, 48))
    for temperature in (1.0, 0.0):
        runs = {}
        for drop in (False, True):
            rows_seen.clear()
            runs[drop] = rollout(model, tiny_tokenizer, prompts, n=2, temperature=temperature, max_new_tokens=30,
                                 seeds=seeds, drop_finished=drop)
            runs[drop, "rows"] = rows_seen[1:]  # the forwards after the shared prefill (4 prompts)
        _same(runs[True], runs[False])
        lengths = runs[False].lengths.tolist()
        if temperature > 0:  # the case that matters: rows end at scattered lengths, some past the first segment
            assert min(lengths) < 6 < max(lengths), lengths
            assert set(runs[False, "rows"]) == {8}  # one call: every decode forward has all 8 rows
            assert runs[True, "rows"][0] == 8 > runs[True, "rows"][-1]  # dropping: later forwards have fewer
            assert sum(runs[True, "rows"]) < sum(runs[False, "rows"])
    torch.manual_seed(1)  # and without per-row streams the batch is never cut (global draws would change)
    rows_seen.clear()
    rollout(model, tiny_tokenizer, prompts, n=2, temperature=1.0, max_new_tokens=30)
    assert set(rows_seen[1:]) == {8}
