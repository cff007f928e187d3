"""Width projections: one bias-free Linear(d_S -> d_T) per mapped layer pair when student and teacher widths
differ, trained with the LoRA weights, and the one least-squares solver they (and OPRD-Bridge's P_S) start from.

  width_projections  the random start: N(0, 1/d_S) entries keep the per-dimension scale of the input
  ridge_solve        W = argmin mean ||W x - y||^2 + lambda ||W||^2 from the sums X^T X / N and X^T Y / N
  least_squares      the same from the rows themselves (bridge.train_projection's start)
  fit_projections    loss.projection_init=lstsq: a run's projections set to that fit on one rollout batch
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from minioprd.capture import capture_hidden
from minioprd.layers import position_mask, state_window
from minioprd.rollout import Rollout, rollout, rollout_options

RIDGE = 1e-4  # relative ridge of a least-squares fit: negligible with many rows, keeps few rows solvable


def width_projections(n: int, d_s: int, d_t: int, device: Any = "cpu") -> nn.ModuleList:
    """`n` bias-free Linear(d_s -> d_t) with N(0, 1/d_s) weights (drawn from torch's global generator)."""
    projections = nn.ModuleList()
    for _ in range(n):
        proj = nn.Linear(d_s, d_t, bias=False)
        nn.init.normal_(proj.weight, std=d_s ** -0.5)  # keeps the per-dimension scale of the input
        projections.append(proj)
    return projections.to(device)


def ridge_solve(gram: Tensor, cross: Tensor, ridge: float = RIDGE) -> Tensor:
    """W (d_out, d_in) minimising mean ||W x - y||^2 + lambda ||W||^2, given gram = X^T X / N (d_in, d_in) and
    cross = X^T Y / N (d_in, d_out); lambda = `ridge` * mean diag(gram). Solved in the dtype given (float64)."""
    lam = ridge * float(gram.diagonal().mean().clamp(min=1e-30))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross).T


def least_squares(s: Tensor, z: Tensor, ridge: float = RIDGE) -> Tensor:
    """The minimiser W (r, d_S) of mean ||W s - z||^2 + lambda ||W||^2 on rows s (N, d_S), z (N, r), float32."""
    s64, z64 = s.double(), z.double()
    return ridge_solve(s64.T @ s64 / s.shape[0], s64.T @ z64 / s.shape[0], ridge).float()


@torch.no_grad()
def fit_projections(s: Any, log: Any = print, ro: Rollout | None = None) -> list[float]:
    """loss.projection_init=lstsq: set each width projection to the least-squares map P = argmin mean
    ||P h_S - h_T||^2 + lambda ||P||^2 (`ridge_solve`) on one rollout batch of the first
    prompts (or `ro`), before any update.

    A random P makes the first steps chase an arbitrary image of the teacher's space; the fitted one starts
    the loss at what a linear map cannot explain. The sums S^T S (d_S, d_S) and S^T Y (d_S, d_T) are gathered
    micro-batch by micro-batch on the CPU in float64, so the fit never holds more states than an update step.
    Returns the fitted maps' R^2 per layer (logged).
    """
    cfg, lc = s.cfg, s.cfg.loss
    if ro is None:
        g = torch.random.get_rng_state()  # the fit must not shift the run's own sampling
        torch.manual_seed(cfg.train.seed * 1_000_003 - 1)
        try:
            ro = rollout(s.student, s.tokenizer, s.prompts[:cfg.rollout.prompts_per_step], n=cfg.rollout.n,
                         temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                         max_new_tokens=cfg.rollout.max_new_tokens, **rollout_options(cfg.rollout, s.device))
        finally:
            torch.random.set_rng_state(g)
    selected = position_mask(ro.response_mask, lc.positions, lc.k)  # (B, R)
    s_layers, t_layers = sorted({a for a, _ in s.pairs}), sorted({b for _, b in s.pairs})
    n_pairs = len(s.pairs)
    gram = [None] * n_pairs  # S^T S per pair, float64 on the CPU
    cross = [None] * n_pairs  # S^T Y
    y_sum, yy, rows = [0.0] * n_pairs, [0.0] * n_pairs, 0
    was = s.student.training
    s.student.eval()
    try:
        B = ro.input_ids.shape[0]
        mb = cfg.rollout.micro_batch or B
        for i in range(0, B, mb):
            part, sel = ro.select(slice(i, i + mb)), selected[i:i + mb]
            if not sel.any():
                continue
            win = state_window(part.prompt_len, sel, lc.convention)
            pos = part.position_ids()
            got_t = capture_hidden(s.teacher, part.input_ids.to(s.teacher_device),
                                   part.attention_mask.to(s.teacher_device), pos.to(s.teacher_device), t_layers,
                                   win.start, win.stop)
            got_s = capture_hidden(s.student, part.input_ids, part.attention_mask, pos, s_layers, win.start,
                                   win.stop)
            teacher, student = dict(zip(t_layers, got_t)), dict(zip(s_layers, got_s))
            mask = win.mask.to(s.device)
            rows += int(mask.sum())
            for j, (a, b) in enumerate(s.pairs):
                x = student[a][mask].float()  # (n, d_S)
                y = teacher[b].to(s.device)[mask].float()  # (n, d_T)
                gx, cx = (x.T @ x).double().cpu(), (x.T @ y).double().cpu()
                gram[j] = gx if gram[j] is None else gram[j] + gx
                cross[j] = cx if cross[j] is None else cross[j] + cx
                y_sum[j] = y.double().sum(0).cpu() + y_sum[j]
                yy[j] += float((y.double() ** 2).sum())
    finally:
        s.student.train(was)
    if not rows:
        log("projections: no response tokens to fit on; they start random")
        return []
    r2 = []
    for j, proj in enumerate(s.projections):
        G, C = gram[j] / rows, cross[j] / rows
        w = ridge_solve(G, C)  # (d_T, d_S)
        proj.weight.copy_(w.to(proj.weight.device, proj.weight.dtype))
        resid = yy[j] / rows - 2 * float((w * C.T).sum()) + float(((w @ G) * w).sum())  # mean ||W x - y||^2
        var = yy[j] / rows - float(((y_sum[j] / rows) ** 2).sum())
        r2.append(1 - resid / max(var, 1e-30))
    log(f"projections: least-squares start on {rows} response tokens, R^2 per layer "
        + ", ".join(f"{v:.2f}" for v in r2))
    return r2
