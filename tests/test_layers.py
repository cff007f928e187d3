"""Layer sets, the proportional layer map (paper Eq. 11), position masks and the position convention."""

from __future__ import annotations

import pytest
import torch

from minioprd.errors import MinioprdError
from minioprd.layers import layer_map, position_mask, proportional_map, select_layers, state_window


def test_layer_sets_follow_hidden_states_indexing():
    assert select_layers("all", 4) == [1, 2, 3, 4]  # never 0, the embedding output
    assert select_layers("last", 4) == [4]
    assert select_layers("even", 5) == [1, 3, 5]  # blocks 0, 2, 4 counted from 0 (authors' naming)
    assert select_layers("odd", 5) == [2, 4]
    assert select_layers([3, 1], 4) == [1, 3]


@pytest.mark.parametrize("bad", [[0], [5], [-1, 2]])
def test_explicit_layers_out_of_range_is_an_error(bad):
    with pytest.raises(MinioprdError, match="layers 1..4"):
        select_layers(bad, 4)


@pytest.mark.parametrize("s,t", [(24, 28), (28, 36), (28, 32), (2, 4), (5, 5), (30, 10)])
def test_proportional_map_endpoints_and_monotonicity(s, t):
    m = proportional_map(s, t)
    assert len(m) == s
    assert m[0] == 0 and m[-1] == t - 1
    assert all(b >= a for a, b in zip(m, m[1:]))
    if s <= t:
        assert len(set(m)) == s  # no teacher layer used twice when the teacher is deeper


def test_proportional_map_matches_authors_reference_values():
    # oprd-reference-code.md §1: 28 <- 36 gives [0,1,3,4,5,6,8,...,34,35]
    m = proportional_map(28, 36)
    assert m[:7] == [0, 1, 3, 4, 5, 6, 8] and m[-2:] == [34, 35]
    assert proportional_map(28, 32)[:5] == [0, 1, 2, 3, 5]
    assert proportional_map(1, 7) == [6]


def test_equal_depth_is_identity():
    assert layer_map("all", 6, 6) == [(i, i) for i in range(1, 7)]
    assert layer_map("even", 6, 6) == [(1, 1), (3, 3), (5, 5)]


def test_layer_map_sets_and_lists():
    # Qwen2.5-0.5B (24 blocks) -> Qwen2.5-7B (28 blocks): first to first, last (post-norm) to last
    pairs = layer_map("all", 24, 28)
    assert pairs[0] == (1, 1) and pairs[-1] == (24, 28)
    assert layer_map("last", 24, 28) == [(24, 28)]
    # an explicit list maps each layer by Eq. 11 over the whole depth
    assert layer_map([1, 12, 24], 24, 28) == [(1, 1), (12, round(11 / 23 * 27) + 1), (24, 28)]
    assert layer_map([2, 4], 4, 8, teacher_spec=[3, 8]) == [(2, 3), (4, 8)]
    with pytest.raises(MinioprdError, match="one teacher layer per student layer"):
        layer_map([2, 4], 4, 8, teacher_spec=[3])
    with pytest.raises(MinioprdError, match="teacher has layers 1..8"):
        layer_map([2, 4], 4, 8, teacher_spec=[3, 9])


def _ragged_mask():
    # lengths 5 (ends with EOS), 2, 7 (full, no EOS), 1 (EOS only); columns R = 7
    lengths = torch.tensor([5, 2, 7, 1])
    return torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1), lengths


def test_positions_select_exact_tokens_with_ragged_lengths():
    valid, lengths = _ragged_mask()
    assert torch.equal(position_mask(valid, "all"), valid)
    last = position_mask(valid, "last")
    assert last.sum(1).tolist() == [1, 1, 1, 1]
    assert last.float().argmax(1).tolist() == [4, 1, 6, 0]  # the last valid token (EOS when present)
    lk = position_mask(valid, "last_k", k=3)
    assert [row.nonzero().flatten().tolist() for row in lk] == [[2, 3, 4], [0, 1], [4, 5, 6], [0]]
    fk = position_mask(valid, "first_k", k=3)
    assert [row.nonzero().flatten().tolist() for row in fk] == [[0, 1, 2], [0, 1], [0, 1, 2], [0]]
    assert not (position_mask(valid, "last_k", k=100) ^ valid).any()


def test_predict_convention_shifts_the_same_windows_one_column_left():
    valid, _ = _ragged_mask()
    P = 6
    sel = position_mask(valid, "last_k", k=3)
    pred, tok = state_window(P, sel, "predict"), state_window(P, sel, "token")
    assert tok.start == P and pred.start == P - 1  # response token 0 sits at column P
    assert torch.equal(pred.mask, tok.mask)
    # the state predicting the first response token (column P-1) is in the predict window only
    first = state_window(P, position_mask(valid, "first_k", k=1), "predict")
    assert first.start == P - 1 and first.mask.shape[1] == 1


def test_window_crops_to_selected_columns():
    valid, _ = _ragged_mask()
    sel = position_mask(valid, "last_k", k=2)  # columns 0..6 are used by some row
    w = state_window(10, sel, "token")
    assert (w.start, w.stop) == (10, 17)
    sel = torch.zeros(2, 6, dtype=torch.bool)
    sel[0, 3], sel[1, 4] = True, True
    w = state_window(10, sel, "predict")
    assert (w.start, w.stop) == (12, 14) and w.mask.tolist() == [[True, False], [False, True]]
