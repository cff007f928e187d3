"""rollout.sort_by_length: PromptSampler's length-grouped epochs (coverage, determinism, less padding, exact
resume, off = today's order) and its wiring into the config, the checkpoint's run identity and distill."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from minioprd.checkpoint import RUN_KEYS
from minioprd.config import Config, load_config
from minioprd.data import LENGTH_GROUP_FACTOR, PromptSampler
from minioprd.errors import MinioprdError


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Prompt lengths with a long right tail, like real prompt sets (most short, a few very long)."""
    rng = random.Random(seed)
    return [8 + int(rng.lognormvariate(3.5, 0.9)) for _ in range(n)]


def draw(sampler: PromptSampler, k: int, steps: int) -> list[list[int]]:
    return [sampler.next_batch(k) for _ in range(steps)]


def padding(steps: list[list[int]], lengths: list[int]) -> int:
    """Left-padding tokens when each step is padded to its longest prompt."""
    return sum(max(lengths[i] for i in s) * len(s) - sum(lengths[i] for i in s) for s in steps)


@pytest.mark.parametrize("n", [1000, 1001, 203])  # 1001 and 203: steps cross epoch boundaries mid-step
def test_every_prompt_once_per_epoch(n: int):
    k, epochs = 4, 4
    lengths = skewed_lengths(n)
    stream = [i for s in draw(PromptSampler(n, seed=5, lengths=lengths, group=k), k, epochs * n // k) for i in s]
    chunks = [stream[e * n:(e + 1) * n] for e in range(epochs)]
    assert all(sorted(c) == list(range(n)) for c in chunks)
    assert len({tuple(c) for c in chunks}) == epochs  # a fresh order each epoch


def test_steps_are_sorted_groups_in_a_shuffled_order():
    n, k = 1000, 4  # a multiple of k: no step crosses an epoch, so every step is one sorted group
    lengths = skewed_lengths(n)
    steps = draw(PromptSampler(n, seed=1, lengths=lengths, group=k), k, n // k)
    assert all([lengths[i] for i in s] == sorted((lengths[i] for i in s), reverse=True) for s in steps)
    # Step lengths do not trend longest to shortest through the epoch: the steps are shuffled after grouping.
    tops = [lengths[s[0]] for s in steps]
    assert tops != sorted(tops, reverse=True) and len(set(tops)) > n // k // 4
    # shuffle=False groups without randomness: the first pool's steps come longest first.
    plain = draw(PromptSampler(n, shuffle=False, lengths=lengths, group=k), k, LENGTH_GROUP_FACTOR)
    assert [i for s in plain for i in s] == sorted(range(LENGTH_GROUP_FACTOR * k), key=lambda i: -lengths[i])


def test_grouping_is_deterministic_per_seed():
    n, k = 500, 4
    lengths = skewed_lengths(n)
    a, b = (draw(PromptSampler(n, seed=3, lengths=lengths, group=k), k, 300) for _ in range(2))
    assert a == b
    assert a != draw(PromptSampler(n, seed=4, lengths=lengths, group=k), k, 300)


@pytest.mark.parametrize("n", [1000, 1001])
def test_grouping_cuts_padding(n: int):
    k, epochs = 4, 3
    lengths = skewed_lengths(n, seed=7)
    off = padding(draw(PromptSampler(n, seed=2), k, epochs * n // k), lengths)
    on = padding(draw(PromptSampler(n, seed=2, lengths=lengths, group=k), k, epochs * n // k), lengths)
    # A bound that holds by construction: the steps cut from one sorted pool pad at most (k-1) x (the pool's
    # longest - its shortest) together (their max/min ranges tile the pool's range), and each epoch has at most
    # ceil(n / pool) + 1 pools plus the one step crossing into the next epoch.
    spread = max(lengths) - min(lengths)
    bound = epochs * (math.ceil(n / (LENGTH_GROUP_FACTOR * k)) + 2) * (k - 1) * spread
    assert on <= bound < off, (on, bound, off)


def test_resume_is_exact_across_epochs():
    n, k = 103, 4  # 103 prompts: epochs end mid-step, so the resumed head/tail cut must match
    lengths = skewed_lengths(n)
    full = draw(PromptSampler(n, seed=9, lengths=lengths, group=k), k, 120)  # ~4.7 epochs
    for cut in (5, 26, 51, 77):  # before, at and after epoch boundaries (103/4 = 25.75 steps per epoch)
        first = PromptSampler(n, seed=9, lengths=lengths, group=k)
        head = draw(first, k, cut)
        state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as JSON
        resumed = PromptSampler(n, seed=0, lengths=lengths, group=k)  # the saved seed wins
        resumed.load_state_dict(state)
        assert head + draw(resumed, k, 120 - cut) == full, cut


def test_resume_refuses_another_grouping_and_accepts_old_states():
    n, k = 50, 4
    lengths = skewed_lengths(n)
    grouped = PromptSampler(n, lengths=lengths, group=k)
    grouped.next_batch(k)
    with pytest.raises(MinioprdError, match="length grouping on, 4 prompts per step but this run has it off"):
        PromptSampler(n).load_state_dict(grouped.state_dict())
    with pytest.raises(MinioprdError, match="rollout.sort_by_length"):
        PromptSampler(n, lengths=lengths, group=8).load_state_dict(grouped.state_dict())
    plain = PromptSampler(n, seed=1)
    draw(plain, k, 3)
    old = {key: v for key, v in plain.state_dict().items() if key != "group"}  # saved before the flag existed
    resumed = PromptSampler(n)
    resumed.load_state_dict(old)
    assert draw(resumed, k, 20) == draw(plain, k, 20)
    with pytest.raises(MinioprdError, match="this run has it on"):
        PromptSampler(n, lengths=lengths, group=k).load_state_dict(old)


def test_off_is_todays_order():
    n, k = 37, 4
    # Today's sampler, as it stood before length grouping: the bare seeded permutation per epoch.
    expected = []
    for e in range(5):
        order = list(range(n))
        random.Random(f"minioprd-prompts:6:{e}").shuffle(order)
        expected += order
    for sampler in (PromptSampler(n, seed=6), PromptSampler(n, seed=6, group=k)):  # group alone: off
        assert [i for s in draw(sampler, k, 5 * n // k) for i in s] == expected[:5 * n // k * k]
        assert sampler.state_dict()["group"] == 0


def test_bad_lengths_are_one_line_errors():
    with pytest.raises(MinioprdError, match="one length per prompt: got 3 for 4 prompts"):
        PromptSampler(4, lengths=[1, 2, 3], group=2)
    with pytest.raises(MinioprdError, match="group >= 1"):
        PromptSampler(4, lengths=[1, 2, 3, 4])


def test_config_field_is_off_documented_and_part_of_the_run():
    cfg = Config()
    assert cfg.rollout.sort_by_length is False
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(cfg.rollout)}["sort_by_length"]
    assert f"{LENGTH_GROUP_FACTOR} x prompts_per_step" in help_text
    assert load_config(None, {"rollout.sort_by_length": "true"}).rollout.sort_by_length is True
    assert "rollout.sort_by_length" in RUN_KEYS  # checkpoints from before it lack the key and still resume


@pytest.mark.parametrize("on", [False, True])
def test_distill_builds_the_sampler_from_the_setting(on: bool):
    import torch

    from minioprd.distill import Optimization
    from minioprd.parallel import Parallel

    cfg = load_config(None, {"rollout.sort_by_length": str(on).lower(), "rollout.prompts_per_step": "3"})
    prompts = [[1] * n for n in skewed_lengths(40)]  # token id lists, as distill.prepare leaves them
    setup = type("Setup", (), {"cfg": cfg, "student": torch.nn.Linear(2, 2), "projections": torch.nn.ModuleList(),
                               "prompts": prompts, "parallel": Parallel()})()
    sampler = Optimization.for_run(setup).sampler
    assert sampler.state_dict()["group"] == (3 if on else 0)
    assert sampler.lengths == ([len(p) for p in prompts] if on else None)


def test_resume_checks_the_setting_and_accepts_checkpoints_from_before_it(tmp_path):
    from minioprd.checkpoint import check_same_run, run_identity

    off, on = load_config(None), load_config(None, {"rollout.sort_by_length": "true"})
    run = run_identity(off)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "run": run}))
    with pytest.raises(MinioprdError, match="rollout.sort_by_length False there, True here"):
        check_same_run(tmp_path, on)
    check_same_run(tmp_path, off)
    del run["rollout.sort_by_length"]  # a v0.1 checkpoint: written before the setting existed
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "run": run}))
    check_same_run(tmp_path, off)
