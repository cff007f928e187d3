"""A small cross-entropy trainer: builds the demo's model pairs and runs the off-policy SFT baseline.

    data = CEData.from_texts(tokenizer, prompt_ids, solutions)       # responses end with EOS
    train_ce(model, data, steps=2000, lr=3e-3, batch_size=64, callback=lambda step, loss: ...)

`sft_on_teacher(cfg, setup, evaluator)` is the off-policy reference of `minioprd demo --compare`: each step
the frozen teacher samples `rollout.n` responses for `rollout.prompts_per_step` prompts (the same budget of
sequences as an on-policy step) and the student takes one cross-entropy step on them, with distill's
optimizer, schedule and clipping. It writes `metrics.jsonl` in distill's format (`loss`, `eval/<name>`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class CEData:
    """Token ids of (prompt, response) pairs; the loss is on the response tokens (EOS included)."""

    prompts: list[list[int]]
    responses: list[list[int]]

    @classmethod
    def from_texts(cls, tokenizer: Any, prompts: list[list[int]], responses: list[str]) -> "CEData":
        eos = tokenizer.eos_token_id
        ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        return cls([list(p) for p in prompts], [list(r) + [eos] for r in ids])

    def __len__(self) -> int:
        return len(self.prompts)


def ce_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 except on response tokens)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def ce_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100)


def train_ce(model: Any, data: CEData, *, steps: int, lr: float, batch_size: int = 64, seed: int = 0,
             warmup: int = 50, weight_decay: float = 0.0, grad_clip: float = 1.0, pad_id: int = 0,
             callback: Callable[[int, float], bool | None] | None = None, start_step: int = 0,
             optimizer: torch.optim.Optimizer | None = None,
             schedule: Callable[[int], float] | None = None) -> torch.optim.Optimizer:
    """Train `model` in place for `steps` steps of `batch_size` random examples at `lr` times
    `schedule(step)` (default: a linear warm-up over `warmup` steps counted from step 0, then constant).
    `callback(step, loss)` runs after each step and may return True to stop early. Pass the returned
    optimizer back (with `start_step`) to continue a run exactly where it stopped, as the demo does to turn
    the student checkpoint into its teacher."""
    device = next(model.parameters()).device
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=weight_decay, betas=(0.9, 0.98))
    model.train()
    for step in range(start_step + 1, start_step + steps + 1):
        rng = random.Random(f"minioprd-ce:{seed}:{step}")
        idx = [rng.randrange(len(data)) for _ in range(batch_size)]
        for g in optimizer.param_groups:
            g["lr"] = lr * (schedule(step) if schedule is not None else min(1.0, step / max(1, warmup)))
        batch = ce_batch([data.prompts[i] for i in idx], [data.responses[i] for i in idx], pad_id, device)
        loss = ce_loss(model, batch)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if callback is not None and callback(step, float(loss.detach())):
            break
    return optimizer


def sft_on_teacher(cfg: Any, setup: Any, evaluator: Callable[[Any, int], dict[str, float]] | None = None,
                   progress: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Off-policy reference: cross-entropy on fresh teacher samples, with distill's budget and optimizer.

    Same prompts sampler, sequences per step (prompts_per_step x n), temperature, max_new_tokens, AdamW,
    warm-up + cosine schedule and gradient clipping as `distill`; `setup` comes from `distill.prepare`
    (the student is trained in place). Writes `metrics.jsonl` and `summary.json` into train.output_dir.
    """
    from minioprd.data import PromptSampler
    from minioprd.distill import lr_lambda
    from minioprd.files import append_jsonl, atomic_write_json
    from minioprd.rollout import rollout

    s = setup
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    params = [p for p in s.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    sampler = PromptSampler(len(s.prompts), seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                            lengths=[len(p) for p in s.prompts] if cfg.rollout.sort_by_length else None,
                            group=cfg.rollout.prompts_per_step)
    pad = s.tokenizer.pad_token_id

    def run_eval(step: int) -> dict[str, float]:
        if evaluator is None or not cfg.train.eval_every:
            return {}
        figures = {f"eval/{k}": v for k, v in evaluator(s, step).items()}
        s.student.train()
        return figures

    initial = run_eval(0)
    if initial:
        append_jsonl(out / "metrics.jsonl", {"step": 0, **initial})
    t_start = time.time()
    s.student.train()
    last: dict[str, Any] = {}
    for step in range(1, cfg.train.steps + 1):
        t0 = time.time()
        idx = sampler.next_batch(cfg.rollout.prompts_per_step)
        torch.manual_seed(cfg.train.seed * 1_000_003 + step)
        ro = rollout(s.teacher, s.tokenizer, [s.prompts[i] for i in idx], n=cfg.rollout.n,
                     temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                     max_new_tokens=cfg.rollout.max_new_tokens)
        prompts = [s.prompts[i] for i in idx for _ in range(cfg.rollout.n)]
        responses = [row[m].tolist() for row, m in zip(ro.responses.cpu(), ro.response_mask.cpu())]
        loss = ce_loss(s.student, ce_batch(prompts, responses, pad, s.device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip if cfg.train.grad_clip > 0
                                                   else float("inf"))
        if math.isfinite(float(loss.detach())) and bool(torch.isfinite(grad_norm)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        last = {"step": step, "loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr_now,
                "response_len": float(ro.response_mask.sum()) / ro.input_ids.shape[0],
                "step_s": time.time() - t0, "elapsed_s": time.time() - t_start}
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            last.update(run_eval(step))
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            append_jsonl(out / "metrics.jsonl", last)
        if progress is not None:
            progress(step, last)
    summary = {"steps": cfg.train.steps, "seconds": time.time() - t_start, "objective": "sft_teacher",
               "last": {k: last.get(k) for k in ("loss", "response_len")}}
    atomic_write_json(out / "summary.json", summary)
    return summary
