"""`minioprd eval`: task accuracy of one or more models on a math set, alignment of a student to its teacher,
and the in-loop evaluation `distill` can call.

    from minioprd.evaluate import evaluate
    evaluate(["Qwen2.5-7B-Instruct@4bit", "Qwen2.5-0.5B-Instruct", "runs/x"], "AIME24/test.parquet",
             "runs/x/eval-aime24", preset="aime24", k=16)

For each model:
  1. prompts   - the data set's problems rendered with the model's chat template and the paper's suffix
                 `Please reason step by step, and put your final answer within \\boxed{}.` (not added twice
                 to a prompt that already ends with it);
  2. generate  - k samples per problem, batched HF generate with the KV cache (`rollout.rollout`), T=0.7 and
                 top-p 0.95 by default (the paper's), or greedy, at most `max_new_tokens` tokens each;
  3. grade     - the last `\\boxed{}` / `Answer:` line / `####` of each response against the ground truth with
                 math-verify (`grading.py`);
  4. record    - one line per sample in `samples.jsonl`, appended as each batch finishes; a rerun with the same
                 output directory skips the (model, problem, sample) lines already there;
  5. summarize - avg@k, pass@j (unbiased), maj@k, no-answer fraction, mean length, truncated fraction,
                 Dist-4g into `summary.json` (recomputed from samples.jsonl, so a resumed run gives the same
                 summary), and a table.

Model specs (`--model`, repeatable; the label in the table is the spec as typed):
  NAME / HUB_ID / DIR       a base or merged model (`resolve_model`: `Qwen2.5-0.5B`, `Qwen/Qwen2.5-0.5B`,
                            a directory with config.json, `builtin:tiny-student`)
  ADAPTER_DIR               a LoRA adapter (adapter_config.json); its base is the run's student, read from
                            minioprd.json (or adapter_config.json's base_model_name_or_path)
  RUN_DIR                   a distill output directory: its `adapter/`
  BASE+ADAPTER_DIR          an adapter on an explicitly named base
  ...@4bit / @8bit / @none  any of the above with its base weights loaded that way (default: none for a base
                            model, the run's student_quant for an adapter)
"""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from minioprd.data import Example, load_examples, render_prompts, tokenize_prompts
from minioprd.errors import MinioprdError
from minioprd.files import atomic_write_json, atomic_write_text
from minioprd.grading import answers_match, grade, summarize
from minioprd.models import adapter_base, as_adapter_dir, load_model, parse_model_spec, read_json
from minioprd.rollout import eos_ids, rollout

logger = logging.getLogger(__name__)

MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
QUANTS = ("none", "4bit", "8bit")
SAMPLES, SUMMARY, SETTINGS = "samples.jsonl", "summary.json", "eval.json"
# Settings that change what a sample is: a rerun into the same directory must keep them (k, max_problems,
# the models and batch_size may change: more samples or problems are simply added).
FIXED_SETTINGS = ("dataset", "split", "field", "answer_field", "prompt_suffix", "prompt_template", "chat_template",
                  "system_prompt", "max_prompt_tokens", "temperature", "top_p", "greedy", "max_new_tokens", "seed")


@dataclass(frozen=True)
class Preset:
    """Where a data set keeps its problem and answer, and which suffix its prompts need."""

    field: str
    answer_field: str
    suffix: str
    about: str


_VERL = ("prompt", "reward_model.ground_truth")  # the OPRD authors' parquet schema
PRESETS: dict[str, Preset] = {
    "aime24": Preset(*_VERL, MATH_SUFFIX, "AIME 2024, 30 problems; ground truth `\\boxed{204}` style"),
    "aime25": Preset(*_VERL, MATH_SUFFIX, "AIME 2025, 30 problems"),
    "amc23": Preset(*_VERL, MATH_SUFFIX, "AMC 2023, 40 problems"),
    "aimo": Preset(*_VERL, "", "aimo-validation-amc, 83 problems; prompts already end with the boxed "
                               "instruction, answers like `142.0`"),
    "math500": Preset(*_VERL, MATH_SUFFIX, "MATH-500; answers like `\\left( 3, \\frac{\\pi}{2} \\right)`"),
    "minerva": Preset(*_VERL, MATH_SUFFIX, "Minerva math, 272 problems; answers like `4.5e33`"),
    "olympiad": Preset(*_VERL, MATH_SUFFIX, "Olympiad-Bench, 674 problems; answers like `$\\frac{1}{2 n+2}$`"),
    "math-train": Preset(*_VERL, "", "MATH train split; prompts already end with the boxed instruction"),
    "dapo": Preset(*_VERL, "", "DAPO-Math-17K; prompts already ask for a final `Answer: ...` line"),
    "matharena": Preset("problem", "answer", MATH_SUFFIX, "BRUMO25 / CMIMC25 / HMMT25 (problem, answer columns)"),
    "gsm8k": Preset("question", "answer", MATH_SUFFIX, "GSM8K (question; answer ends with `#### 72`), e.g. "
                                                       "openai/gsm8k:main"),
}


# --------------------------------------------------------------------------------------------- prompts


@dataclass
class EvalTask:
    """Problems ready for generation with one tokenizer: the kept problems' prompt ids and answers."""

    problems: list[int]  # index into the examples of each kept problem
    texts: list[str]  # rendered prompt (what the model continues)
    prompts: list[list[int]]  # token ids
    answers: list[str]
    skipped: int = 0  # problems whose prompt is longer than max_prompt_tokens


def _has_suffix(prompt: str | list[dict[str, str]], suffix: str) -> bool:
    text = prompt if isinstance(prompt, str) else next(
        (m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    squash = lambda s: " ".join(s.split())  # noqa: E731
    return bool(suffix.strip()) and squash(text).endswith(squash(suffix))


def render_eval_prompts(tokenizer: Any, examples: Sequence[Example], *, prompt_suffix: str = MATH_SUFFIX,
                        prompt_template: str = "{prompt}", chat_template: str = "auto",
                        system_prompt: str | None = None) -> list[str]:
    """`data.render_prompts`, with the suffix left off the prompts that already end with it."""
    texts: list[str] = []
    for ex in examples:
        suffix = "" if _has_suffix(ex.prompt, prompt_suffix) else prompt_suffix
        texts += render_prompts(tokenizer, [ex], template=prompt_template, suffix=suffix,
                                chat_template=chat_template, system_prompt=system_prompt)
    return texts


def prepare_task(tokenizer: Any, examples: Sequence[Example], *, prompt_suffix: str = MATH_SUFFIX,
                 prompt_template: str = "{prompt}", chat_template: str = "auto", system_prompt: str | None = None,
                 max_prompt_tokens: int = 4096) -> EvalTask:
    """Render and tokenize `examples` (each must have an answer) for `tokenizer`.

    The suffix is not added to a prompt that already ends with it (AIMO's, MATH-train's). Prompts longer than
    `max_prompt_tokens` are skipped and counted, never cut: a truncated problem is a different problem.
    """
    if not examples:
        raise MinioprdError("no problems to evaluate")
    missing = [i for i, e in enumerate(examples) if e.answer is None]
    if missing:
        raise MinioprdError(f"{len(missing)} problems have no answer (first: {missing[0]}); evaluation needs one")
    texts = render_eval_prompts(tokenizer, examples, prompt_suffix=prompt_suffix, prompt_template=prompt_template,
                                chat_template=chat_template, system_prompt=system_prompt)
    ids, kept, skipped = tokenize_prompts(tokenizer, texts, max_prompt_tokens, "skip")
    return EvalTask(problems=kept, texts=[texts[i] for i in kept], prompts=ids,
                    answers=[str(examples[i].answer) for i in kept], skipped=skipped)


# --------------------------------------------------------------------------------------------- generation


def _generate(model: Any, tokenizer: Any, task: EvalTask, jobs: Sequence[tuple[int, int]], *, temperature: float,
              top_p: float, max_new_tokens: int, batch_size: int, seed: int) -> Iterator[list[dict[str, Any]]]:
    """Sample and grade each (task position, sample) job; yields the graded records of each batch.

    Jobs are batched longest prompt first (little padding, and an out-of-memory error shows up at once). Each
    batch is seeded from (seed, its first job), so the same settings give the same samples.
    """
    eos = set(eos_ids(model, tokenizer))
    order = sorted(jobs, key=lambda j: (-len(task.prompts[j[0]]), j[0], j[1]))
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        torch.manual_seed(seed * 1_000_003 + task.problems[chunk[0][0]] * 1009 + chunk[0][1])
        # pack_weights=auto: a CPU model too big for a cache decodes from packed weights (distill's rollouts do
        # too); models under the threshold and every GPU keep the usual kernels
        ro = rollout(model, tokenizer, [task.prompts[p] for p, _ in chunk], n=1, temperature=temperature,
                     top_p=top_p, max_new_tokens=max_new_tokens, pack_weights="auto")
        records = []
        for (p, s), row, mask in zip(chunk, ro.responses.cpu(), ro.response_mask.cpu()):
            toks = row[mask].tolist()
            ended = bool(toks) and toks[-1] in eos
            text = tokenizer.decode([t for t in toks if t not in eos], skip_special_tokens=True)
            g = grade(text, task.answers[p])
            records.append({"problem": task.problems[p], "sample": s, "prompt": task.texts[p], "response": text,
                            "extracted": g.extracted, "answer": task.answers[p], "correct": g.correct,
                            "length": len(toks), "truncated": not ended})
        yield records


def _summarize_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_problem: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: (r["problem"], r["sample"])):
        by_problem.setdefault(r["problem"], []).append(r)
    return summarize(list(by_problem.values()), same=answers_match)


def evaluate_task(model: Any, tokenizer: Any, task: EvalTask | Sequence[Example], *, k: int = 1,
                  greedy: bool = True, temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int = 512,
                  batch_size: int = 16, seed: int = 0, prompt_suffix: str = MATH_SUFFIX,
                  max_prompt_tokens: int = 4096, return_samples: bool = False) -> dict[str, Any]:
    """Task metrics of an already-loaded model (the in-loop evaluation): no reloading, nothing written.

    `task` is an `EvalTask` from `prepare_task` (render once, evaluate every N steps) or examples with
    answers. The model's train/eval mode and the global RNG state (CPU and CUDA) are left as they were, so a
    training run that evaluates draws the same rollouts as one that does not. Returns `grading.summarize`'s
    metrics (avg@k, pass@j, maj@k, no_answer, mean_length, truncated, distinct_4gram, ...), plus `samples`
    (the graded records) with `return_samples`.
    """
    _check_sampling(k, temperature, top_p, greedy, max_new_tokens, batch_size)
    if not isinstance(task, EvalTask):
        task = prepare_task(tokenizer, list(task), prompt_suffix=prompt_suffix, max_prompt_tokens=max_prompt_tokens)
    jobs = [(p, s) for p in range(len(task.problems)) for s in range(k)]
    device = next(model.parameters()).device
    records: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in _generate(model, tokenizer, task, jobs, temperature=0.0 if greedy else temperature,
                               top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed):
            records += batch
    out = _summarize_records(records)
    out["skipped_prompts"] = task.skipped
    if return_samples:
        out["samples"] = sorted(records, key=lambda r: (r["problem"], r["sample"]))
    return out


def _check_sampling(k: int, temperature: float, top_p: float, greedy: bool, max_new_tokens: int,
                    batch_size: int) -> None:
    problems = []
    if k < 1:
        problems.append(f"k must be >= 1 (samples per problem), got {k}")
    if greedy and k > 1:
        problems.append(f"greedy decoding gives {k} identical samples per problem: use k=1 with --greedy, or "
                        f"sample (drop --greedy)")
    if not greedy and temperature < 0:
        problems.append(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if problems:
        raise MinioprdError("; ".join(problems))


# --------------------------------------------------------------------------------------------- the command


def get_preset(name: str | None) -> Preset | None:
    if not name:
        return None
    p = PRESETS.get(name.lower())
    if p is None:
        raise MinioprdError(f"unknown preset {name!r}: known presets are {', '.join(PRESETS)}")
    return p


def load_eval_examples(dataset: str, split: str = "test", preset: str | None = None, field: str = "auto",
                       answer_field: str = "auto", max_problems: int = 0) -> list[Example]:
    """The problems of `dataset` that have an answer; a preset names the columns unless `field`/`answer_field`
    are given."""
    p = get_preset(preset)
    if p is not None:
        field = p.field if field == "auto" else field
        answer_field = p.answer_field if answer_field == "auto" else answer_field
    if answer_field.lower() == "none":
        raise MinioprdError("evaluation needs answers: pass --answer-field NAME, not none")
    examples = load_examples(dataset, split=split, field=field, answer_field=answer_field, max_rows=max_problems)
    with_answer = [e for e in examples if e.answer is not None]
    if not with_answer:
        raise MinioprdError(f"data set '{dataset}' has no answer column (looked for answer, ground_truth, solution, "
                            f"final_answer, reward_model.ground_truth): pass --answer-field NAME or a --preset "
                            f"({', '.join(PRESETS)})")
    if len(with_answer) < len(examples):
        logger.info("skipped %d problems without an answer", len(examples) - len(with_answer))
    return with_answer


def _read_samples(path: Path) -> list[dict[str, Any]]:
    """samples.jsonl's records; a line cut by a crash is dropped (and the file rewritten without it)."""
    if not path.is_file():
        return []
    text = path.read_text()
    good, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if isinstance(rec, dict) and {"model", "problem", "sample"} <= rec.keys():
                good.append(rec)
                continue
        except json.JSONDecodeError:
            pass
        bad += 1
    if bad or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in good))
    return good


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS
    if path.is_file():
        old = read_json(path).get("settings", {})
        diff = [k for k in FIXED_SETTINGS if k in old and old[k] != settings[k]]
        if diff:
            shown = ", ".join(f"{k}: {old[k]!r} -> {settings[k]!r}" for k in diff)
            raise MinioprdError(f"output dir {str(out)!r} holds an evaluation with other settings ({shown}); "
                                f"pass a new --output-dir, or the same settings to resume")
    elif (out / SAMPLES).is_file():
        raise MinioprdError(f"output dir {str(out)!r} has {SAMPLES} but no {SETTINGS}: pass a new --output-dir")
    atomic_write_json(path, {"settings": settings})


def evaluate(models: Sequence[str], dataset: str, output_dir: str | Path, *, split: str = "test",
             preset: str | None = None, field: str = "auto", answer_field: str = "auto", k: int = 1,
             temperature: float = 0.7, top_p: float = 0.95, greedy: bool = False, max_new_tokens: int = 4096,
             batch_size: int = 16, prompt_suffix: str | None = None, prompt_template: str = "{prompt}",
             chat_template: str = "auto", system_prompt: str | None = None, max_prompt_tokens: int = 4096,
             max_problems: int = 0, device: str = "auto", dtype: str = "auto", seed: int = 0,
             console: Any = None) -> dict[str, Any]:
    """Evaluate each model on `dataset`; writes samples.jsonl, summary.json and eval.json into `output_dir`.

    Returns the summary: {"settings", "dataset", "models": {label: {"model", "skipped_prompts", metrics...}}}.
    `prompt_suffix` None = the preset's suffix, else the paper's math suffix; "" = none. `batch_size` is the
    number of sequences per generate call. See the module docstring for model specs.
    """
    from minioprd.models import load_tokenizer, resolve_model

    log = _logger(console)
    if not models:
        raise MinioprdError("no model to evaluate: pass --model at least once")
    dupes = sorted({m for m in models if list(models).count(m) > 1})
    if dupes:
        raise MinioprdError(f"--model {dupes[0]!r} is given twice")
    _check_sampling(k, temperature, top_p, greedy, max_new_tokens, batch_size)
    if max_problems < 0:
        raise MinioprdError(f"max_problems must be >= 0 (0 = all), got {max_problems}")
    p = get_preset(preset)
    specs = [parse_model_spec(m) for m in models]  # all checked before any model is loaded
    examples = load_eval_examples(dataset, split, preset, field, answer_field, max_problems)
    if p is not None:
        field = p.field if field == "auto" else field
        answer_field = p.answer_field if answer_field == "auto" else answer_field
    suffix = prompt_suffix if prompt_suffix is not None else (p.suffix if p else MATH_SUFFIX)
    dev, torch_dtype = _device_dtype(device, dtype)

    settings = {"dataset": dataset, "split": split, "preset": preset, "field": field, "answer_field": answer_field,
                "prompt_suffix": suffix, "prompt_template": prompt_template, "chat_template": chat_template,
                "system_prompt": system_prompt, "max_prompt_tokens": max_prompt_tokens,
                "temperature": 0.0 if greedy else temperature, "top_p": top_p, "greedy": greedy,
                "max_new_tokens": max_new_tokens, "seed": seed, "k": k, "max_problems": max_problems}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    samples_path = out / SAMPLES
    done: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in _read_samples(samples_path):
        done.setdefault((r["model"], int(r["problem"]), int(r["sample"])), r)
    log(f"data: {len(examples)} problems from {dataset}" + (f" (preset {preset})" if preset else "")
        + f"; k={k}, " + ("greedy" if greedy else f"T={temperature}, top-p {top_p}")
        + f", at most {max_new_tokens} new tokens")

    results: dict[str, Any] = {}
    for spec in specs:
        tok_spec = spec.adapter if spec.adapter and (spec.adapter / "tokenizer_config.json").is_file() else None
        resolved = resolve_model(spec.base, "model")
        if tok_spec is not None:
            resolved = type(resolved)(spec.label, str(tok_spec), "")
        tokenizer = load_tokenizer(resolved, "model")
        task = prepare_task(tokenizer, examples, prompt_suffix=suffix, prompt_template=prompt_template,
                            chat_template=chat_template, system_prompt=system_prompt,
                            max_prompt_tokens=max_prompt_tokens)
        for pos, prob in enumerate(task.problems):
            old = next((done[key] for s in range(k) if (key := (spec.label, prob, s)) in done), None)
            if old is not None and old.get("prompt") != task.texts[pos]:
                raise MinioprdError(f"{samples_path} holds other prompts for model {spec.label!r} (problem {prob}): "
                                    f"the data or the tokenizer changed; pass a new --output-dir")
        jobs = [(pos, s) for pos, prob in enumerate(task.problems) for s in range(k)
                if (spec.label, prob, s) not in done]
        n_done = len(task.problems) * k - len(jobs)
        log(f"{spec.label}: {len(jobs)} samples to generate" + (f", {n_done} already in {SAMPLES}" if n_done else "")
            + (f"; {task.skipped} prompts longer than {max_prompt_tokens} tokens skipped" if task.skipped else ""))
        if jobs:
            model, tokenizer = load_model(spec, dev, torch_dtype)
            right = sum(bool(done[(spec.label, prob, s)]["correct"]) for prob in task.problems for s in range(k)
                        if (spec.label, prob, s) in done)
            bar = _progress(console, spec.label, len(jobs))
            try:
                graded = n_done
                for batch in _generate(model, tokenizer, task, jobs, temperature=settings["temperature"],
                                       top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       seed=seed):
                    batch = [{"model": spec.label, **r} for r in batch]
                    _append(samples_path, batch)
                    for r in batch:
                        done[(spec.label, r["problem"], r["sample"])] = r
                    graded += len(batch)
                    right += sum(r["correct"] for r in batch)
                    if bar is not None:
                        bar.update(bar.task_ids[0], advance=len(batch), acc=f"acc {right / max(graded, 1):.3f}")
            finally:
                if bar is not None:
                    bar.stop()
                del model
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        records = [done[(spec.label, prob, s)] for prob in task.problems for s in range(k)]
        results[spec.label] = {"model": spec.describe(), "skipped_prompts": task.skipped,
                               **_summarize_records(records)}

    summary = {"settings": settings, "dataset": {"source": dataset, "split": split, "preset": preset,
                                                 "problems": len(examples)}, "models": results}
    atomic_write_json(out / SUMMARY, summary)
    if console is not None:
        print_table(summary, console)
        log(f"wrote {out / SUMMARY} and {samples_path}")
    return summary


def _device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    from minioprd.models import pick_device, pick_dtype

    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise MinioprdError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    try:
        dev = pick_device(device)
    except RuntimeError:
        raise MinioprdError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    return dev, pick_dtype(dtype, dev)


def _logger(console: Any) -> Callable[[str], None]:
    return (lambda m: console.print(m, markup=False, highlight=False)) if console is not None else (lambda m: None)


def _progress(console: Any, label: str, total: int) -> Any:
    if console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    bar = Progress(TextColumn(label, markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    bar.add_task(label, total=total, acc="")
    bar.start()
    return bar


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.0f}"


def print_table(summary: dict[str, Any], console: Any) -> None:
    """One row per model, in %: avg@k, pass@k, maj@k, responses with no answer, responses cut by the token
    budget; then the mean length in tokens and Dist-4g in %."""
    from rich import box
    from rich.table import Table

    k = summary["settings"]["k"]
    table = Table(title=f"{summary['dataset']['source']}: {summary['dataset']['problems']} problems, k={k}",
                  box=box.SIMPLE_HEAD)
    cols = [f"avg@{k}", f"pass@{k}", f"maj@{k}", "no ans", "trunc", "len", "dist-4g"]
    table.add_column("model", overflow="fold", min_width=min(28, max(len(m) for m in summary["models"])))
    for c in cols:
        table.add_column(c, justify="right")
    for label, m in summary["models"].items():
        table.add_row(label, _fmt(m.get(f"avg@{k}")), _fmt(m.get(f"pass@{k}")), _fmt(m.get(f"maj@{k}")),
                      _fmt(m.get("no_answer")), _fmt(m.get("truncated")), _fmt(m.get("mean_length"), pct=False),
                      _fmt(m.get("distinct_4gram")))
    console.print(table)


# --------------------------------------------------------------------------------------------- alignment

ALIGNMENT = "alignment.json"


def evaluate_alignment(teacher: str, dataset: str, output_dir: str | Path, *, student: str | None = None,
                       adapter: str | None = None, split: str = "test", preset: str | None = None,
                       field: str = "auto", max_problems: int = 0, temperature: float = 0.7, greedy: bool = False,
                       max_new_tokens: int = 256, batch_size: int = 8, prompt_suffix: str | None = None,
                       prompt_template: str = "{prompt}", chat_template: str = "auto",
                       system_prompt: str | None = None, max_prompt_tokens: int = 4096, teacher_quant: str = "4bit",
                       layers: str = "all", device: str = "auto", dtype: str = "auto", seed: int = 0,
                       console: Any = None) -> dict[str, Any]:
    """Per-layer cosine and reverse KL(student || teacher) on the student's own responses to `dataset`'s
    prompts (`alignment.alignment_report`); writes `alignment.json` into `output_dir` and prints a table.

    The student is a trained run (`adapter`: an adapter or run directory, with the run's layer map and
    projections), or a plain model (`student`, e.g. the student before training: layer map `layers` mapped
    proportionally, no projections, so cosines exist only when the widths match). With `adapter`, `student`
    may be left out; if given it must be the run's own base.
    """
    from minioprd.cross_tokenizer import CrossTokenizer, encode_prompts, prompt_table, same_tokenizer
    from minioprd.alignment import alignment_report, load_run_bridge, load_run_student
    from minioprd.capture import num_layers
    from minioprd.layers import layer_map
    from minioprd.models import ResolvedModel, check_tokenizers, load_teacher, load_tokenizer, resolve_model
    from minioprd.rollout import eos_ids

    log = _logger(console)
    if teacher_quant not in QUANTS:
        raise MinioprdError(f"teacher quant must be one of {', '.join(QUANTS)}, got {teacher_quant!r}")
    _check_sampling(1, temperature, 1.0, greedy, max_new_tokens, batch_size)
    if student is None and adapter is None:
        raise MinioprdError("alignment needs the student: pass --student MODEL and/or --adapter RUN_OR_ADAPTER_DIR")
    if adapter is None and student is not None and Path(student).expanduser().is_dir() \
            and not (Path(student).expanduser() / "config.json").is_file():
        adapter, student = student, None  # --student runs/x: the run's trained student
    adapter_dir = None
    if adapter is not None:
        adapter_dir = as_adapter_dir(Path(adapter).expanduser())
        if adapter_dir is None:
            raise MinioprdError(f"--adapter {adapter!r} is neither a LoRA adapter (adapter_config.json) nor a run "
                                f"directory (adapter/)")
        if not (adapter_dir / "minioprd.json").is_file():
            raise MinioprdError(f"adapter {str(adapter_dir)!r} has no minioprd.json (layer map, projections): "
                                f"alignment needs an adapter written by `minioprd distill`")
        if student is not None:
            base, _ = adapter_base(adapter_dir)
            if resolve_model(student, "student").path != resolve_model(base, "student").path:
                raise MinioprdError(f"--student {student!r} is not the base of adapter {str(adapter_dir)!r} "
                                    f"({base!r}); leave --student out to use the run's own base")
    t_res = resolve_model(teacher, "teacher")
    p = get_preset(preset)
    examples = load_examples(dataset, split=split, field=p.field if p and field == "auto" else field,
                             answer_field="none", max_rows=max_problems)
    suffix = prompt_suffix if prompt_suffix is not None else (p.suffix if p else MATH_SUFFIX)
    dev, torch_dtype = _device_dtype(device, dtype)

    bridge = None
    if adapter_dir is not None:
        student_model, projections, pairs = load_run_student(adapter_dir, dev, torch_dtype)
        bridge = load_run_bridge(adapter_dir, teacher, dev)  # a bridge run: cosines in its subspace
        base = resolve_model(adapter_base(adapter_dir)[0], "student")
        tok_res = ResolvedModel(str(adapter_dir), str(adapter_dir), "") \
            if (adapter_dir / "tokenizer_config.json").is_file() else base
        tokenizer = load_tokenizer(tok_res, "student")
        student_label = str(adapter_dir)
    else:
        spec = parse_model_spec(str(student))
        student_model, tokenizer = load_model(spec, dev, torch_dtype)
        projections, pairs = None, None
        student_label = str(student)
    log(f"student: {student_label}; teacher: {t_res.note}")
    teacher_model = load_teacher(t_res, teacher_quant, dev, dtype=torch_dtype)  # on a GPU: fp16 on a T4, as distill
    teacher_tok = load_tokenizer(t_res, "teacher")
    if pairs is None:
        pairs = layer_map(layers, num_layers(student_model), num_layers(teacher_model))
    render = dict(prompt_suffix=suffix, prompt_template=prompt_template, chat_template=chat_template,
                  system_prompt=system_prompt)
    prompts, kept, skipped = tokenize_prompts(tokenizer, render_eval_prompts(tokenizer, examples, **render),
                                              max_prompt_tokens, "skip")
    log(f"prompts: {len(prompts)} from {dataset}" + (f" ({skipped} longer than {max_prompt_tokens} tokens skipped)"
                                                       if skipped else ""))
    cross = None
    if same_tokenizer(tokenizer, teacher_tok):
        check_tokenizers(tokenizer, teacher_tok, teacher_model.get_input_embeddings().weight.shape[0])
    else:  # as in distill: the teacher reads each answer as text, its prompt in its own chat template
        t_prompts = encode_prompts(teacher_tok, render_eval_prompts(teacher_tok, [examples[i] for i in kept],
                                                                    **render))
        cross = CrossTokenizer(tokenizer, teacher_tok, prompt_table(prompts, t_prompts),
                               student_eos=eos_ids(student_model, tokenizer))
        log("tokenizers differ: the teacher reads each answer as text in its own tokens (no KL: the vocabularies "
            "differ)")
    report = alignment_report(student_model, teacher_model, tokenizer, prompts, pairs, projections,
                              max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                              batch_size=batch_size, seed=seed, cross=cross, bridge=bridge)
    result = {"student": student_label, "teacher": teacher, "teacher_quant": teacher_quant,
              "dataset": {"source": dataset, "split": split, "preset": preset, "prompts": len(prompts),
                          "skipped_prompts": skipped}, "report": report}
    out = Path(output_dir)
    atomic_write_json(out / ALIGNMENT, result)
    if console is not None:
        print_alignment(result, console)
        log(f"wrote {out / ALIGNMENT}")
    return result


def print_alignment(result: dict[str, Any], console: Any) -> None:
    """The headline figures, then one row per layer pair."""
    from rich.table import Table

    r = result["report"]
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    head = Table(title=f"{result['student']} vs teacher {result['teacher']} on {r['prompts']} prompts")
    for c in ("KL nats/tok", "cos mean", "cos last", "len", "EOS %", "dist-4g %", "loop %"):
        head.add_column(c, justify="right")
    head.add_row(num(r["kl"], ".4f"), num(r["cos_mean"], ".4f"), num(r["cos_last"], ".4f"),
                 num(r["response_len"], ".1f"), num(100 * r["eos_frac"], ".1f"),
                 num(None if r["distinct_4"] is None else 100 * r["distinct_4"], ".1f"),
                 num(100 * r["repetition"], ".1f"))
    console.print(head)
    if r.get("aligned_frac") is not None:
        console.print(f"teacher with another tokenizer: {100 * r['aligned_frac']:.1f}% of response tokens aligned "
                      f"({100 * r['exact_frac']:.1f}% exactly); no KL across vocabularies", markup=False,
                      highlight=False)
    if r["layer_cos"] is not None:
        rank = r.get("settings", {}).get("bridge_rank")
        layers = Table(title="cosine per layer pair (student layer -> teacher layer)"
                             + (f", in the run's bridge subspace (r={rank})" if rank else ""))
        layers.add_column("student")
        layers.add_column("teacher")
        layers.add_column("cosine", justify="right")
        for (a, b), c in zip(r["pairs"], r["layer_cos"]):
            layers.add_row(str(a), str(b), f"{c:.4f}")
        console.print(layers)
    else:
        console.print("cosines: not comparable (the widths differ and the student has no trained projections)",
                      markup=False, highlight=False)
