"""The `minioprd` command: a thin Typer layer over plain library functions.

Every user-fixable problem is a MinioprdError, printed here as one red line with exit code 2
(`--debug` shows the traceback). Heavy imports happen inside commands so `--help` is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="minioprd",
    help="On-Policy Representation Distillation of LLMs on one consumer GPU (4-bit teacher, LoRA student).",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)
_state = {"debug": False}


def main() -> None:
    """Console-script entry point."""
    app()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from minioprd import __version__

        console.print(f"minioprd {__version__}")
        raise typer.Exit(0)
    _state["debug"] = debug or os.environ.get("MINIOPRD_DEBUG") == "1"


def run(fn: Callable[[], Any]) -> Any:
    """Call `fn`; turn user errors (and out-of-memory) into one clear line and exit code 2."""
    import torch
    from rich.markup import escape

    from minioprd.errors import ConfigError, MinioprdError

    try:
        return fn()
    except ConfigError as e:
        if _state["debug"]:
            raise
        if len(e.problems) == 1:
            err_console.print(f"[red]error:[/red] {escape(e.problems[0])}", highlight=False, soft_wrap=True)
        else:
            err_console.print(f"[red]error:[/red] {len(e.problems)} problems in the config: "
                              + escape("; ".join(e.problems)), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except MinioprdError as e:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except torch.cuda.OutOfMemoryError:
        if _state["debug"]:
            raise
        err_console.print("[red]error:[/red] out of GPU memory: lower rollout.max_new_tokens or "
                          "rollout.prompts_per_step, set rollout.micro_batch, turn on "
                          "lora.gradient_checkpointing, use loss.positions=last_k, or model.student_quant=4bit "
                          "(`minioprd plan` shows what fits)", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`section.key=value` words -> dict; a word without `=` is an error naming it."""
    from minioprd.errors import ConfigError

    out, bad = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            bad.append(f"override {item!r} is not section.key=value (e.g. train.lr=2e-4)")
        else:
            out[key.strip().lstrip("-")] = value
    if bad:
        raise ConfigError(bad)
    return out


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


# Flags for the common knobs; anything else is a `section.key=value` override.
_FLAG_KEYS = {
    "teacher": "model.teacher", "student": "model.student", "teacher_quant": "model.teacher_quant",
    "student_quant": "model.student_quant", "device": "model.device", "dataset": "data.dataset",
    "field": "data.field", "output_dir": "train.output_dir", "steps": "train.steps", "lr": "train.lr",
    "seed": "train.seed", "loss": "loss.kind", "layers": "loss.layers", "positions": "loss.positions",
    "prompts_per_step": "rollout.prompts_per_step", "n": "rollout.n",
    "max_new_tokens": "rollout.max_new_tokens",
}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def distill(
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="Extra settings as section.key=value, e.g. train.lr=2e-4 loss.kind=cosine rollout.n=4.",
        show_default=False)] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="YAML recipe (see recipes/).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher: dir, hub id or name (Qwen2.5-7B).")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student: dir, hub id or name (Qwen2.5-0.5B).")] = None,
    teacher_quant: Annotated[Optional[str], typer.Option(help="Teacher weights: 4bit, 8bit or none.")] = None,
    student_quant: Annotated[Optional[str], typer.Option(help="Student base: none or 4bit (QLoRA).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Hub data set or local jsonl/json/parquet/csv.")] = None,
    field: Annotated[Optional[str], typer.Option(help="Prompt column (default: auto-detect).")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="scale_mse, mse, normalized_mse or cosine.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="all, last, even, odd or a list like [4,8,12].")] = None,
    positions: Annotated[Optional[str], typer.Option(help="all, last, last_k or first_k.")] = None,
    prompts_per_step: Annotated[Optional[int], typer.Option(help="Prompts per step.")] = None,
    n: Annotated[Optional[int], typer.Option(help="Responses per prompt.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest response.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and layer map, then exit.")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an output dir that holds another run.")]
    = False,
) -> None:
    """Distill a teacher into a LoRA student on the student's own rollouts (OPRD).

    [bold]minioprd distill --teacher Qwen2.5-7B --student Qwen2.5-0.5B --dataset prompts.jsonl[/bold]
    """
    values = dict(locals())

    def go() -> None:
        _quiet_libraries()
        from minioprd.config import load_config
        from minioprd.distill import distill as run_distill
        from minioprd.distill import describe

        flags = {_FLAG_KEYS[k]: v for k, v in values.items() if k in _FLAG_KEYS and v is not None}
        cfg = load_config(recipe, {**flags, **parse_overrides(values["overrides"] or [])})
        if dry_run:
            describe(cfg, console)
            return
        run_distill(cfg, console=console, force=force)

    run(go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
