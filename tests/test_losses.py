"""Losses against naive references written from the definitions (explicit loops, full logits), plus the
invariants: zero on identical inputs, mask respected, gradients reach only the student."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minioprd.losses import (
    OPD_LOSSES,
    REP_LOSSES,
    layer_cosines,
    opd_full,
    opd_sampled,
    opd_topk,
    representation_loss,
    reverse_kl_per_token,
)

torch.set_num_threads(1)

REP_KINDS = ["mse", "scale_mse", "normalized_mse", "cosine"]
REDUCTIONS = ["sequence", "token"]
OPD_KINDS = ["opd_sampled", "opd_topk", "opd_full"]

# Ragged: no selected position, one, four, all six.
MASK_ROWS = [
    [0, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0],
    [1, 1, 0, 1, 1, 0],
    [1, 1, 1, 1, 1, 1],
]


def ragged_mask() -> torch.Tensor:
    return torch.tensor(MASK_ROWS, dtype=torch.bool)  # (4, 6)


def rand_pair(d: int = 8, seed: int = 0, shape=(4, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*shape, d, generator=g) * 3.0
    student = teacher + torch.randn(*shape, d, generator=g)
    return student, teacher


# --------------------------------------------------------------------------------------------------
# Naive representation references: python loops over (b, t), float64, straight from the definitions.
# --------------------------------------------------------------------------------------------------


def naive_term(kind: str, s: list[float], t: list[float], c: float) -> float:
    d = len(s)
    if kind in ("mse", "scale_mse"):
        v = sum((a - b) ** 2 for a, b in zip(s, t)) / d
        return v / c if kind == "scale_mse" else v
    ns = sum(a * a for a in s) ** 0.5
    nt = sum(b * b for b in t) ** 0.5
    if kind == "normalized_mse":
        return sum((a / ns - b / nt) ** 2 for a, b in zip(s, t)) / d
    return 1.0 - sum(a * b for a, b in zip(s, t)) / (ns * nt)


def naive_rep_loss(kind: str, student, teacher, mask, reduction: str) -> float:
    S, T, D = student.shape
    st, tt, mk = student.double().tolist(), teacher.double().tolist(), mask.tolist()
    sel = [(b, p) for b in range(S) for p in range(T) if mk[b][p]]
    # scale_mse: c = mean over all selected positions of the batch of ||t||^2 / d (plus eps)
    c = sum(sum(x * x for x in tt[b][p]) / D for b, p in sel) / len(sel) + 1e-6 if sel else 1.0
    if reduction == "token":
        return sum(naive_term(kind, st[b][p], tt[b][p], c) for b, p in sel) / len(sel)
    per_seq = []
    for b in range(S):
        terms = [naive_term(kind, st[b][p], tt[b][p], c) for p in range(T) if mk[b][p]]
        if terms:
            per_seq.append(sum(terms) / len(terms))
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", REP_KINDS)
def test_rep_loss_matches_naive_reference(kind, reduction):
    student, teacher = rand_pair()
    mask = ragged_mask()
    got = REP_LOSSES[kind](student, teacher, mask, reduction=reduction)
    want = naive_rep_loss(kind, student, teacher, mask, reduction)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_sequence_and_token_reductions_differ_on_ragged_mask():
    student, teacher = rand_pair()
    mask = ragged_mask()
    seq = REP_LOSSES["mse"](student, teacher, mask, reduction="sequence")
    tok = REP_LOSSES["mse"](student, teacher, mask, reduction="token")
    assert not torch.allclose(seq, tok)


@pytest.mark.parametrize("kind", REP_KINDS)
def test_rep_loss_2d_input_is_token_mean_for_both_reductions(kind):
    student, teacher = rand_pair(shape=(7,))
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    want = naive_rep_loss(kind, student[None], teacher[None], mask[None], "token")
    for reduction in REDUCTIONS:
        got = REP_LOSSES[kind](student, teacher, mask, reduction=reduction)
        assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", REP_KINDS)
def test_rep_loss_zero_on_identical_positive_otherwise(kind):
    student, teacher = rand_pair()
    mask = ragged_mask()
    for reduction in REDUCTIONS:
        same = REP_LOSSES[kind](teacher.clone(), teacher, mask, reduction=reduction)
        assert same.item() == pytest.approx(0, abs=1e-6)
        assert REP_LOSSES[kind](student, teacher, mask, reduction=reduction).item() > 1e-4


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", REP_KINDS)
def test_rep_loss_ignores_masked_out_positions(kind, reduction):
    student, teacher = rand_pair()
    mask = ragged_mask()
    student.requires_grad_(True)
    base = REP_LOSSES[kind](student, teacher, mask, reduction=reduction)
    base.backward()
    assert torch.all(student.grad[~mask] == 0) and student.grad[mask].abs().sum() > 0

    noisy_s, noisy_t = student.detach().clone(), teacher.clone()
    noisy_s[~mask] = 1e4 * torch.randn_like(noisy_s[~mask])
    noisy_t[~mask] = float("inf")  # padding may hold anything
    got = REP_LOSSES[kind](noisy_s, noisy_t, mask, reduction=reduction)
    assert torch.equal(got, base.detach())


@pytest.mark.parametrize("kind", REP_KINDS)
def test_rep_loss_gradient_reaches_student_only(kind):
    student, teacher = rand_pair()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    REP_LOSSES[kind](student, teacher, ragged_mask()).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", REP_KINDS)
def test_rep_loss_empty_mask_is_zero_and_backward_works(kind, reduction):
    student, teacher = rand_pair()
    student.requires_grad_(True)
    loss = REP_LOSSES[kind](student, teacher, torch.zeros(4, 6, dtype=torch.bool), reduction=reduction)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_rep_loss_computes_in_float32():
    student, teacher = rand_pair()
    mask = ragged_mask()
    got = REP_LOSSES["mse"](student.bfloat16(), teacher.bfloat16(), mask)
    want = REP_LOSSES["mse"](student.bfloat16().float(), teacher.bfloat16().float(), mask)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6)


def test_scale_mse_is_a_relative_error():
    # Why scale_mse exists: a layer with 100x larger states must not weigh 10^4x more.
    student, teacher = rand_pair()
    mask = ragged_mask()
    small = REP_LOSSES["scale_mse"](student, teacher, mask)
    big = REP_LOSSES["scale_mse"](100 * student, 100 * teacher, mask)
    assert torch.allclose(small, big, rtol=1e-5)
    assert REP_LOSSES["mse"](100 * student, teacher * 100, mask) > 1e3 * REP_LOSSES["mse"](student, teacher, mask)


def test_normalized_mse_is_two_minus_two_cos_over_d():
    student, teacher = rand_pair(d=8)
    mask = ragged_mask()
    for reduction in REDUCTIONS:
        nm = REP_LOSSES["normalized_mse"](student, teacher, mask, reduction=reduction)
        cos = REP_LOSSES["cosine"](student, teacher, mask, reduction=reduction)
        assert torch.allclose(nm, 2 * cos / 8, rtol=1e-5)


def test_rep_loss_bad_arguments_raise():
    student, teacher = rand_pair()
    mask = ragged_mask()
    with pytest.raises(ValueError, match="reduction"):
        REP_LOSSES["mse"](student, teacher, mask, reduction="batch")
    with pytest.raises(ValueError, match="projection"):
        REP_LOSSES["mse"](student, teacher[..., :4], mask)
    with pytest.raises(ValueError, match="mask"):
        REP_LOSSES["mse"](student, teacher, mask.float())


def test_registries_have_exactly_the_documented_keys():
    assert set(REP_LOSSES) == set(REP_KINDS)
    assert set(OPD_LOSSES) == set(OPD_KINDS)


# --------------------------------------------------------------------------------------------------
# representation_loss / layer_cosines
# --------------------------------------------------------------------------------------------------


def three_layers(d_s: int = 8, d_t: int = 8):
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(4, 6, d_t, generator=g) * (i + 1) for i in range(3)]
    student = [torch.randn(4, 6, d_s, generator=g, requires_grad=True) for _ in range(3)]
    return student, teacher


@pytest.mark.parametrize("kind", REP_KINDS)
def test_representation_loss_is_uniform_mean_of_layers(kind):
    student, teacher = three_layers()
    mask = ragged_mask()
    loss, per_layer = representation_loss(student, teacher, mask, kind=kind, reduction="sequence")
    want = torch.stack([REP_LOSSES[kind](s, t, mask, reduction="sequence") for s, t in zip(student, teacher)])
    assert per_layer.shape == (3,) and not per_layer.requires_grad
    assert torch.allclose(per_layer, want.detach())
    assert torch.allclose(loss, want.mean())
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_representation_loss_projection_gets_gradient_and_is_applied():
    student, teacher = three_layers(d_s=5, d_t=8)
    mask = ragged_mask()
    torch.manual_seed(0)
    projections = [nn.Linear(5, 8, bias=False) for _ in range(3)]
    for t in teacher:
        t.requires_grad_(True)
    loss, per_layer = representation_loss(student, teacher, mask, kind="mse", projections=projections)
    want = [REP_LOSSES["mse"](p(s), t, mask) for p, s, t in zip(projections, student, teacher)]
    assert torch.allclose(per_layer, torch.stack(want).detach())
    loss.backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in projections)
    assert all(t.grad is None for t in teacher)


def test_representation_loss_mixed_projections_when_some_widths_match():
    student, teacher = three_layers(d_s=8, d_t=8)
    proj = nn.Linear(8, 8, bias=False)
    loss, per_layer = representation_loss(student, teacher, ragged_mask(), projections=[None, proj, None])
    want = REP_LOSSES["scale_mse"](proj(student[1]), teacher[1], ragged_mask())
    assert torch.allclose(per_layer[1], want.detach())
    loss.backward()
    assert proj.weight.grad is not None


def test_representation_loss_rejects_mismatched_layers():
    student, teacher = three_layers(d_s=5, d_t=8)
    mask = ragged_mask()
    with pytest.raises(ValueError, match="width"):
        representation_loss(student, teacher, mask)
    with pytest.raises(ValueError, match="number of student and teacher layers"):
        representation_loss(student[:2], teacher, mask, projections=[nn.Linear(5, 8, bias=False)] * 2)
    with pytest.raises(ValueError, match="projections"):
        representation_loss(student, teacher, mask, projections=[nn.Linear(5, 8, bias=False)])
    with pytest.raises(ValueError, match="kind"):
        representation_loss(student, teacher, mask, kind="l1")


def test_layer_cosines_match_naive_token_mean():
    student, teacher = three_layers()
    mask = ragged_mask()
    got = layer_cosines(student, teacher, mask)
    assert got.shape == (3,) and not got.requires_grad
    for i, (s, t) in enumerate(zip(student, teacher)):
        want = 1.0 - naive_rep_loss("cosine", s.detach(), t, mask, "token")
        assert got[i].item() == pytest.approx(want, rel=1e-5)
    assert torch.isnan(layer_cosines(student, teacher, torch.zeros(4, 6, dtype=torch.bool))).all()


# --------------------------------------------------------------------------------------------------
# OPD baselines against naive full-logit references
# --------------------------------------------------------------------------------------------------

B, T, D_S, D_T, V_S, V_T, VOCAB = 3, 5, 6, 7, 40, 48, 40
OPD_MASK = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # 8 rows


def opd_setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student_head = nn.Linear(D_S, V_S, bias=False).double()
    teacher_head = nn.Linear(D_T, V_T, bias=False).double()
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V_S, D_S, generator=g, dtype=torch.float64))
        teacher_head.weight.copy_(torch.randn(V_T, D_T, generator=g, dtype=torch.float64))
    student_hidden = torch.randn(B, T, D_S, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(B, T, D_T, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    return student_hidden, teacher_hidden, tokens, student_head, teacher_head


def naive_opd(kind, student_hidden, teacher_hidden, tokens, mask, w_s, w_t, *, vocab_size, k, temperature):
    """Full (B, T, V) logits, then the definition position by position."""
    lp_s = torch.log_softmax((student_hidden @ w_s.T)[..., :vocab_size] / temperature, dim=-1)  # (B, T, V)
    lp_t = torch.log_softmax((teacher_hidden @ w_t.T)[..., :vocab_size] / temperature, dim=-1).detach()
    terms = []
    for b in range(mask.shape[0]):
        for p in range(mask.shape[1]):
            if not mask[b, p]:
                continue
            ls, lt = lp_s[b, p], lp_t[b, p]
            if kind == "opd_sampled":
                y = tokens[b, p]
                reward = -(ls[y].detach() - lt[y])
                terms.append(-reward * ls[y])
            elif kind == "opd_topk":
                ids = sorted(range(vocab_size), key=lambda v: -ls[v].item())[:k]
                top = torch.stack([ls[j] for j in ids]).detach()
                w = torch.exp(top) / torch.exp(top).sum()
                terms.append(-sum(-w[i] * (ls[j].detach() - lt[j]) * ls[j] for i, j in enumerate(ids)))
            else:
                terms.append(sum(torch.exp(ls[v]) * (ls[v] - lt[v]) for v in range(vocab_size)))
    return torch.stack(terms).mean()


def value_and_grads(fn, student_hidden, teacher_hidden, tokens, mask, student_head, teacher_head, **kw):
    sh = student_hidden.detach().clone().requires_grad_(True)
    student_head.zero_grad()
    loss = fn(sh, teacher_hidden, tokens, mask, student_head, teacher_head, **kw)
    loss.backward()
    return loss.detach(), sh.grad.clone(), student_head.weight.grad.clone()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind", OPD_KINDS)
def test_opd_matches_naive_full_logit_reference(kind, temperature):
    sh, th, tokens, s_head, t_head = opd_setup()
    kw = dict(vocab_size=VOCAB, k=5, chunk_size=3, temperature=temperature)
    loss, g_hidden, g_head = value_and_grads(OPD_LOSSES[kind], sh, th, tokens, OPD_MASK, s_head, t_head, **kw)

    ref_hidden = sh.detach().clone().requires_grad_(True)
    ref_w = s_head.weight.detach().clone().requires_grad_(True)
    ref = naive_opd(kind, ref_hidden, th, tokens, OPD_MASK, ref_w, t_head.weight.detach(),
                    vocab_size=VOCAB, k=5, temperature=temperature)
    ref.backward()
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, ref.detach(), rtol=1e-9, atol=1e-12)
    assert torch.allclose(g_hidden, ref_hidden.grad, rtol=1e-8, atol=1e-12)
    assert torch.allclose(g_head, ref_w.grad, rtol=1e-8, atol=1e-12)
    assert g_head.abs().sum() > 0 and torch.all(g_hidden[~OPD_MASK] == 0)


@pytest.mark.parametrize("kind", OPD_KINDS)
def test_opd_temperature_is_applied(kind):
    sh, th, tokens, s_head, t_head = opd_setup()
    at = {temp: OPD_LOSSES[kind](sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB, k=5, temperature=temp)
          for temp in (1.0, 2.0)}
    assert not torch.allclose(at[1.0], at[2.0])


@pytest.mark.parametrize("kind", OPD_KINDS)
def test_opd_independent_of_chunk_size(kind):
    sh, th, tokens, s_head, t_head = opd_setup(seed=3)
    args = (OPD_LOSSES[kind], sh, th, tokens, OPD_MASK, s_head, t_head)
    small = value_and_grads(*args, vocab_size=VOCAB, k=4, chunk_size=3)
    whole = value_and_grads(*args, vocab_size=VOCAB, k=4, chunk_size=1000)
    for a, b in zip(small, whole):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def padded_student_head(s_head: nn.Linear) -> nn.Linear:
    """The student head padded to V_T - 4 rows with the extra rows zero: comparing more ids changes the loss."""
    padded = nn.Linear(D_S, V_T - 4, bias=False).double()
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:V_S] = s_head.weight
    return padded


@pytest.mark.parametrize("kind", OPD_KINDS)
def test_opd_ignores_teacher_rows_beyond_shared_vocab(kind):
    sh, th, tokens, s_head, t_head = opd_setup(seed=4)
    kw = dict(vocab_size=VOCAB, k=5)
    before = value_and_grads(OPD_LOSSES[kind], sh, th, tokens, OPD_MASK, s_head, t_head, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        t_head.weight[VOCAB:] = 50 * torch.randn(V_T - VOCAB, D_T, generator=g, dtype=torch.float64)  # huge logits
    after = value_and_grads(OPD_LOSSES[kind], sh, th, tokens, OPD_MASK, s_head, t_head, **kw)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    # and the padded rows would matter if they were not sliced off:
    wide_head = padded_student_head(s_head)
    wide = OPD_LOSSES[kind](sh, th, tokens, OPD_MASK, wide_head, t_head, vocab_size=V_T - 4, k=5)
    assert not torch.allclose(wide.detach(), before[0])


def test_opd_full_zero_for_identical_models_positive_otherwise():
    sh, _, tokens, s_head, _ = opd_setup()
    same = opd_full(sh, sh.detach(), tokens, OPD_MASK, s_head, s_head, vocab_size=VOCAB)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    other = opd_full(sh, sh.detach() + 0.5, tokens, OPD_MASK, s_head, s_head, vocab_size=VOCAB)
    assert other.item() > 1e-3


def test_opd_topk_with_whole_vocab_has_the_exact_reverse_kl_gradient():
    # With K = the vocabulary, w = p_S and Σ_j p_j (log p_j − log q_j) ∇log p_j = ∇ KL(p‖q): an
    # independent check of the surrogate's sign and weights.
    sh, th, tokens, s_head, t_head = opd_setup(seed=5)
    topk = value_and_grads(opd_topk, sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB, k=VOCAB)
    full = value_and_grads(opd_full, sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB)
    assert torch.allclose(topk[1], full[1], rtol=1e-8, atol=1e-12)
    assert torch.allclose(topk[2], full[2], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", OPD_KINDS)
def test_opd_gradient_never_reaches_teacher(kind):
    sh, th, tokens, s_head, t_head = opd_setup()
    th.requires_grad_(True)
    OPD_LOSSES[kind](sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB).backward()
    assert th.grad is None and t_head.weight.grad is None
    assert sh.grad is not None and sh.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", OPD_KINDS)
def test_opd_empty_mask_is_zero_and_backward_works(kind):
    sh, th, tokens, s_head, t_head = opd_setup()
    loss = OPD_LOSSES[kind](sh, th, tokens, torch.zeros(B, T, dtype=torch.bool), s_head, t_head, vocab_size=VOCAB)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(sh.grad == 0)


class RecordingHead(nn.Module):
    """Wraps an LM head and records the number of rows of every call (forward and recomputation)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.head(x)


@pytest.mark.parametrize("kind", [*OPD_KINDS, "reverse_kl_per_token"])
def test_opd_never_calls_a_head_with_more_than_chunk_size_rows(kind):
    sh, th, tokens, s_head, t_head = opd_setup()
    s_rec, t_rec = RecordingHead(s_head), RecordingHead(t_head)
    if kind == "reverse_kl_per_token":
        reverse_kl_per_token(sh, th, OPD_MASK, s_rec, t_rec, vocab_size=VOCAB, chunk_size=3)
    else:
        OPD_LOSSES[kind](sh, th, tokens, OPD_MASK, s_rec, t_rec, vocab_size=VOCAB, chunk_size=3).backward()
    assert s_rec.rows and t_rec.rows
    assert max(s_rec.rows + t_rec.rows) <= 3
    # every selected row went through each head (8 rows = chunks of 3, 3, 2)
    assert sorted(set(t_rec.rows)) == [2, 3] and sum(t_rec.rows) % int(OPD_MASK.sum()) == 0


def test_reverse_kl_per_token_matches_naive_and_opd_full():
    sh, th, tokens, s_head, t_head = opd_setup(seed=6)
    per_tok = reverse_kl_per_token(sh, th, OPD_MASK, s_head, t_head,
                                   vocab_size=VOCAB, chunk_size=3, temperature=0.7)
    assert per_tok.shape == (int(OPD_MASK.sum()),) and not per_tok.requires_grad
    lp_s = torch.log_softmax((sh @ s_head.weight.T)[..., :VOCAB] / 0.7, -1)[OPD_MASK]
    lp_t = torch.log_softmax((th @ t_head.weight.T)[..., :VOCAB] / 0.7, -1)[OPD_MASK]
    want = [sum(lp_s[i, v].exp() * (lp_s[i, v] - lp_t[i, v]) for v in range(VOCAB)) for i in range(len(lp_s))]
    assert torch.allclose(per_tok, torch.stack(want).detach(), rtol=1e-9)
    assert (per_tok >= 0).all()
    full = opd_full(sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB, temperature=0.7)
    assert torch.allclose(per_tok.mean(), full.detach())


def test_opd_bad_arguments_raise():
    sh, th, tokens, s_head, t_head = opd_setup()
    with pytest.raises(ValueError, match="vocab_size"):  # a head narrower than the shared vocabulary
        opd_full(sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=V_T)
    bad_tokens = tokens.clone()
    bad_tokens[0, 0] = VOCAB
    with pytest.raises(ValueError, match="token ids"):
        opd_sampled(sh, th, bad_tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="temperature"):
        opd_topk(sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        opd_topk(sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB, chunk_size=0)


@pytest.mark.parametrize("kind", OPD_KINDS)
def test_opd_keeps_no_vocab_sized_tensor_for_backward(kind):
    # What autograd saves outside the checkpointed chunks; a (rows, V) logits tensor here would grow
    # with the whole batch. Hidden widths and k are all < VOCAB, so any saved V-wide tensor shows up.
    sh, th, tokens, s_head, t_head = opd_setup()
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = OPD_LOSSES[kind](sh, th, tokens, OPD_MASK, s_head, t_head, vocab_size=VOCAB, k=5, chunk_size=3)
    loss.backward()
    assert saved and all(not shape or shape[-1] < VOCAB for shape in saved), saved


def test_recomputed_layers_give_the_same_loss_and_gradients():
    torch.manual_seed(3)
    s = [torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 5, 10, dtype=torch.float64) for _ in range(3)]
    mask = torch.rand(2, 5) > 0.3
    proj = [torch.nn.Linear(6, 10, bias=False).double() for _ in range(3)]
    out = {}
    for recompute in (True, False):
        loss, per_layer = representation_loss(s, t, mask, kind="scale_mse", projections=proj, recompute=recompute)
        grads = torch.autograd.grad(loss, s + [p.weight for p in proj])
        out[recompute] = (loss.detach(), per_layer, grads)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    for a, b in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
