"""Distillation losses as pure functions: tensors + mask in, scalar out, chosen by name from a registry.

Representation losses (OPRD, paper Eq. 6). For student/teacher hidden states h_S, h_T of one layer and a
response-position mask m:

    L_layer = E_seq[ 1/Σ_t m_t · Σ_t m_t · ℓ(h_S,t, sg(h_T,t)) ]        (reduction="sequence", the paper)
    L_layer = 1/Σ_{b,t} m_bt · Σ_{b,t} m_bt · ℓ(h_S,bt, sg(h_T,bt))      (reduction="token", authors' verl)
    L       = 1/|layers| · Σ_l L_layer(l)                                 (`representation_loss`)

with the per-position term ℓ from `REP_LOSSES` (d = hidden width):

    mse             ||s − t||² / d                                  paper Eq. 6
    scale_mse       (||s − t||² / d) / sg(mean_{selected} ||t||² / d)   a relative error per layer
    normalized_mse  ||s/|s| − t/|t|||² / d  = (2 − 2 cos) / d        the authors' later code
    cosine          1 − cos(s, t)

Output-space OPD baselines (`OPD_LOSSES`) take the final hidden states that predict each response token plus
the two LM heads, and work through the selected rows in chunks, so the full (B, T, V) logits never exist:

    opd_sampled  −mean_t r_t · log p_S(y_t),  r_t = −sg(log p_S(y_t) − log p_T(y_t))     (REINFORCE)
    opd_topk     −mean_t Σ_{j∈topk_S} A_j · log p_S(j),  A_j = −sg(w_j (log p_S(j) − log p_T(j)))
    opd_full     mean_t Σ_v p_S(v) (log p_S(v) − log p_T(v))                    (exact reverse KL)

Example:

    loss, per_layer = representation_loss(student_layers, teacher_layers, mask, kind="scale_mse")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

REDUCTIONS = ("sequence", "token")

# Keeps scale_mse finite for an all-zero teacher layer; real residual streams have ||t||²/d ≳ 1e-2.
SCALE_EPS = 1e-6
# Norm floor for normalized_mse / cosine, so a zero vector gives a finite (if meaningless) term.
NORM_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Representation losses
# --------------------------------------------------------------------------------------------------


def _check_rep_inputs(student: Tensor, teacher: Tensor, mask: Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if student.dim() < 2:
        raise ValueError(f"hidden states need shape (..., D), got student shape {tuple(student.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher hidden states differ in shape: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)}; give a width projection (D_S -> D_T) when the widths differ"
        )
    if mask.shape != student.shape[:-1] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(student.shape[:-1])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def _reduce(per_pos: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """Mean of the selected per-position terms `per_pos` (N,), in `mask`'s row-major order.

    "sequence": every index of mask's leading dims is one sequence and its last dim the positions;
    a per-sequence mean, then the mean over sequences with ≥ 1 selected position. A 1-D mask is one
    sequence, so for 2-D (N, D) inputs both reductions give the token mean.
    """
    if reduction == "token":
        return per_pos.mean()
    counts = mask.reshape(-1, mask.shape[-1]).sum(-1)  # (S,) selected positions per sequence
    # Weight of each selected position: 1/(its sequence's count) / (number of non-empty sequences).
    seq_weight = 1.0 / (counts.clamp(min=1).to(per_pos.dtype) * (counts > 0).sum())  # (S,)
    return (per_pos * seq_weight.repeat_interleave(counts)).sum()


def _rep_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    reduction: str,
    term: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    _check_rep_inputs(student, teacher, mask, reduction)
    # Select before computing: padded positions may hold anything (even inf), and they cost nothing.
    s = student[mask].float()  # (N, D)
    t = teacher.detach()[mask].float()  # (N, D); stop-gradient on the teacher
    if s.shape[0] == 0:
        # An empty sum is 0 but still a graph node, so backward() works on a batch with no positions.
        return s.sum() * 0.0
    return _reduce(term(s, t), mask, reduction)


def _mse_terms(s: Tensor, t: Tensor) -> Tensor:  # (N, D), (N, D) -> (N,)
    return (s - t).pow(2).mean(-1)


def _scale_mse_terms(s: Tensor, t: Tensor) -> Tensor:  # (N, D), (N, D) -> (N,)
    # `t` holds every selected position of the batch, so c is one constant per layer and call.
    c = t.pow(2).mean(-1).mean() + SCALE_EPS
    return _mse_terms(s, t) / c


def _normalized_mse_terms(s: Tensor, t: Tensor) -> Tensor:  # (N, D), (N, D) -> (N,)
    return _mse_terms(F.normalize(s, dim=-1, eps=NORM_EPS), F.normalize(t, dim=-1, eps=NORM_EPS))


def _cosine_terms(s: Tensor, t: Tensor) -> Tensor:  # (N, D), (N, D) -> (N,)
    return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=NORM_EPS)


def mse(student: Tensor, teacher: Tensor, mask: Tensor, reduction: str = "sequence") -> Tensor:
    """Paper Eq. 6 per layer: ℓ_t = ||s_t − sg(t_t)||² / d, masked mean (see module docstring).

    student, teacher: (..., D); mask: (...) bool. Computed in float32; returns a float32 scalar,
    0 (with a gradient path) when the mask selects nothing.
    """
    return _rep_loss(student, teacher, mask, reduction, _mse_terms)


def scale_mse(student: Tensor, teacher: Tensor, mask: Tensor, reduction: str = "sequence") -> Tensor:
    """Scale-normalised MSE: ℓ_t = (||s_t − t_t||² / d) / c,  c = sg(mean_{selected} ||t_bt||² / d) + eps.

    Raw MSE/d on real models is dominated by the middle layers, whose residual norms are ~100x those of
    the first and last layers, so a uniform layer mean would effectively train a few layers. Dividing by
    the teacher layer's own mean squared norm per dimension (over all selected positions of the batch,
    whichever the reduction) makes each layer's loss a relative error: every layer counts alike, and the
    loss is invariant to scaling student and teacher together. c is detached, so the gradient is the mse
    gradient divided by a constant.
    """
    return _rep_loss(student, teacher, mask, reduction, _scale_mse_terms)


def normalized_mse(student: Tensor, teacher: Tensor, mask: Tensor, reduction: str = "sequence") -> Tensor:
    """L2-normalised MSE (the authors' later code): ℓ_t = ||s_t/|s_t| − t_t/|t_t|||² / d = (2 − 2cos) / d.

    Tiny in absolute terms (≈1e-4 at cos 0.93, d=1536): the authors' README says to raise the coefficient
    to 100–1000 when it is combined with another loss.
    """
    return _rep_loss(student, teacher, mask, reduction, _normalized_mse_terms)


def cosine(student: Tensor, teacher: Tensor, mask: Tensor, reduction: str = "sequence") -> Tensor:
    """Cosine distance: ℓ_t = 1 − cos(s_t, t_t); direction only, in [0, 2]."""
    return _rep_loss(student, teacher, mask, reduction, _cosine_terms)


REP_LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": mse,
    "scale_mse": scale_mse,
    "normalized_mse": normalized_mse,
    "cosine": cosine,
}


def _project(projection: nn.Module | None, hidden: Tensor) -> Tensor:
    if projection is None:
        return hidden
    param = next(projection.parameters(), None)
    # Student states may be bf16 while the trainable projection is fp32: run it in its own dtype.
    return projection(hidden if param is None else hidden.to(param.dtype))


def _check_layers(n_s: int, n_t: int, projections: Sequence[nn.Module | None] | None) -> None:
    if n_s != n_t or n_s == 0:
        raise ValueError(
            f"need the same, non-zero number of student and teacher layers, got {n_s} and {n_t}; "
            "map teacher layers onto the student's first (layer_map)"
        )
    if projections is not None and len(projections) != n_s:
        raise ValueError(
            f"got {len(projections)} projections for {n_s} layers; pass one per layer (None = identity)"
        )


def _projected(i: int, s: Tensor, t: Tensor, projection: nn.Module | None) -> Tensor:
    """Student layer i projected to the teacher's width (checked)."""
    s = _project(projection, s)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"layer {i}: student width {s.shape[-1]} != teacher width {t.shape[-1]}; "
            "give a projection (a bias-free nn.Linear D_S -> D_T) for this layer"
        )
    return s


def _paired_layers(
    student_layers: Sequence[Tensor],
    teacher_layers: Sequence[Tensor],
    projections: Sequence[nn.Module | None] | None,
) -> list[tuple[Tensor, Tensor]]:
    """Project each student layer to the teacher's width; check that the layers pair up."""
    _check_layers(len(student_layers), len(teacher_layers), projections)
    return [(_projected(i, s, t, projections[i] if projections is not None else None), t)
            for i, (s, t) in enumerate(zip(student_layers, teacher_layers))]


def _layer_loss(s: Tensor, t: Tensor, *, i: int, projection: nn.Module | None, mask: Tensor, kind: str,
                reduction: str) -> Tensor:
    return REP_LOSSES[kind](_projected(i, s, t, projection), t, mask, reduction=reduction)


def representation_loss(
    student_layers: Sequence[Tensor],
    teacher_layers: Sequence[Tensor],
    mask: Tensor,
    kind: str = "scale_mse",
    reduction: str = "sequence",
    projections: Sequence[nn.Module | None] | None = None,
    recompute: bool = True,
) -> tuple[Tensor, Tensor]:
    """OPRD over layers: L = 1/L · Σ_l REP_LOSSES[kind](P_l(h_S^(l)), h_T^(l), mask), P_l = projections[l] or id.

    student_layers[l]: (B, T, D_S); teacher_layers[l]: (B, T, D_T); mask: (B, T) bool.
    Returns (scalar loss, (L,) detached per-layer losses for logging). Layers are weighted uniformly
    (paper Eq. 6); gradients reach the student states and the projections, never the teacher.
    With `recompute` (default) each layer's projection and loss terms are recomputed in backward instead of
    kept: with every layer of a model mapped, those fp32 (N, D) intermediates would otherwise outweigh the
    saving from skipping the LM head.
    """
    if kind not in REP_LOSSES:
        raise ValueError(f"kind must be one of {', '.join(REP_LOSSES)}, got {kind!r}")
    _check_layers(len(student_layers), len(teacher_layers), projections)
    losses = []
    for i, (s, t) in enumerate(zip(student_layers, teacher_layers)):
        fn = partial(_layer_loss, i=i, projection=projections[i] if projections is not None else None, mask=mask,
                     kind=kind, reduction=reduction)
        if recompute and torch.is_grad_enabled() and s.requires_grad:
            losses.append(checkpoint(fn, s, t, use_reentrant=False))
        else:
            losses.append(fn(s, t))
    per_layer = torch.stack(losses)  # (L,)
    return per_layer.mean(), per_layer.detach()


@torch.no_grad()
def layer_cosines(
    student_layers: Sequence[Tensor],
    teacher_layers: Sequence[Tensor],
    mask: Tensor,
    projections: Sequence[nn.Module | None] | None = None,
) -> Tensor:
    """Per-layer masked token-mean cos(P_l(h_S,t), h_T,t) for logging: (L,) float32, no gradient.

    NaN where the mask selects nothing (no data, rather than a cosine of 0). A high cosine alone does not
    show that distillation worked (findings.md: cos 0.985 next to a reverse KL of 1.1 nats/token).
    """
    out = []
    for s, t in _paired_layers(student_layers, teacher_layers, projections):
        cos = F.cosine_similarity(s[mask].float(), t[mask].float(), dim=-1, eps=NORM_EPS)  # (N,)
        out.append(cos.mean() if cos.numel() else cos.new_tensor(float("nan")))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# Output-space OPD baselines
# --------------------------------------------------------------------------------------------------

Head = Callable[[Tensor], Tensor]  # (N, D) -> (N, V_padded) logits


def _log_probs(head: Head, hidden: Tensor, vocab_size: int, temperature: float) -> Tensor:
    """log softmax(head(hidden)[:, :vocab_size] / temperature): (c, D) -> (c, vocab_size), ≥ float32.

    Rows ≥ vocab_size (padding, or ids only one model has) are dropped before the softmax, so both
    distributions live on the same support.
    """
    logits = head(hidden)  # (c, V_padded)
    if logits.shape[-1] < vocab_size:
        raise ValueError(
            f"an LM head returned {logits.shape[-1]} logits, fewer than vocab_size={vocab_size}; "
            "vocab_size must be the shared vocabulary, at most min(V_student, V_teacher)"
        )
    logits = logits[:, :vocab_size]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 log-softmax is too coarse
    return torch.log_softmax(logits / temperature, dim=-1)


def _select_rows(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor,
    tokens: Tensor | None,
    *,
    vocab_size: int,
    chunk_size: int,
    temperature: float,
    k: int = 1,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check arguments; return the masked rows: student (N, D_S), teacher (N, D_T) detached, tokens (N,)."""
    shapes_ok = student_hidden.shape[:-1] == mask.shape == teacher_hidden.shape[:-1]
    if mask.dtype != torch.bool or not shapes_ok:
        raise ValueError(
            f"need student_hidden (B, T, D_S), teacher_hidden (B, T, D_T) and a bool mask (B, T); got "
            f"{tuple(student_hidden.shape)}, {tuple(teacher_hidden.shape)}, {mask.dtype} {tuple(mask.shape)}"
        )
    if tokens is not None and tokens.shape != mask.shape:
        raise ValueError(f"tokens must have the mask's shape {tuple(mask.shape)}, got {tuple(tokens.shape)}")
    for name, value, low in (("vocab_size", vocab_size, 1), ("chunk_size", chunk_size, 1), ("k", k, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    s = student_hidden[mask]  # (N, D_S)
    t = teacher_hidden.detach()[mask]  # (N, D_T)
    y = tokens[mask] if tokens is not None else None  # (N,)
    if y is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= vocab_size):
        raise ValueError(
            f"response token ids must lie in [0, vocab_size={vocab_size}), got range "
            f"[{int(y.min())}, {int(y.max())}]; is vocab_size the shared vocabulary?"
        )
    return s, t, y


def _empty_loss(s: Tensor) -> Tensor:
    return s.sum().to(torch.promote_types(s.dtype, torch.float32)) * 0.0


def _chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(lo, lo + chunk_size) for lo in range(0, n, chunk_size)]


def _student_log_probs_at(
    hidden: Tensor, ids: Tensor, *, head: Head, vocab_size: int, temperature: float
) -> Tensor:  # (c, D_S), (c, k) -> (c, k)
    return _log_probs(head, hidden, vocab_size, temperature).gather(-1, ids)


def _reverse_kl_rows(
    s: Tensor, t: Tensor, *, student_head: Head, teacher_head: Head, vocab_size: int, temperature: float
) -> Tensor:  # (c, D_S), (c, D_T) -> (c,)
    with torch.no_grad():
        t_lp = _log_probs(teacher_head, t, vocab_size, temperature)  # (c, V)
    s_lp = _log_probs(student_head, s, vocab_size, temperature)  # (c, V)
    return (s_lp.exp() * (s_lp - t_lp)).sum(-1)


def _opd_loss(rows_loss: Callable[..., Tensor] | None = None, *, uses_k: bool = False) -> Any:
    """The OPD losses' common signature around `rows_loss(s, t, y, ...)`, which returns the loss summed over the
    selected rows: s (N, D_S) student states, t (N, D_T) teacher states (detached), y (N,) response tokens.

    The loss: student_hidden (B, T, D_S) / teacher_hidden (B, T, D_T) are final post-norm states at the
    positions whose logits predict `tokens` (B, T); mask (B, T) bool selects them; heads map (N, D) ->
    (N, V_padded); the value is the mean over the selected rows (0, with a gradient path, when none is).
    `k` is validated only for a loss that `uses_k`.
    """
    if rows_loss is None:
        return partial(_opd_loss, uses_k=uses_k)

    def loss(student_hidden: Tensor, teacher_hidden: Tensor, tokens: Tensor, mask: Tensor, student_head: Head,
             teacher_head: Head, *, vocab_size: int, k: int = 16, chunk_size: int = 512,
             temperature: float = 1.0) -> Tensor:
        s, t, y = _select_rows(student_hidden, teacher_hidden, mask, tokens, vocab_size=vocab_size,
                               chunk_size=chunk_size, temperature=temperature,
                               k=k if uses_k else 1)
        if s.shape[0] == 0:
            return _empty_loss(s)
        return rows_loss(s, t, y, student_head=student_head, teacher_head=teacher_head, vocab_size=vocab_size,
                         k=k, chunk_size=chunk_size, temperature=temperature) / s.shape[0]

    loss.__name__, loss.__qualname__, loss.__doc__ = rows_loss.__name__, rows_loss.__qualname__, rows_loss.__doc__
    return loss


@_opd_loss
def opd_sampled(s: Tensor, t: Tensor, y: Tensor, *, student_head: Head, teacher_head: Head, vocab_size: int,
                k: int, chunk_size: int, temperature: float) -> Tensor:
    """Sampled-token OPD ("top-1"): loss = −mean_t r_t log p_S(y_t), r_t = −sg(log p_S(y_t) − log p_T(y_t)).

    The k1 estimate of reverse KL at the sampled token used directly as the advantage (REINFORCE, no
    baseline, no reward-to-go, token-mean), so ∇loss = −mean_t r_t ∇log p_S(y_t). The value is a
    surrogate, not a KL. `k` is ignored (common OPD signature, `_opd_loss`).
    """
    student_lp = partial(_student_log_probs_at, head=student_head, vocab_size=vocab_size, temperature=temperature)
    total = 0.0
    for rows in _chunks(s.shape[0], chunk_size):
        ids = y[rows, None]  # (c, 1)
        with torch.no_grad():
            t_lp = _log_probs(teacher_head, t[rows], vocab_size, temperature).gather(-1, ids)  # (c, 1)
        # Checkpointed: only (c, D_S) is kept for backward; the (c, V) student logits are recomputed.
        s_lp = checkpoint(student_lp, s[rows], ids, use_reentrant=False)  # (c, 1)
        reward = -(s_lp.detach() - t_lp)
        total = total - (reward * s_lp).sum()
    return total


@_opd_loss(uses_k=True)
def opd_topk(s: Tensor, t: Tensor, y: Tensor, *, student_head: Head, teacher_head: Head, vocab_size: int,
             k: int, chunk_size: int, temperature: float) -> Tensor:
    """Student-top-k OPD (thunlp/OPD `only_stu`, `student_p`): loss = −mean_t Σ_{j∈K_t} A_j · log p_S(j).

    K_t = the student's own top-k ids at t (from detached logits); w = softmax(log p_S over K_t), i.e. the
    student's probabilities renormalised on K_t; A_j = −sg(w_j (log p_S(j) − log p_T(j))) with full-vocabulary
    log-probs for both models. A REINFORCE surrogate of reverse KL truncated to K_t; small k relative to the
    vocabulary is biased (findings.md). `tokens` is only validated (the sampled token plays no role).
    """
    k = min(k, vocab_size)
    student_lp = partial(_student_log_probs_at, head=student_head, vocab_size=vocab_size, temperature=temperature)
    total = 0.0
    for rows in _chunks(s.shape[0], chunk_size):
        with torch.no_grad():
            # The ids must be fixed before the checkpointed pass, whose recomputation must gather the
            # same ids; this costs one extra no-grad student head pass per chunk.
            s_lp_k, ids = _log_probs(student_head, s[rows], vocab_size, temperature).topk(k, dim=-1)  # (c, k)
            t_lp_k = _log_probs(teacher_head, t[rows], vocab_size, temperature).gather(-1, ids)  # (c, k)
            advantage = -torch.softmax(s_lp_k, dim=-1) * (s_lp_k - t_lp_k)  # (c, k)
        s_lp = checkpoint(student_lp, s[rows], ids, use_reentrant=False)  # (c, k)
        total = total - (advantage * s_lp).sum()
    return total


@_opd_loss
def opd_full(s: Tensor, t: Tensor, y: Tensor, *, student_head: Head, teacher_head: Head, vocab_size: int,
             k: int, chunk_size: int, temperature: float) -> Tensor:
    """Exact reverse KL: loss = mean_t Σ_{v<vocab_size} p_S(v) (log p_S(v) − log p_T(v)), differentiable.

    The checkpointed chunk recomputes the teacher's log-probs in backward too: caching them would keep
    (N, V) floats alive until backward, the very tensor chunking avoids. `tokens` is only validated and
    `k` is ignored (common OPD signature).
    """
    kl_rows = partial(_reverse_kl_rows, student_head=student_head, teacher_head=teacher_head,
                      vocab_size=vocab_size, temperature=temperature)
    total = 0.0
    for rows in _chunks(s.shape[0], chunk_size):
        total = total + checkpoint(kl_rows, s[rows], t[rows], use_reentrant=False).sum()
    return total


@torch.no_grad()
def reverse_kl_per_token(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor,
    student_head: Head,
    teacher_head: Head,
    *,
    vocab_size: int,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> Tensor:
    """KL(p_S ‖ p_T) at every selected position, for evaluation and logging: (N,), no gradient.

    Rows follow `mask`'s row-major order (as `student_hidden[mask]`); its mean is `opd_full`'s value.
    """
    s, t, _ = _select_rows(student_hidden, teacher_hidden, mask, None,
                           vocab_size=vocab_size, chunk_size=chunk_size, temperature=temperature)
    out = [
        _reverse_kl_rows(s[rows], t[rows], student_head=student_head, teacher_head=teacher_head,
                         vocab_size=vocab_size, temperature=temperature)
        for rows in _chunks(s.shape[0], chunk_size)
    ]
    return torch.cat(out) if out else s.new_zeros(0, dtype=torch.promote_types(s.dtype, torch.float32))


OPD_LOSSES: dict[str, Callable[..., Tensor]] = {
    "opd_sampled": opd_sampled,
    "opd_topk": opd_topk,
    "opd_full": opd_full,
}
