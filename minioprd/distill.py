"""On-Policy Representation Distillation (OPRD, arXiv 2606.06021), one readable loop.

Each optimizer step:
  1. rollout   - the student (LoRA active) samples `n` responses for each of `prompts_per_step` prompts
                 with HF generate and its KV cache;
  2. targets   - the frozen teacher reads the same tokens; hooks keep only the mapped layers at the
                 loss positions (no teacher logits, no LM head);
  3. loss      - the student re-reads the tokens with gradients; per mapped layer the student state
                 (through a width projection when the widths differ) is compared with the teacher's on
                 the response positions (paper Eq. 6 and variants, `losses.py`), mean over layers;
  4. step      - backward (accumulated over micro-batches; on a scaled loss when the student computes in
                 fp16), clip, AdamW, warm-up + cosine schedule;
  5. log       - one `metrics.jsonl` line, the progress bar, checkpoints.
Under `accelerate launch` (or `minioprd distill --num-processes N`) the same loop runs data-parallel: each
process rolls out its share of the step's prompts, gradients are summed across processes before step 4, and
process 0 writes everything (parallel.py).
The result is a PEFT adapter in `output_dir/adapter/` (plus `projections.safetensors` when widths differ).

    from minioprd.config import load_config
    from minioprd.distill import distill
    distill(load_config("recipes/tiny-cpu.yaml", {"train.steps": 20}))
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from minioprd.capture import capture_hidden, num_layers
from minioprd.checkpoint import (Interrupts, final_dir, open_run, prune, resume_run, run_identity, save_adapter,
                                 save_checkpoint, save_weights)
from minioprd.config import Config, to_yaml
from minioprd.errors import MinioprdError
from minioprd.files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from minioprd.fit import fit_to_card
from minioprd.layers import position_mask, state_window
from minioprd.objective import config_note
from minioprd.objective import resolve as resolve_objective
from minioprd.parallel import Parallel, check_launch, launched_world, row_seeds
from minioprd.prepare import Setup, check_before_loading, prepare
from minioprd.projections import fit_projections
from minioprd.rollout import Rollout, rollout, rollout_options

# fp16 loss scaling (train.fp16_loss_scale): OPRD's per-element gradients are ~1/(tokens x width x layers) of
# the loss, below fp16's smallest subnormal (6e-8) at real shapes, so unscaled they flush to zero in backward.
LOSS_SCALE_INIT = 2.0**16
LOSS_SCALE_GROWTH_STEPS = 100


@dataclass
class RunState:
    """What a run carries from one step to the next; a checkpoint saves it (trainer_state.json `counters`)."""

    step: int = 0  # the last finished step
    loss_scale: float = 1.0  # fp16 loss scaling: the backward's loss multiplier (1 = off)
    loss_scale_clean: int = 0  # clean steps since the scale last changed (it doubles after 100)
    overflow_steps: int = 0  # fp16 overflows: step skipped, scale halved
    nonfinite_in_row: int = 0  # steps skipped for a non-finite loss or gradient; 3 in a row stop the run
    nonfinite_total: int = 0
    collapse_warnings: int = 0  # steps whose rollouts looked collapsed (the warning repeats every 10th)
    best: float | None = None  # eval.keep_best: the best checkpoint-picking metric so far, and its step
    best_step: int | None = None
    elapsed_before: float = 0.0  # seconds spent in earlier sessions of this run (resume)
    started: float = field(default_factory=time.time, repr=False)  # this session's start: not saved

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def counters(self) -> dict[str, Any]:
        """The saved form: every field but `step` (saved beside it) and `started`, elapsed time up to now."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("step", "started")}
        return {**out, "elapsed_before": self.elapsed()}

    def restore(self, step: int, counters: dict[str, Any]) -> None:
        self.step = step
        for f in fields(self):
            if f.name in counters and f.name not in ("step", "started"):
                setattr(self, f.name, counters[f.name])


@dataclass
class Optimization:
    """AdamW over the trained weights (LoRA, plus the projections at their own rate), the warm-up + cosine
    schedule, and the seeded prompt sampler: the state a checkpoint restores beside the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any  # data.PromptSampler
    trained: list[torch.Tensor]  # every parameter the optimizer updates (gradient clipping runs over them)
    parallel: Parallel = field(default_factory=Parallel)

    @classmethod
    def for_run(cls, s: Setup) -> Optimization:
        from minioprd.data import PromptSampler

        cfg = s.cfg
        params = [p for p in s.student.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": cfg.train.lr}]
        if len(s.projections):
            groups.append({"params": list(s.projections.parameters()),
                           "lr": cfg.train.projection_lr or cfg.train.lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        return cls(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)),
                   PromptSampler(len(s.prompts), seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                                 lengths=[len(p) for p in s.prompts] if cfg.rollout.sort_by_length else None,
                                 group=cfg.rollout.prompts_per_step),
                   params + list(s.projections.parameters()), s.parallel)

    def step(self, state: RunState, loss: float, grad_clip: float) -> tuple[float, float]:
        """Unscale, clip, AdamW (skipped when the loss or gradient is not finite), schedule; returns (gradient
        norm, the learning rate used). Across processes the gradients are summed first (every trained tensor,
        projections included), so every process takes the same step."""
        self.parallel.sum_gradients(self.trained)
        scale = state.loss_scale
        if scale != 1.0:
            for p in self.trained:
                if p.grad is not None:
                    p.grad.div_(scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, grad_clip if grad_clip > 0 else float("inf"))
        finite_loss, finite_grad = math.isfinite(loss), bool(torch.isfinite(grad_norm))
        if finite_loss and finite_grad:
            self.optimizer.step()
            state.nonfinite_in_row = 0
            if scale != 1.0:  # fp16 loss scaling: grow again after a run of clean steps
                state.loss_scale_clean += 1
                if state.loss_scale_clean >= LOSS_SCALE_GROWTH_STEPS:
                    state.loss_scale, state.loss_scale_clean = scale * 2, 0
        elif finite_loss and scale > 1.0:  # the scaled gradient overflowed fp16: skip, retry at half the scale
            state.loss_scale, state.loss_scale_clean = scale / 2, 0
            state.overflow_steps += 1
        else:  # skip the update: one bad sample must not poison the adapter
            state.nonfinite_in_row += 1
            state.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr_now = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # the schedule follows steps, skipped ones too (torch warns if step 1 was)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return float(grad_norm), lr_now


def distill(cfg: Config, console: Any = None, force: bool = False, setup: Setup | None = None,
            evaluator: Callable[[Setup, int], dict[str, float]] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run OPRD as configured; returns a summary (also written to output_dir/summary.json).

    `setup` (from `prepare(cfg)`) lets a notebook reuse loaded models; it is trained in place.
    `evaluator(setup, step)` is called before the first step and every `train.eval_every` steps; its figures
    go into that step's metrics line as `eval/<name>` (step 0 gets a line of its own).
    `resume` continues from the output dir's last checkpoint (running the same config again does too).
    """
    out = Path(cfg.train.output_dir)
    check_launch(cfg, launched_world())  # a multi-process launch that cannot work, before anything else
    check_before_loading(cfg, evaluator)  # every configuration problem, before any weights load
    parallel = setup.parallel if setup is not None else \
        Parallel.start(cpu=cfg.model.device == "cpu" or not torch.cuda.is_available())
    log = _printer(console if parallel.main else None)  # process 0 speaks (and writes) for all
    if setup is None:
        fit_to_card(cfg, log)  # before comparing with the run dir's config.yaml, which holds the fitted values
    ckpt, finished = parallel.decide(lambda: open_run(out, cfg, force, resume, log))
    if finished:
        log(f"the run in {out} is already complete (summary.json); use --force to run it again")
        return json.loads((out / "summary.json").read_text())
    if setup is None and parallel.world > 1:  # builtin models are built once, by process 0, before any process loads
        from minioprd.models import resolve_model

        if parallel.main:
            resolve_model(cfg.model.teacher, "teacher"), resolve_model(cfg.model.student, "student")
        parallel.barrier()
    s = setup or prepare(cfg, log)
    s.parallel = parallel
    if parallel.main:
        out.mkdir(parents=True, exist_ok=True)
    # loss.objective=auto: process 0 measures at step 0 and writes objective.json; the others then read it
    objective = resolve_objective(s, out, log) if parallel.main else None
    parallel.barrier()
    objective = objective or resolve_objective(s, out, log)
    cfg = s.cfg
    if parallel.main:
        atomic_write_text(out / "config.yaml", config_note(objective) + to_yaml(cfg))
    opt = Optimization.for_run(s)
    state = RunState(loss_scale=LOSS_SCALE_INIT if s.dtype == torch.float16 and cfg.train.fp16_loss_scale else 1.0)
    if ckpt is not None:
        trainer = resume_run(ckpt, out, s, opt.optimizer, opt.scheduler, opt.sampler, write=parallel.main)
        state.restore(trainer["step"], trainer["counters"])
        log(f"resuming from {ckpt} (step {state.step} of {cfg.train.steps})"
            + (f" on {parallel.world} processes" if parallel.world > 1 else ""))
    else:
        _start(s, out, log)
    parallel.broadcast_parameters(opt.trained)  # every process starts from process 0's weights, as DDP does
    s.student.train()
    if cfg.train.eval_every:
        evaluator = evaluator or default_evaluator(s)

    def save(step: int) -> Path:
        path = out / "checkpoints" / f"step-{step:06d}"
        if parallel.main:
            save_checkpoint(path, lambda d: save_weights(s, d), opt.optimizer, opt.scheduler,
                            {"step": step, "sampler": opt.sampler.state_dict(), "counters": state.counters(),
                             "run": run_identity(cfg), "processes": parallel.world})
            prune(out, cfg.train.keep_checkpoints)
        parallel.barrier()  # no process leaves (and so ends the launch) before the checkpoint is whole
        return path

    from minioprd.loggers import Trackers

    trackers = Trackers(list(cfg.train.report_to) if parallel.main else [], out, cfg.to_dict())
    state.started = time.time()
    initial = run_evaluator(s, evaluator, state, 0) if state.step == 0 and cfg.train.eval_every else {}
    if initial and parallel.main:  # the student before any update
        _log_line(out, trackers, {"step": 0, **initial})
    progress = _progress(console if parallel.main else None, cfg.train.steps, state.step)
    try:
        with Interrupts(log if progress is None else progress.console.print) as interrupts:
            for step in range(state.step + 1, cfg.train.steps + 1):
                try:
                    record = train_step(s, opt, state, step)  # 1-4: rollout, teacher targets, loss, step
                except torch.cuda.OutOfMemoryError:
                    opt.optimizer.zero_grad(set_to_none=True)
                    raise _out_of_memory(step, save(step - 1) if step > 1 else None, out) from None
                state.step = step
                record["elapsed_s"] = state.elapsed()
                if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                    record.update(run_evaluator(s, evaluator, state, step))
                    if record.get("eval/repetition", 0.0) > cfg.train.collapse_repetition:
                        record["collapse_warning"] = True
                if parallel.main and (step % cfg.train.log_every == 0 or step == cfg.train.steps):  # 5: log
                    _log_line(out, trackers, record)
                _show(progress, record, state)
                if state.nonfinite_in_row >= 3:  # the weights are those of the last good step: bad ones were skipped
                    raise MinioprdError(f"the loss or gradient was not finite for 3 steps in a row (step {step}); "
                                        f"the last good state is saved in {save(step)}: lower train.lr, keep "
                                        f"train.grad_clip on, or use loss.kind=scale_mse")
                if parallel.any(interrupts.requested is not None):  # a signal may reach the processes apart
                    interrupts.requested = interrupts.requested or "a signal to another process"
                    raise MinioprdError(f"stopped by {interrupts.requested} after step {step}; checkpoint saved in "
                                        f"{save(step)}: continue with `minioprd distill --resume {out}`")
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                    save(step)
    finally:
        trackers.close()
        if progress is not None:
            progress.stop()
    return _finish(s, state, ckpt, objective, log)


def train_step(s: Setup, opt: Optimization, state: RunState, step: int) -> dict[str, Any]:
    """rollout -> teacher targets -> loss -> (skipped if not finite) step; returns the step's metrics line."""
    cfg = s.cfg
    t0 = time.time()
    pl = s.parallel
    idx = opt.sampler.next_batch(cfg.rollout.prompts_per_step)  # the global batch: the same on every process
    lo, hi = pl.shard(len(idx))  # this process's share of it
    ro = sample(s, [s.prompts[i] for i in idx[lo:hi]], step, first_row=lo * cfg.rollout.n)  # 1. rollout
    t1 = _clock(s.device)
    scale = state.loss_scale
    figures = update_step(s, ro, scale)  # 2. teacher targets, 3. loss and its gradient (this process's share)
    layers = len(figures["layer_cos"])
    # the step's figures over every process: loss terms are already weighted by global shares, so they add up
    loss, loss_rep, loss_opd, *per_layer = pl.total([figures["loss"], figures["loss_rep"], figures["loss_opd"],
                                                     *figures["layer_cos"], *figures["layer_loss"]])
    grad_norm, lr_now = opt.step(state, loss, cfg.train.grad_clip)  # 4. step (gradients summed over processes)
    t2 = _clock(s.device)
    from minioprd.alignment import repetition_rate

    rows, gen_tokens = ro.input_ids.shape[0], int(ro.response_mask.sum())
    responses = [row[m].tolist() for row, m in zip(ro.responses, ro.response_mask)]
    ended = int((ro.response_mask.sum(1) < ro.response_mask.shape[1]).sum())
    # per process: rows, tokens, ended rows, distinct x rows, looping x rows, tokens/s; rollout/teacher/update/step s
    each = pl.gathered([rows, gen_tokens, ended, distinct_ratio(ro) * rows, repetition_rate(responses) * rows,
                        gen_tokens / max(t1 - t0, 1e-9), t1 - t0, figures["teacher_s"], t2 - t1 - figures["teacher_s"],
                        t2 - t0])
    (rows, gen_tokens, ended, distinct, looping, tokens_per_s), slowest = each[:, :6].sum(0).tolist(), \
        each[:, 6:].max(0).values.tolist()
    distinct, looping = distinct / rows, looping / rows
    layer_cos, layer_loss = per_layer[:layers], per_layer[layers:]
    return {
        "step": step, "loss": loss, "loss_rep": loss_rep, "loss_opd": loss_opd,
        "cos": sum(layer_cos) / len(layer_cos) if layer_cos else None, "cos_last": layer_cos[-1] if layer_cos else None,
        "layer_cos": [round(c, 5) for c in layer_cos], "layer_loss": [round(v, 6) for v in layer_loss],
        "response_len": gen_tokens / rows, "eos_frac": ended / rows, "distinct": distinct, "repetition": looping,
        "collapse_warning": distinct < cfg.train.collapse_threshold or looping > cfg.train.collapse_repetition,
        "lr": lr_now, "grad_norm": grad_norm, "nonfinite_steps": state.nonfinite_total,
        **({"loss_scale": scale} if scale != 1.0 else {}), **({"processes": pl.world} if pl.world > 1 else {}),
        # tokens/s summed over processes; times are the slowest process's (the others wait for it)
        "tokens_per_s": tokens_per_s, "rollout_s": slowest[0], "teacher_s": slowest[1], "update_s": slowest[2],
        "step_s": slowest[3],
    }


def sample(s: Setup, prompts: list[list[int]], step: int, first_row: int = 0) -> Rollout:
    """The student's on-policy rollouts for `prompts`, reproducible step by step (and on resume): each response
    row samples from a stream seeded by the step and its place in the step's global batch (`first_row` is this
    process's first), so sharding the batch across processes does not change what a prompt samples."""
    cfg = s.cfg
    torch.manual_seed(cfg.train.seed * 1_000_003 + step)
    merge = cfg.rollout.merge_lora and cfg.lora.r > 0 and cfg.model.student_quant == "none"
    if merge:  # one matmul per layer instead of three while generating
        s.student.merge_adapter()
    try:
        return rollout(s.student, s.tokenizer, prompts, n=cfg.rollout.n, temperature=cfg.rollout.temperature,
                       top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                       seeds=row_seeds(cfg.train.seed, step, first_row, len(prompts) * cfg.rollout.n),
                       **rollout_options(cfg.rollout, s.device))
    finally:
        if merge:
            s.student.unmerge_adapter()


def update_step(s: Setup, ro: Rollout, loss_scale: float = 1.0) -> dict[str, Any]:
    """Teacher targets, student forward, loss and backward over micro-batches; returns loss figures.

    objective=oprd: coef * L_OPRD. An OPD objective: L_OPD + mu * L_OPRD (paper Eq. 7); both terms come from
    one teacher forward and one student forward over the union of the columns they need. Gradients are of
    `loss_scale` times the loss (fp16 loss scaling; the caller divides them back); the figures are unscaled.
    """
    from minioprd.losses import OPD_LOSSES, layer_cosines, representation_loss

    cfg, lc = s.cfg, s.cfg.loss
    need_rep, need_opd = lc.has_representation_term(), lc.objective != "oprd"
    rep_weight = lc.coef if lc.objective == "oprd" else lc.mu
    B = ro.input_ids.shape[0]
    mb = cfg.rollout.micro_batch or B
    selected = position_mask(ro.response_mask, lc.positions, lc.k) if need_rep else ro.response_mask  # (B, R)
    # shares of the global batch (all processes' rows and selected tokens), so the summed gradients are one batch's
    B_all, total_sel = (int(v) for v in s.parallel.total([B, int(selected.sum())]))
    total_sel = max(1, total_sel)
    L_S, L_T = num_layers(s.student), num_layers(s.teacher)
    s_layers = sorted(({l for l, _ in s.pairs} if need_rep else set()) | ({L_S} if need_opd else set()))
    t_layers = sorted(({t for _, t in s.pairs} if need_rep else set()) | ({L_T} if need_opd else set()))
    projections = list(s.bridge.student_projections) if s.bridge is not None else \
        list(s.projections) if len(s.projections) else None
    vocab = min(s.student.get_output_embeddings().weight.shape[0], s.teacher.get_output_embeddings().weight.shape[0])
    n = len(s.pairs)
    sums = {"loss": 0.0, "loss_rep": 0.0, "loss_opd": 0.0}
    per_layer, cos = torch.zeros(n), torch.zeros(n)
    teacher_s = 0.0
    for i in range(0, B, mb):
        part = ro.select(slice(i, i + mb))
        sel, valid = selected[i:i + mb], part.response_mask
        if not sel.any():
            continue
        rep_win = state_window(part.prompt_len, sel, lc.convention) if need_rep else None
        opd_win = state_window(part.prompt_len, valid, "predict") if need_opd else None
        windows = [w for w in (rep_win, opd_win) if w is not None]
        start, stop = min(w.start for w in windows), max(w.stop for w in windows)
        pos = part.position_ids()
        rep_mask = rep_win.mask if need_rep else None
        t_start = _clock(s.teacher_device)
        with torch.no_grad():
            if s.cross is None:
                got = capture_hidden(s.teacher, part.input_ids.to(s.teacher_device), part.attention_mask.to(
                    s.teacher_device), pos.to(s.teacher_device), t_layers, start, stop)
            else:  # the teacher's own tokens, gathered at the student's window columns; unaligned ones masked
                got, rep_mask = s.cross.teacher_states(s.teacher, part, t_layers, rep_win, lc.convention,
                                                       device=s.teacher_device)
            teacher = {l: h.to(s.device, s.dtype) for l, h in zip(t_layers, got)}  # (b, W, D_T) each
        teacher_s += _clock(s.teacher_device) - t_start
        got = capture_hidden(s.student, part.input_ids, part.attention_mask, pos, s_layers, start, stop)
        student = {l: h.float() for l, h in zip(s_layers, got)}  # (b, W, D_S); fp32 into projections and loss

        def cut(h: torch.Tensor, w: Any) -> torch.Tensor:
            return h[:, w.start - start:w.stop - start]

        loss = torch.zeros((), device=s.device)
        if need_rep:
            states = [cut(student[l], rep_win) for l, _ in s.pairs]
            targets = [cut(teacher[t], rep_win) for _, t in s.pairs]
            if s.bridge is not None:  # (h_T - mu_T) P_T^T: the teacher in the bridge's r-dim subspace
                targets = s.bridge.teacher_transform(targets)
            rep, layer_losses = representation_loss(states, targets, rep_mask, kind=lc.kind,
                                                    reduction=lc.reduction, projections=projections)
            loss = loss + rep_weight * rep
        if need_opd:
            c0 = opd_win.start - part.prompt_len + 1  # the state at column P-1+j predicts response token j
            tokens = part.responses[:, c0:c0 + opd_win.mask.shape[1]]
            opd = OPD_LOSSES[lc.objective](cut(student[L_S], opd_win), cut(teacher[L_T], opd_win), tokens,
                                           opd_win.mask, _head(s.student, s.device), _head(s.teacher, s.device),
                                           vocab_size=vocab, k=lc.topk, chunk_size=lc.opd_chunk,
                                           temperature=cfg.rollout.temperature or 1.0)
            loss = loss + opd
        # Weight micro-batches so the accumulated gradient equals the full-batch loss's.
        share = (part.input_ids.shape[0] / B_all) if (lc.reduction == "sequence" and not need_opd) \
            else int(sel.sum()) / total_sel
        (loss * (share * loss_scale)).backward()
        sums["loss"] += float(loss.detach()) * share
        if need_rep:
            sums["loss_rep"] += float(rep.detach()) * share
            per_layer += layer_losses.float().cpu() * share
            cos += layer_cosines(states, targets, rep_mask, projections).float().cpu() * share
        if need_opd:
            sums["loss_opd"] += float(opd.detach()) * share
    return {**sums, "layer_loss": per_layer.tolist() if need_rep else [],
            "layer_cos": cos.tolist() if need_rep else [], "teacher_s": teacher_s}


def default_evaluator(s: Setup) -> Callable[[Setup, int], dict[str, float]]:
    """Task accuracy (when the held-out prompts have answers) and alignment to the teacher, on a loaded model."""
    from minioprd.alignment import alignment_report
    from minioprd.data import render_prompts, tokenize_prompts
    from minioprd.evaluate import evaluate_task, prepare_task

    cfg = s.cfg
    with_answers = [e for e in s.eval_examples if e.answer is not None]
    task = prepare_task(s.tokenizer, with_answers, prompt_suffix=cfg.data.prompt_suffix,
                        prompt_template=cfg.data.prompt_template, chat_template=cfg.data.chat_template,
                        max_prompt_tokens=cfg.data.max_prompt_tokens) if cfg.eval.task and with_answers else None
    texts = render_prompts(s.tokenizer, s.eval_examples, template=cfg.data.prompt_template,
                           suffix=cfg.data.prompt_suffix, chat_template=cfg.data.chat_template)
    prompts, _, _ = tokenize_prompts(s.tokenizer, texts, cfg.data.max_prompt_tokens, "truncate")
    if s.cross is not None and prompts:  # the teacher reads the held-out prompts in its own chat template too
        from minioprd.cross_tokenizer import prompt_table, teacher_prompts

        s.cross.prompts.update(prompt_table(prompts, teacher_prompts(
            s.cross.teacher_tok, s.eval_examples, template=cfg.data.prompt_template, suffix=cfg.data.prompt_suffix,
            chat_template=cfg.data.chat_template)))

    def evaluate(s: Setup, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if task is not None:
            m = evaluate_task(s.student, s.tokenizer, task, k=1, greedy=True, max_new_tokens=cfg.eval.max_new_tokens,
                              batch_size=cfg.eval.batch_size, seed=cfg.train.seed)
            out.update({"accuracy": m["avg@1"], "no_answer": m["no_answer"], "mean_length": m["mean_length"]})
        if cfg.eval.alignment:
            with torch.random.fork_rng(devices=[]):  # the report seeds its own rollouts
                a = alignment_report(s.student, s.teacher, s.tokenizer, prompts, s.pairs,
                                     None if s.bridge is not None else list(s.projections) or None,
                                     max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                     seed=cfg.train.seed, cross=s.cross, bridge=s.bridge)
            out.update({k: a[k] for k in ("kl", "cos_mean", "cos_last", "aligned_frac", "distinct_4", "repetition")
                        if a.get(k) is not None})
        return out

    return evaluate


def best_metric(cfg: Config, figures: dict[str, float]) -> tuple[str, float, bool] | None:
    """(name, value, higher_is_better) of the checkpoint-picking metric in an eval's figures, if present."""
    keys = {"accuracy": "eval/accuracy", "kl": "eval/kl", "cos": "eval/cos_mean"}
    name = cfg.eval.metric
    if name == "auto":  # the first one present: no answers -> kl; no KL (tokenizers differ) -> cos
        name = next((n for n, k in keys.items() if figures.get(k) is not None), "kl")
    key = keys[name]
    if figures.get(key) is None:
        return None
    return key, float(figures[key]), name != "kl"


def lr_lambda(cfg: Config):
    total, warm = cfg.train.steps, math.ceil(cfg.train.warmup_ratio * cfg.train.steps)
    floor = cfg.train.min_lr_ratio

    def f(step: int) -> float:  # linear warm-up, then cosine from 1 to `floor`
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def distinct_ratio(ro: Rollout) -> float:
    """Mean over responses of unique tokens / tokens: falls towards 0 when rollouts collapse into repetition."""
    vals = []
    for row, m in zip(ro.responses, ro.response_mask):
        toks = row[m].tolist()
        if toks:
            vals.append(len(set(toks)) / len(toks))
    return sum(vals) / max(1, len(vals))


def _head(model: Any, device: torch.device) -> Any:
    """The LM head as a callable on (N, D) rows, in the head's dtype/device, returning logits on `device`."""
    head = model.get_output_embeddings()
    w = head.weight
    return lambda h: head(h.to(w.device, w.dtype)).to(device)


def _clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def _printer(console: Any) -> Callable[[str], None]:
    if console is None:
        return lambda m: None
    return lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True)


def _start(s: Setup, out: Path, log: Callable[[str], None]) -> None:
    """A fresh run: no metrics lines from an earlier one; projections at their least-squares fit if asked (every
    process fits the same, from the same seeded rollouts)."""
    if s.parallel.main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if len(s.projections) and s.bridge is None and s.cfg.loss.projection_init == "lstsq":
        if s.cross is None:
            fit_projections(s, log)
        else:
            log("note: loss.projection_init=lstsq needs a shared tokenizer; the projections start random")


def run_evaluator(s: Setup, evaluator: Callable[[Setup, int], dict[str, float]], state: RunState,
                  step: int) -> dict[str, float]:
    """`evaluator`'s figures as `eval/<name>`; a new best by eval.metric is kept in output_dir/best (eval.keep_best)."""
    was_training = s.student.training
    figures = {f"eval/{k}": v for k, v in evaluator(s, step).items()}
    s.student.train(was_training)
    best = best_metric(s.cfg, figures)
    if best is not None and s.cfg.eval.keep_best and step > 0:  # every process evaluates the same weights
        key, value, higher = best
        if state.best is None or (value > state.best if higher else value < state.best):
            state.best, state.best_step = value, step
            out = Path(s.cfg.train.output_dir) / "best"
            if s.parallel.main:
                save_adapter(s, out)
                atomic_write_json(out / "best.json", {"step": step, "metric": key, "value": value})
    return figures


def _log_line(out: Path, trackers: Any, record: dict[str, Any]) -> None:
    append_jsonl(out / "metrics.jsonl", record)
    trackers.log(record)


def _show(progress: Any, record: dict[str, Any], state: RunState) -> None:
    """The progress bar's figures, and a collapse warning on the 1st, 11th, 21st, ... collapsed step."""
    if record["collapse_warning"]:
        state.collapse_warnings += 1
    if progress is None:
        return
    if record["collapse_warning"] and state.collapse_warnings % 10 == 1:
        progress.console.print(
            f"[yellow]warning:[/yellow] step {record['step']}: the student is repeating itself (distinct-token "
            f"ratio {record['distinct']:.2f}, looping answers {record['repetition']:.0%}"
            + (f", in eval {record['eval/repetition']:.0%}" if "eval/repetition" in record else "")
            + "); lower train.lr, train fewer steps, or add an output-space term (loss.objective=opd_topk "
              "loss.mu=1)")
    progress.update(progress.task_ids[0], advance=1,
                    figures=f"loss {record['loss']:.4g} cos {record['cos'] or 0:.3f} "
                            f"len {record['response_len']:.0f} {record['tokens_per_s']:.0f} tok/s")


def _out_of_memory(step: int, saved: Path | None, out: Path) -> MinioprdError:
    return MinioprdError(
        f"out of GPU memory at step {step}" + (f" (state before it saved in {saved}; resume with --resume {out})"
                                               if saved else "")
        + ": lower rollout.max_new_tokens or rollout.prompts_per_step, set rollout.micro_batch, turn on "
          "lora.gradient_checkpointing, use loss.positions=last_k, or model.student_quant=4bit")


def _finish(s: Setup, state: RunState, ckpt: Path | None, objective: Any,
            log: Callable[[str], None]) -> dict[str, Any]:
    """The final adapter, summary.json, metrics.png and the closing line; returns the summary."""
    cfg, out = s.cfg, Path(s.cfg.train.output_dir)
    if not s.parallel.main:  # process 0 writes the results; the others wait until they are whole
        s.parallel.barrier()
        return {"steps": cfg.train.steps, "adapter": str(final_dir(s)), "process": s.parallel.rank}
    save_adapter(s, final_dir(s))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) >= 1]
    total = state.elapsed()
    keys = ("loss", "cos", "response_len", "distinct")
    summary = {
        "steps": cfg.train.steps, "seconds": total, "seconds_per_step": total / cfg.train.steps,
        "first": {k: rows[0].get(k) for k in keys} if rows else {},
        "last": {k: rows[-1].get(k) for k in keys} if rows else {},
        "nonfinite_steps": state.nonfinite_total, "fp16_overflow_steps": state.overflow_steps,
        "skipped_prompts": s.skipped_prompts, "objective": objective.to_dict(),
        "adapter": str(final_dir(s)), "resumed_from": str(ckpt) if ckpt else None,
    }
    atomic_write_json(out / "summary.json", summary)
    _plot(out)
    cos = "" if not rows or rows[0].get("cos") is None else \
        f", cos {summary['first']['cos']:.3f} -> {summary['last']['cos']:.3f}"
    log(f"done: {cfg.train.steps} steps in {summary['seconds']:.1f}s ({summary['seconds_per_step']:.2f} s/step)"
        + (f"; loss {summary['first']['loss']:.4g} -> {summary['last']['loss']:.4g}" if rows else "")
        + f"{cos}; saved in {final_dir(s)}" + (f" ({s.parallel.world} processes)" if s.parallel.world > 1 else ""))
    s.parallel.barrier()
    return summary


def _progress(console: Any, total: int, done: int = 0) -> Any:
    if console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    p = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[figures]}"),
                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    p.add_task("distill", total=total, completed=done, figures="")
    p.start()
    return p


def _plot(out: Path) -> None:
    """metrics.png: loss, cosine, response length, distinct ratio over steps (needs matplotlib)."""
    from minioprd.report import plot_metrics

    plot_metrics(out / "metrics.jsonl", out / "metrics.png")
