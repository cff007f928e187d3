"""Everything `distill` needs before its first step, and the configuration checks that come before it.

  check_before_loading   configuration problems that need no weights (all reported at once)
  plan_layers, describe  both models' shapes from their configs and the layer map (`--dry-run`)
  prepare                tokenizers, prompts (and held-out eval examples), the 4-bit teacher, the LoRA student,
                         the layer map and the width projections (or the bridge), as a `Setup`
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from minioprd.capture import num_layers
from minioprd.config import Config, to_yaml
from minioprd.errors import ConfigError, MinioprdError
from minioprd.fit import fit_to_card
from minioprd.layers import layer_map
from minioprd.parallel import SINGLE, process_device
from minioprd.projections import width_projections


def check_before_loading(cfg: Config, evaluator: Callable[..., Any] | None = None) -> None:
    """Problems a run would otherwise meet only after both models loaded, as one ConfigError."""
    from minioprd.loggers import missing_trackers

    problems = missing_trackers(list(cfg.train.report_to))
    if evaluator is None and cfg.train.eval_every and not (cfg.eval.dataset or cfg.eval.holdout):
        problems.append("train.eval_every is set but there is nothing to evaluate on: set eval.holdout > 0 or "
                        "name eval.dataset")
    if problems:
        raise ConfigError(problems)


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
    bridge: Any = None  # bridge.Bridge: frozen r-dim subspace (loss.bridge), None = compare raw states
    cross: Any = None  # cross_tokenizer.CrossTokenizer when the tokenizers differ: the teacher reads the text
    skipped_prompts: int = 0
    eval_examples: list[Any] = field(default_factory=list)  # held-out examples for the in-loop evaluation
    parallel: Any = field(default_factory=lambda: SINGLE)  # parallel.Parallel: this process's place (set by distill)


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
    from minioprd.objective import dry_run_line, shape_hint

    lc = cfg.loss
    if lc.objective == "auto":  # what the shapes suggest (a same-shape pair needs no projections either way)
        lc = replace(lc, objective=shape_hint((ls, ds), (lt, dt)).objective or "oprd")
    projections = "none (same width)" if ds == dt else f"{len(pairs)} x Linear({ds}->{dt})" \
        if lc.has_representation_term() else f"none ({lc.objective} compares no hidden states)"
    console.print(f"# projections: {projections}; "
                  f"positions: {cfg.loss.positions}"
                  f"{f' (k={cfg.loss.k})' if cfg.loss.positions.endswith('_k') else ''}, convention "
                  f"{cfg.loss.convention}", markup=False, highlight=False)
    console.print(f"# {dry_run_line(cfg, (ls, ds), (lt, dt))}", markup=False, highlight=False)


def prepare(cfg: Config, log: Any = print) -> Setup:
    from minioprd.data import load_examples, render_prompts, tokenize_prompts
    from minioprd.models import (check_tokenizers, load_student, load_teacher, load_tokenizer, pick_device,
                                 pick_dtype, resolve_model, trainable_parameters)

    # processes sharing the machine share its cores
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get(
        "LOCAL_WORLD_SIZE", "1"))))
    fit_to_card(cfg, log)  # train.fit=auto: memory settings for this card, before any weights (no-op if done)
    device = pick_device(process_device(cfg.model.device))  # several processes: the card of this one
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

    from minioprd.cross_tokenizer import same_tokenizer

    shared_vocab = same_tokenizer(tokenizer, teacher_tok)
    if not shared_vocab and cfg.loss.objective not in ("oprd", "auto"):  # said before any weights load
        raise MinioprdError(f"the teacher's tokenizer differs from the student's: loss.objective="
                            f"{cfg.loss.objective} compares next-token distributions and needs a shared "
                            f"vocabulary; use loss.objective=oprd (the teacher then reads the text)")
    teacher = load_teacher(t_res, cfg.model.teacher_quant, teacher_device,
                           dtype=pick_dtype(cfg.model.dtype, teacher_device), trust_remote_code=trc, log=log)
    student = load_student(s_res, cfg.lora, cfg.model.student_quant, device, dtype, seed=cfg.train.seed,
                           trust_remote_code=trc)
    from minioprd.cross_tokenizer import CrossTokenizer, prompt_table, teacher_prompts
    from minioprd.rollout import eos_ids

    cross = None
    if shared_vocab:
        check_tokenizers(tokenizer, teacher_tok, teacher.get_input_embeddings().weight.shape[0])
    else:
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
    elif d_s != d_t and cfg.loss.has_representation_term():  # auto picks no OPRD term at other widths
        projections = width_projections(len(pairs), d_s, d_t, device)
        log(f"projections: {len(pairs)} x Linear({d_s}->{d_t}), {sum(p.numel() for p in projections.parameters()):,}"
            " trainable params")
    log("layer_map (student->teacher): " + ", ".join(f"{a}->{b}" for a, b in pairs))
    return Setup(cfg, device, teacher_device, dtype, student, teacher, tokenizer, prompts, pairs, projections,
                 skipped_prompts=skipped, eval_examples=eval_examples, bridge=bridge, cross=cross)
