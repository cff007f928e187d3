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
The result is a PEFT adapter in `output_dir/adapter/` (plus `projections.safetensors` when widths differ).

    from minioprd.config import load_config
    from minioprd.distill import distill
    distill(load_config("recipes/tiny-cpu.yaml", {"train.steps": 20}))
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from minioprd import __version__
from minioprd.capture import capture_hidden, num_layers
from minioprd.config import Config, to_yaml
from minioprd.errors import MinioprdError
from minioprd.files import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, read_jsonl
from minioprd.fit import fit_to_card
from minioprd.layers import layer_map, position_mask, state_window
from minioprd.projections import fit_projections, new_projections
from minioprd.rollout import Rollout, rollout, rollout_options


@dataclass
class Setup:
    """Everything `distill` loads before the first step."""

    cfg: Config
    device: torch.device
    teacher_device: torch.device
    dtype: torch.dtype
    student: Any  # PeftModel
    teacher: Any
    tokenizer: Any
    prompts: list[list[int]]  # token ids of the usable prompts
    pairs: list[tuple[int, int]]  # (student layer, teacher layer), hidden_states indices
    projections: nn.ModuleList  # one bias-free Linear(d_S -> d_T) per pair, empty when widths match
    notes: list[str] = field(default_factory=list)
    bridge: Any = None  # bridge.Bridge: frozen r-dim subspace (loss.bridge), None = compare raw states
    cross: Any = None  # cross_tokenizer.CrossTokenizer when the tokenizers differ: the teacher reads the text
    skipped_prompts: int = 0
    eval_examples: list[Any] = field(default_factory=list)  # held-out examples for the in-loop evaluation


def _model_shape(path: str) -> tuple[int, int]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    c = getattr(c, "text_config", c)
    return c.num_hidden_layers, c.hidden_size


def plan_layers(cfg: Config) -> tuple[list[tuple[int, int]], tuple[int, int], tuple[int, int], list[str]]:
    """Resolve both models' depths/widths from their configs (no weights) and build the layer map."""
    from minioprd.models import resolve_model

    t, s = resolve_model(cfg.model.teacher, "teacher"), resolve_model(cfg.model.student, "student")
    try:
        t_shape, s_shape = _model_shape(t.path), _model_shape(s.path)
    except (OSError, ValueError) as e:
        raise MinioprdError(f"could not read a model config: {str(e).splitlines()[0]}") from None
    pairs = layer_map(cfg.loss.layers, s_shape[0], t_shape[0], cfg.loss.teacher_layers)
    return pairs, s_shape, t_shape, [t.note, s.note]


def describe(cfg: Config, console: Any) -> None:
    """--dry-run: the resolved config and the layer map, without loading any weights."""
    pairs, (ls, ds), (lt, dt), notes = plan_layers(cfg)
    console.print(to_yaml(cfg), markup=False, highlight=False)
    for n in notes:
        console.print(f"# {n}", markup=False, highlight=False)
    console.print(f"# student: {ls} layers x {ds} wide; teacher: {lt} layers x {dt} wide", markup=False)
    console.print("# layer_map (student -> teacher, hidden_states index): "
                  + ", ".join(f"{a}->{b}" for a, b in pairs), markup=False, highlight=False)
    console.print(f"# projections: {'none (same width)' if ds == dt else f'{len(pairs)} x Linear({ds}->{dt})'}; "
                  f"positions: {cfg.loss.positions}"
                  f"{f' (k={cfg.loss.k})' if cfg.loss.positions.endswith('_k') else ''}, convention "
                  f"{cfg.loss.convention}", markup=False, highlight=False)
    from minioprd.objective import dry_run_line

    console.print(f"# {dry_run_line(cfg, (ls, ds), (lt, dt))}", markup=False, highlight=False)


def prepare(cfg: Config, log: Any = print) -> Setup:
    from minioprd.data import load_examples, render_prompts, tokenize_prompts
    from minioprd.models import (check_tokenizers, load_student, load_teacher, load_tokenizer, pick_device,
                                 pick_dtype, resolve_model, trainable_parameters)

    torch.set_num_threads(cfg.train.threads or max(1, os.cpu_count() or 1))
    fit_to_card(cfg, log)  # train.fit=auto: memory settings for this card, before any weights (no-op if done)
    device = pick_device(cfg.model.device)
    teacher_device = device if cfg.model.teacher_device == "same" else pick_device(cfg.model.teacher_device)
    dtype = pick_dtype(cfg.model.dtype, device)
    t_res, s_res = resolve_model(cfg.model.teacher, "teacher"), resolve_model(cfg.model.student, "student")
    log(t_res.note)
    log(s_res.note)
    trc = cfg.model.trust_remote_code
    tokenizer = load_tokenizer(s_res, "student", trc)
    teacher_tok = load_tokenizer(t_res, "teacher", trc)

    examples = load_examples(cfg.data.dataset, split=cfg.data.split, field=cfg.data.field,
                             max_rows=0)
    eval_examples = []
    if cfg.train.eval_every:
        if cfg.eval.dataset:
            eval_examples = load_examples(cfg.eval.dataset, split=cfg.eval.split, field=cfg.data.field)
        elif cfg.eval.holdout:  # held out from the training prompts: never pick checkpoints on a test set
            if len(examples) <= cfg.eval.holdout:
                raise MinioprdError(f"eval.holdout={cfg.eval.holdout} leaves no training prompts out of "
                                    f"{len(examples)}: lower it or name eval.dataset")
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
            held = set(order[: cfg.eval.holdout])
            eval_examples = [e for i, e in enumerate(examples) if i in held]
            examples = [e for i, e in enumerate(examples) if i not in held]
    use_chat = cfg.data.chat_template
    texts = render_prompts(tokenizer, examples, template=cfg.data.prompt_template, suffix=cfg.data.prompt_suffix,
                           chat_template=use_chat)
    prompts, kept, skipped = tokenize_prompts(tokenizer, texts, cfg.data.max_prompt_tokens, cfg.data.long_prompts)
    if cfg.data.max_prompts:
        prompts = prompts[: cfg.data.max_prompts]
    log(f"prompts: {len(prompts)} from {cfg.data.dataset}" + (f" ({skipped} longer than "
        f"{cfg.data.max_prompt_tokens} tokens skipped)" if skipped else ""))

    teacher = load_teacher(t_res, cfg.model.teacher_quant, teacher_device,
                           dtype=pick_dtype(cfg.model.dtype, teacher_device), trust_remote_code=trc, log=log)
    student = load_student(s_res, cfg.lora, cfg.model.student_quant, device, dtype, seed=cfg.train.seed,
                           trust_remote_code=trc)
    from minioprd.cross_tokenizer import CrossTokenizer, prompt_table, same_tokenizer, teacher_prompts
    from minioprd.rollout import eos_ids

    cross = None
    if same_tokenizer(tokenizer, teacher_tok):
        check_tokenizers(tokenizer, teacher_tok, teacher.get_input_embeddings().weight.shape[0])
    else:
        if cfg.loss.objective not in ("oprd", "auto"):
            raise MinioprdError(f"the teacher's tokenizer differs from the student's: loss.objective="
                                f"{cfg.loss.objective} compares next-token distributions and needs a shared "
                                f"vocabulary; use loss.objective=oprd (the teacher then reads the text)")
        t_prompts = teacher_prompts(teacher_tok, [examples[i] for i in kept[:len(prompts)]],
                                    template=cfg.data.prompt_template, suffix=cfg.data.prompt_suffix,
                                    chat_template=use_chat)
        cross = CrossTokenizer(tokenizer, teacher_tok, prompt_table(prompts, t_prompts),
                               student_eos=eos_ids(student, tokenizer), mode=cfg.loss.align)
        log(f"tokenizers differ: the teacher reads each rollout as text in its own tokens ({cfg.loss.align} "
            f"alignment, its own chat template)")
    n_train, n_total = trainable_parameters(student)
    log(f"student LoRA r={cfg.lora.r}: trainable params {n_train:,} of {n_total:,} "
        f"({100 * n_train / max(n_total, 1):.3f}%)")

    pairs = layer_map(cfg.loss.layers, num_layers(student), num_layers(teacher), cfg.loss.teacher_layers)
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    torch.manual_seed(cfg.train.seed)
    projections = nn.ModuleList()
    bridge = None
    if cfg.loss.bridge:
        from minioprd.bridge import load_bridge

        bridge = load_bridge(cfg.loss.bridge, cfg.model.student, cfg.model.teacher, pairs, student_hidden=d_s,
                             teacher_hidden=d_t, device=device, trainable=cfg.loss.bridge_trainable)
        if cfg.loss.bridge_trainable:
            projections = bridge.student_projections  # joins the optimizer's projection group
        log(f"bridge: {cfg.loss.bridge}, r={bridge.rank}, P_S "
            f"{'trained jointly' if cfg.loss.bridge_trainable else 'frozen'}")
    elif d_s != d_t and (cfg.loss.objective == "oprd" or cfg.loss.mu > 0):  # auto picks no OPRD term at other widths
        projections = new_projections(len(pairs), d_s, d_t, device)
        log(f"projections: {len(pairs)} x Linear({d_s}->{d_t}), {sum(p.numel() for p in projections.parameters()):,}"
            " trainable params")
    log("layer_map (student->teacher): " + ", ".join(f"{a}->{b}" for a, b in pairs))
    return Setup(cfg, device, teacher_device, dtype, student, teacher, tokenizer, prompts, pairs, projections,
                 skipped_prompts=skipped, eval_examples=eval_examples, bridge=bridge, cross=cross)


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


# fp16 loss scaling (train.fp16_loss_scale): OPRD's per-element gradients are ~1/(tokens x width x layers) of
# the loss, below fp16's smallest subnormal (6e-8) at real shapes, so unscaled they flush to zero in backward.
LOSS_SCALE_INIT = 2.0**16
LOSS_SCALE_GROWTH_STEPS = 100


def update_step(s: Setup, ro: Rollout, loss_scale: float = 1.0) -> dict[str, Any]:
    """Teacher targets, student forward, loss and backward over micro-batches; returns loss figures.

    objective=oprd: coef * L_OPRD. An OPD objective: L_OPD + mu * L_OPRD (paper Eq. 7); both terms come from
    one teacher forward and one student forward over the union of the columns they need. Gradients are of
    `loss_scale` times the loss (fp16 loss scaling; the caller divides them back); the figures are unscaled.
    """
    from minioprd.losses import OPD_LOSSES, layer_cosines, representation_loss

    cfg, lc = s.cfg, s.cfg.loss
    need_rep, need_opd = lc.objective == "oprd" or lc.mu > 0, lc.objective != "oprd"
    rep_weight = lc.coef if lc.objective == "oprd" else lc.mu
    B = ro.input_ids.shape[0]
    mb = cfg.rollout.micro_batch or B
    selected = position_mask(ro.response_mask, lc.positions, lc.k) if need_rep else ro.response_mask  # (B, R)
    total_sel = max(1, int(selected.sum()))
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
        share = (part.input_ids.shape[0] / B) if (lc.reduction == "sequence" and not need_opd) \
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


def _clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def final_dir(s: Setup) -> Path:
    """`adapter/` for a LoRA student, `model/` for a fully fine-tuned one."""
    return Path(s.cfg.train.output_dir) / ("adapter" if s.cfg.lora.r else "model")


def save_adapter(s: Setup, path: Path) -> None:
    """PEFT adapter (or the whole model when lora.r=0) + tokenizer + projections + minioprd.json, atomically."""
    with atomic_dir(path) as tmp:
        _save_weights(s, tmp)


def _save_weights(s: Setup, tmp: Path) -> None:
    from safetensors.torch import save_file

    from minioprd.models import resolve_model

    cfg = s.cfg
    s.student.save_pretrained(tmp)
    s.tokenizer.save_pretrained(tmp)
    if s.bridge is not None:
        s.bridge.save(tmp / "bridge")
    if len(s.projections):  # width projections, or a jointly trained bridge's P_S (so resume restores them)
        tensors = {f"s{a}_t{b}.weight": p.weight.detach().float().cpu().contiguous()
                   for (a, b), p in zip(s.pairs, s.projections)}
        save_file(tensors, str(tmp / "projections.safetensors"))
    atomic_write_json(tmp / "minioprd.json", {
        "format": 1, "minioprd_version": __version__, "student": cfg.model.student,
        "student_path": resolve_model(cfg.model.student, "student").path,
        "student_quant": cfg.model.student_quant, "teacher": cfg.model.teacher,
        "layer_map": [list(p) for p in s.pairs], "projections": bool(len(s.projections)) and s.bridge is None,
        "bridge": None if s.bridge is None else {"source": cfg.loss.bridge, "rank": s.bridge.rank,
                                                 "trainable": cfg.loss.bridge_trainable, "dir": "bridge"},
        "same_tokenizer": s.cross is None,
        "loss": cfg.loss.kind, "convention": cfg.loss.convention, "full_finetune": cfg.lora.r == 0,
    })


def _run_state(out: Path, cfg: Config, force: bool, resume: bool, log: Any) -> tuple[Path | None, bool]:
    """Decide what to do with an output dir: (checkpoint to resume from, already finished?).

    A new dir starts fresh. A dir holding a run is resumed from its last good checkpoint when `resume` is
    asked, or when the same command (identical config.yaml) is run again; `force` starts over; anything
    else is refused, so nothing written earlier is lost.
    """
    from minioprd.checkpoint import latest_valid

    for place in (out, *out.parents):  # the nearest existing path must be a directory we can write into
        if place.exists():
            if not place.is_dir():
                raise MinioprdError(f"--output-dir {str(out)!r}: {str(place)!r} is a file, not a directory: "
                                    f"pass a directory path (train.output_dir)")
            break
    held = (out / "metrics.jsonl").exists() or (out / "adapter").exists() or (out / "model").exists() \
        or (out / "checkpoints").exists()
    if not held:
        if resume:
            raise MinioprdError(f"nothing to resume in {str(out)!r}: it holds no run (start it without --resume)")
        return None, False
    if force:  # start over; the old adapter/ stays until the new one replaces it atomically
        for name in ("metrics.jsonl", "metrics.png", "summary.json", "objective.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return None, False
    from minioprd.objective import same_config

    same = (out / "config.yaml").is_file() and same_config((out / "config.yaml").read_text(), cfg, out)
    if not (resume or same):
        raise MinioprdError(f"output dir {str(out)!r} already holds a run with another config: pass a new "
                            f"--output-dir, --resume {out} to continue it, or --force to overwrite it")
    if (out / "summary.json").is_file() and same:
        return None, True
    ckpt = latest_valid(out, log)
    if ckpt is None:
        raise MinioprdError(f"the run in {str(out)!r} has no usable checkpoint to resume from (set "
                            f"train.save_every to write them): pass --force to start it over")
    return ckpt, False


class _Interrupts:
    """First Ctrl-C/SIGTERM: finish the current step, checkpoint, stop. Second: exit at once.

    Every file is written atomically, so even the immediate exit leaves the previous checkpoint whole.
    """

    def __init__(self, log: Any):
        self.requested, self.log, self.saved = None, log, {}

    def __enter__(self) -> "_Interrupts":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. not in a notebook worker)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested is not None:
            os._exit(130)  # second signal: no cleanup; files on disk are whole by construction
        self.requested = signal.Signals(signum).name
        self.log(f"{self.requested}: finishing this step, then saving a checkpoint (press again to quit now)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def distill(cfg: Config, console: Any = None, force: bool = False, setup: Setup | None = None,
            evaluator: Callable[[Setup, int], dict[str, float]] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run OPRD as configured; returns a summary (also written to output_dir/summary.json).

    `setup` (from `prepare(cfg)`) lets a notebook reuse loaded models; it is trained in place.
    `evaluator(setup, step)` is called before the first step and every `train.eval_every` steps; its figures
    go into that step's metrics line as `eval/<name>` (step 0 gets a line of its own).
    `resume` continues from the output dir's last checkpoint (running the same config again does too).
    """
    from minioprd.checkpoint import load_checkpoint, prune, save_checkpoint
    from minioprd.data import PromptSampler

    log = (lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True)) if console is not None \
        else (lambda m: None)
    out = Path(cfg.train.output_dir)
    if setup is None:
        fit_to_card(cfg, log)  # before comparing with the run dir's config.yaml, which holds the fitted values
    ckpt, finished = _run_state(out, cfg, force, resume, log)
    if finished:
        log(f"the run in {out} is already complete (summary.json); use --force to run it again")
        return json.loads((out / "summary.json").read_text())
    s = setup or prepare(cfg, log)
    out.mkdir(parents=True, exist_ok=True)
    from minioprd.objective import config_note, resolve

    objective = resolve(s, out, log)  # loss.objective=auto: measured at step 0 (or kept from this run dir)
    cfg = s.cfg
    atomic_write_text(out / "config.yaml", config_note(objective) + to_yaml(cfg))

    params = [p for p in s.student.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": cfg.train.lr}]
    if len(s.projections):
        groups.append({"params": list(s.projections.parameters()), "lr": cfg.train.projection_lr or cfg.train.lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    sampler = PromptSampler(len(s.prompts), seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    counters = {"nonfinite_in_row": 0, "nonfinite_total": 0, "elapsed_before": 0.0,
                "loss_scale": LOSS_SCALE_INIT if s.dtype == torch.float16 and cfg.train.fp16_loss_scale else 1.0,
                "loss_scale_clean": 0, "overflow_steps": 0}
    first_step = 1
    if ckpt is not None:
        state = load_checkpoint(ckpt, s.student, s.projections, optimizer, scheduler)
        sampler.load_state_dict(state["sampler"])
        counters.update(state["counters"])
        first_step = state["step"] + 1
        # lines of steps after the checkpoint were lost with the crash: they are recomputed identically
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= state["step"]]
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        log(f"resuming from {ckpt} (step {state['step']} of {cfg.train.steps})")
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    if ckpt is None and len(s.projections) and s.bridge is None and cfg.loss.projection_init == "lstsq":
        if s.cross is None:
            fit_projections(s, log)
        else:
            log("note: loss.projection_init=lstsq needs a shared tokenizer; the projections start random")
    s.student.train()

    def checkpoint(step: int) -> Path:
        path = out / "checkpoints" / f"step-{step:06d}"
        save_checkpoint(path, lambda d: _save_weights(s, d), optimizer, scheduler,
                        {"step": step, "sampler": sampler.state_dict(),
                         "counters": {**counters, "elapsed_before": counters["elapsed_before"] + time.time() - t_start}})
        prune(out, cfg.train.keep_checkpoints)
        return path

    if evaluator is None and cfg.train.eval_every:
        if not s.eval_examples:
            raise MinioprdError("train.eval_every is set but there is nothing to evaluate on: set eval.holdout > 0 "
                                "or name eval.dataset")
        evaluator = default_evaluator(s)

    def run_eval(step: int) -> dict[str, float]:
        if evaluator is None or not cfg.train.eval_every:
            return {}
        was_training = s.student.training
        figures = {f"eval/{k}": v for k, v in evaluator(s, step).items()}
        s.student.train(was_training)
        best = best_metric(cfg, figures)
        if best is not None and cfg.eval.keep_best and step > 0:
            key, value, higher = best
            old = counters.get("best")
            if old is None or (value > old if higher else value < old):
                counters.update(best=value, best_step=step)
                save_adapter(s, out / "best")
                atomic_write_json(out / "best" / "best.json", {"step": step, "metric": key, "value": value})
        return figures

    from minioprd.loggers import Trackers

    trackers = Trackers(list(cfg.train.report_to), out, cfg.to_dict())
    t_start = time.time()
    if first_step == 1:
        initial = run_eval(0)
        if initial:
            append_jsonl(out / "metrics.jsonl", {"step": 0, **initial})
            trackers.log({"step": 0, **initial})
    progress = _progress(console, cfg.train.steps, first_step - 1)
    history: list[dict[str, Any]] = []
    step = first_step - 1
    try:
        with _Interrupts(log if progress is None else progress.console.print) as interrupts:
            for step in range(first_step, cfg.train.steps + 1):
                try:
                    record = _train_step(s, cfg, step, sampler, optimizer, scheduler, params, counters)
                except torch.cuda.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    path = checkpoint(step - 1) if step > 1 else None
                    raise MinioprdError(
                        f"out of GPU memory at step {step}" + (f" (state before it saved in {path}; resume with "
                        f"--resume {out})" if path else "") + ": lower rollout.max_new_tokens or "
                        "rollout.prompts_per_step, set rollout.micro_batch, turn on lora.gradient_checkpointing, use "
                        "loss.positions=last_k, or model.student_quant=4bit") from None
                record["elapsed_s"] = counters["elapsed_before"] + time.time() - t_start
                if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                    record.update(run_eval(step))
                    if record.get("eval/repetition", 0.0) > cfg.train.collapse_repetition:
                        record["collapse_warning"] = True
                history.append(record)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    append_jsonl(out / "metrics.jsonl", record)
                    trackers.log(record)
                warned = counters.setdefault("collapse_warnings", 0)
                if record["collapse_warning"]:
                    counters["collapse_warnings"] += 1
                if record["collapse_warning"] and console is not None and warned % 10 == 0:  # 1st, 11th, ...
                    progress.console.print(
                        f"[yellow]warning:[/yellow] step {step}: the student is repeating itself (distinct-token "
                        f"ratio {record['distinct']:.2f}, looping answers {record['repetition']:.0%}"
                        + (f", in eval {record['eval/repetition']:.0%}" if "eval/repetition" in record else "")
                        + "); lower train.lr, train fewer steps, or add an output-space term (loss.objective=opd_topk "
                          "loss.mu=1)")
                if progress is not None:
                    progress.update(progress.task_ids[0], advance=1,
                                    figures=f"loss {record['loss']:.4g} cos {record['cos'] or 0:.3f} "
                                            f"len {record['response_len']:.0f} {record['tokens_per_s']:.0f} tok/s")
                if counters["nonfinite_in_row"] >= 3:
                    path = checkpoint(step)  # the weights are those of the last good step: bad steps were skipped
                    raise MinioprdError(f"the loss or gradient was not finite for 3 steps in a row (step {step}); "
                                        f"the last good state is saved in {path}: lower train.lr, keep "
                                        f"train.grad_clip on, or use loss.kind=scale_mse")
                if interrupts.requested:
                    path = checkpoint(step)
                    raise MinioprdError(f"stopped by {interrupts.requested} after step {step}; checkpoint saved in "
                                        f"{path}: continue with `minioprd distill --resume {out}`")
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                    checkpoint(step)
    finally:
        trackers.close()
        if progress is not None:
            progress.stop()
    save_adapter(s, final_dir(s))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) >= 1]
    total = counters["elapsed_before"] + time.time() - t_start
    summary = {
        "steps": cfg.train.steps, "seconds": total, "seconds_per_step": total / cfg.train.steps,
        "first": {k: rows[0].get(k) for k in ("loss", "cos", "response_len", "distinct")} if rows else {},
        "last": {k: rows[-1].get(k) for k in ("loss", "cos", "response_len", "distinct")} if rows else {},
        "nonfinite_steps": counters["nonfinite_total"], "fp16_overflow_steps": counters["overflow_steps"],
        "skipped_prompts": s.skipped_prompts, "objective": objective.to_dict(),
        "adapter": str(final_dir(s)), "resumed_from": str(ckpt) if ckpt else None,
    }
    atomic_write_json(out / "summary.json", summary)
    _plot(out)
    cos = "" if not rows or rows[0].get("cos") is None else \
        f", cos {summary['first']['cos']:.3f} -> {summary['last']['cos']:.3f}"
    log(f"done: {cfg.train.steps} steps in {summary['seconds']:.1f}s ({summary['seconds_per_step']:.2f} s/step)"
        + (f"; loss {summary['first']['loss']:.4g} -> {summary['last']['loss']:.4g}" if rows else "")
        + f"{cos}; saved in {final_dir(s)}")
    return summary


def _train_step(s: Setup, cfg: Config, step: int, sampler: Any, optimizer: Any, scheduler: Any,
                params: list[torch.Tensor], counters: dict[str, Any]) -> dict[str, Any]:
    """rollout -> teacher targets -> loss -> (skip if not finite) step; returns the metrics line."""
    t0 = time.time()
    idx = sampler.next_batch(cfg.rollout.prompts_per_step)
    torch.manual_seed(cfg.train.seed * 1_000_003 + step)  # rollouts reproducible step by step (and on resume)
    merge = cfg.rollout.merge_lora and cfg.lora.r > 0 and cfg.model.student_quant == "none"
    if merge:  # one matmul per layer instead of three while generating
        s.student.merge_adapter()
    try:
        ro = rollout(s.student, s.tokenizer, [s.prompts[i] for i in idx], n=cfg.rollout.n,
                     temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                     max_new_tokens=cfg.rollout.max_new_tokens, **rollout_options(cfg.rollout, s.device))
    finally:
        if merge:
            s.student.unmerge_adapter()
    t1 = _clock(s.device)
    scale = float(counters["loss_scale"])
    figures = update_step(s, ro, scale)
    trained = params + list(s.projections.parameters())
    if scale != 1.0:
        for p in trained:
            if p.grad is not None:
                p.grad.div_(scale)
    grad_norm = torch.nn.utils.clip_grad_norm_(trained,
                                               cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
    finite_loss, finite_grad = math.isfinite(figures["loss"]), bool(torch.isfinite(grad_norm))
    if finite_loss and finite_grad:
        optimizer.step()
        counters["nonfinite_in_row"] = 0
        if scale != 1.0:  # fp16 loss scaling: grow again after a run of clean steps
            counters["loss_scale_clean"] += 1
            if counters["loss_scale_clean"] >= LOSS_SCALE_GROWTH_STEPS:
                counters["loss_scale"], counters["loss_scale_clean"] = scale * 2, 0
    elif finite_loss and scale > 1.0:  # the scaled gradient overflowed fp16: skip, retry at half the scale
        counters["loss_scale"], counters["loss_scale_clean"] = scale / 2, 0
        counters["overflow_steps"] += 1
    else:  # skip the update: one bad sample must not poison the adapter
        counters["nonfinite_in_row"] += 1
        counters["nonfinite_total"] += 1
    optimizer.zero_grad(set_to_none=True)
    lr_now = scheduler.get_last_lr()[0]
    with warnings.catch_warnings():  # the schedule follows steps, skipped ones too (torch warns if step 1 was)
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    t2 = _clock(s.device)
    gen_tokens = int(ro.response_mask.sum())
    distinct = distinct_ratio(ro)
    from minioprd.alignment import repetition_rate

    looping = repetition_rate([row[m].tolist() for row, m in zip(ro.responses, ro.response_mask)])
    layer_cos = figures["layer_cos"]
    return {
        "step": step, "loss": figures["loss"], "loss_rep": figures["loss_rep"], "loss_opd": figures["loss_opd"],
        "cos": sum(layer_cos) / len(layer_cos) if layer_cos else None, "cos_last": layer_cos[-1] if layer_cos else None,
        "layer_cos": [round(c, 5) for c in layer_cos], "layer_loss": [round(v, 6) for v in figures["layer_loss"]],
        "response_len": gen_tokens / ro.input_ids.shape[0],
        "eos_frac": float((ro.response_mask.sum(1) < ro.response_mask.shape[1]).float().mean()),
        "distinct": distinct, "repetition": looping,
        "collapse_warning": distinct < cfg.train.collapse_threshold or looping > cfg.train.collapse_repetition,
        "lr": lr_now, "grad_norm": float(grad_norm), "nonfinite_steps": counters["nonfinite_total"],
        **({"loss_scale": scale} if scale != 1.0 else {}),
        "tokens_per_s": gen_tokens / max(t1 - t0, 1e-9), "rollout_s": t1 - t0,
        "teacher_s": figures["teacher_s"], "update_s": t2 - t1 - figures["teacher_s"], "step_s": t2 - t0,
    }


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
