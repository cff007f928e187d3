"""`minioprd plan --measure`: a few real `distill` steps in this process, their measured peak memory next to the
planner's estimate (the check that keeps `plan.py`'s terms honest).
"""

from __future__ import annotations

import copy
from typing import Any

from minioprd.config import Config
from minioprd.memory import mmap_threshold, reset_peak, rss, trim_heap
from minioprd.estimate import MIB
from minioprd.plan import plan


def _warm_up(setup: Any) -> None:
    """A 2-token rollout and a 4-token forward/backward: one-off allocations (BLAS/oneDNN scratch, lazily
    imported generation code, autograd's engine) land in the baseline instead of the measured peak."""
    import torch

    from minioprd.capture import capture_hidden
    from minioprd.rollout import rollout

    ro = rollout(setup.student, setup.tokenizer, [setup.prompts[0][:4]], n=1, max_new_tokens=2)
    pos = ro.position_ids()
    with torch.no_grad():
        capture_hidden(setup.teacher, ro.input_ids.to(setup.teacher_device), ro.attention_mask.to(
            setup.teacher_device), pos.to(setup.teacher_device), [1], 0, ro.input_ids.shape[1])
    h = capture_hidden(setup.student, ro.input_ids, ro.attention_mask, pos, [1], 0, ro.input_ids.shape[1])
    h[0].float().pow(2).mean().backward()
    setup.student.zero_grad(set_to_none=True)


def measure(cfg: Config, steps: int = 2, output_dir: str | None = None, release_freed: bool = True,
            prepare: Any = None) -> dict[str, Any]:
    """Run `steps` real distill steps in this process; return the measured peak next to the estimate.

    CUDA: torch's peak reserved memory plus the context (card total - free - reserved, read after loading),
    against the whole estimate. CPU: the training phase, i.e. the peak RSS of the steps minus the RSS once
    the models are loaded, their pages touched and a tiny warm-up step taken (VmHWM is reset then), against
    the estimate minus the loaded weights: RSS also holds imported code, tokenizers and prompts that a GPU
    never sees. Large allocations are served by mmap during the run (glibc mallopt M_MMAP_THRESHOLD=64 KiB,
    as `MALLOC_MMAP_THRESHOLD_=65536` would) and free heap pages are trimmed before the baseline, so RSS
    follows the live tensors (with glibc's defaults, heap fragmentation adds a run-dependent 30-270%;
    `release_freed=False` measures that). The comparison uses the longest real prompt for P. `prepare(cfg, log)`
    replaces `distill.prepare` (the GPU check builds random-weight models in place with it, no checkpoint).
    """
    import tempfile

    import torch

    import minioprd.distill as distill_mod
    from minioprd import data, losses, models, rollout  # noqa: F401 - import cost belongs to the baseline

    run_cfg = copy.deepcopy(cfg)
    run_cfg.train.steps, run_cfg.train.save_every, run_cfg.train.log_every = steps, 0, 1
    if run_cfg.model.device == "auto":  # measure where distill will run
        run_cfg.model.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = plan(run_cfg, propose=False).device == "cuda"
    mmap_set = False if cuda or not release_freed else mmap_threshold(64 * 1024)
    seen: dict[str, Any] = {}
    original = distill_mod.prepare

    def prepare_then_reset(*a: Any, **kw: Any) -> Any:
        setup = (prepare or original)(*a, **kw)
        seen["P"] = max(len(p) for p in setup.prompts)
        if cuda:
            seen["context"] = {}
            for d in sorted({str(setup.device), str(setup.teacher_device)}):
                free, total = torch.cuda.mem_get_info(d)
                seen["context"][d] = total - free - torch.cuda.memory_reserved(d)
                torch.cuda.reset_peak_memory_stats(d)
        else:
            with torch.no_grad():  # page in memory-mapped checkpoint tensors: they are weights, not training
                for m in (setup.student, setup.teacher, setup.projections):
                    for t in list(m.parameters()) + list(m.buffers()):
                        t.detach().view(-1)[:: 1024].float().sum() if t.numel() else None
            _warm_up(setup)
            trim_heap()  # free heap left by earlier work would otherwise be reused without showing in RSS
            seen["after_load"] = rss("VmRSS")
            seen["hwm_reset"] = reset_peak()
        return setup

    original_plot = distill_mod._plot

    def plot_after_peak(out: Any) -> None:  # the PNG is drawn after training, in CPU memory: not part of it
        seen["hwm"] = rss("VmHWM")
        original_plot(out)

    distill_mod.prepare, distill_mod._plot = prepare_then_reset, plot_after_peak
    try:
        with tempfile.TemporaryDirectory(prefix="minioprd-measure-") as tmp:
            run_cfg.train.output_dir = output_dir or tmp
            distill_mod.distill(run_cfg, console=None, force=True)
    finally:
        distill_mod.prepare, distill_mod._plot = original, original_plot
        if mmap_set:
            mmap_threshold(128 * 1024)  # glibc's initial value (the dynamic adjustment stays off)
    est = plan(run_cfg, propose=False, prompt_tokens=seen.get("P"))
    estimated = max(est.peak(c) for c in range(est.cards))
    out: dict[str, Any] = {"device": est.device, "steps": steps, "prompt_tokens": seen.get("P"), "plan": est}
    if cuda:
        measured = max(torch.cuda.max_memory_reserved(d) + c for d, c in seen["context"].items())
        out.update(estimated_mib=estimated / MIB, measured_mib=measured / MIB, error=estimated / max(measured, 1) - 1,
                   how="whole run: torch max_memory_reserved + CUDA context")
    else:
        loaded = sum(t.bytes for t in est.terms if t.name.startswith(("teacher weights", "student weights",
                                                                          "LoRA adapter")))
        loaded += sum(t.bytes / 3 for t in est.terms if t.name.startswith("projections"))  # moments come later
        measured = seen.get("hwm", rss("VmHWM")) - seen.get("after_load", 0)
        out.update(estimated_mib=(estimated - loaded) / MIB, measured_mib=measured / MIB,
                   total_estimated_mib=estimated / MIB, error=(estimated - loaded) / max(measured, 1) - 1,
                   how="training phase: peak RSS of the steps minus RSS after loading"
                   + ("" if seen.get("hwm_reset") else " (VmHWM could not be reset: not comparable)")
                   + ("" if mmap_set else " (glibc's default heap: includes fragmentation)"))
    return out


def measure_line(m: dict[str, Any]) -> str:
    """`measure`'s result as the one line `minioprd plan --measure` prints."""
    return (f"measured ({m['how']}, {m['steps']} steps, P={m['prompt_tokens']}): {m['measured_mib']:.0f} MiB; "
            f"estimated {m['estimated_mib']:.0f} MiB ({100 * m['error']:+.0f}%)")
