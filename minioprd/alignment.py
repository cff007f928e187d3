"""How close a student is to its teacher, and whether it still writes: measured on the student's own responses.

    student, projections, pairs = load_run_student("runs/x/adapter")
    report = alignment_report(student, teacher, tokenizer, prompts, pairs, projections, max_new_tokens=48)

The student answers each prompt (greedy by default, `minioprd.rollout.rollout`); the teacher then reads the
same tokens. On the states that *predict* the response tokens (columns P-1 … P+R-2, `layers.state_window`
with the predict convention; EOS included) the report gives:

  kl            mean per-token reverse KL(p_S ‖ p_T) in nats over all response tokens, on the shared
                vocabulary (the first min(rows) logits), from each model's own post-norm last layer and
                LM head (`losses.reverse_kl_per_token`); teacher and student may differ in width
  layer_cos     per (student, teacher) layer pair, the token-mean cosine between the student state
                (through its width projection, if any) and the teacher's (`losses.layer_cosines`);
                None when the widths differ and no projections are given (not comparable)
  cos_mean / cos_last   their mean over pairs / the last pair's value (None likewise)

and, on the generated tokens alone (EOS and padding excluded):

  response_len  mean generated tokens per response, EOS included (as distill's metrics.jsonl counts)
  eos_frac      fraction of responses that ended with EOS within max_new_tokens
  distinct_4    unique / total 4-grams pooled over all responses (the paper's Dist-4g); None without 4-grams
  repetition    fraction of responses caught in a loop: some 4-gram occurs >= 3 times in the response's
                last 32 tokens (all of it if shorter). Any loop with a period of up to 14 tokens that fills
                the tail is flagged ("the the the", "You are a good assistant, you are a good assistant,
                …"); fluent text almost never repeats a 4-gram three times within 32 tokens
  samples       the decoded responses (special tokens dropped), in prompt order

With `cross=` (a `cross_tokenizer.CrossTokenizer`: the teacher has another tokenizer) the teacher reads each
response as text in its own tokens and every student state is paired with the teacher state that has read the same text
(`CrossTokenizer.teacher_states`, predict convention); student tokens with no teacher counterpart are left out.
The KL is then None (the two next-token distributions live on different vocabularies) and `aligned_frac` /
`exact_frac` give the share of response tokens with an end-covering / exactly-ending teacher token.

With `bridge=` (a run's `bridge.Bridge`) the cosines are taken in the bridge's r-dim subspace, between
P_S h_S and P_T (h_T - mu_T), the two vectors a bridge run's loss compares.

With `reference=` (fixed rollouts, e.g. the teacher's own greedy answers) the KL and cosines are measured
again on those tokens as `ref_kl`, `ref_cos_last`, …: identical tokens for every student, so runs compare
without the confound that a student stuck in a loop writes text the teacher also finds easy to continue.

A cosine alone does not show that distillation worked (findings.md): read it next to the KL and the
generation-quality figures.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minioprd.capture import capture_hidden, num_layers
from minioprd.errors import MinioprdError
from minioprd.layers import state_window
from minioprd.losses import layer_cosines, reverse_kl_per_token
from minioprd.rollout import Rollout, eos_ids, rollout

REPETITION_TAIL = 32  # tokens at the end of a response searched for a loop (periods <= 14 caught)
REPETITION_NGRAM = 4
REPETITION_MIN_COUNT = 3


# --------------------------------------------------------------------------------------------- loading


def _run_adapter(path: str | Path) -> Path:
    """An adapter directory as given, or a run directory's final adapter (`<run>/adapter`)."""
    path = Path(path)
    if not (path / "minioprd.json").is_file() and (path / "adapter" / "minioprd.json").is_file():
        return path / "adapter"
    return path


def load_run_student(adapter_dir: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[Any, list[nn.Linear] | None, list[tuple[int, int]]]:
    """The trained student of a run (`<run>/adapter`, a checkpoint, or the run directory itself), in eval mode.

    Returns (student: PeftModel with the adapter loaded, projections: one bias-free Linear(d_S -> d_T) per
    layer pair or None when the run had none, pairs: the run's (student, teacher) layer map). The base is
    `minioprd.json`'s `student_path`, or the `student` name resolved again when that path is gone (e.g. a
    builtin under another MINIOPRD_HOME). The tokenizer is saved alongside:
    `AutoTokenizer.from_pretrained(adapter_dir)`.
    """
    from peft import PeftModel

    from minioprd.models import _from_pretrained, quantization_config, resolve_model

    adapter_dir = _run_adapter(adapter_dir)
    meta_path = adapter_dir / "minioprd.json"
    if not meta_path.is_file():
        raise MinioprdError(f"{str(adapter_dir)!r} is not a minioprd adapter directory (no minioprd.json): pass a "
                            f"run's adapter/ or a checkpoint directory")
    meta = json.loads(meta_path.read_text())
    path = meta.get("student_path")
    if not path or not (Path(path) / "config.json").is_file():
        path = resolve_model(meta["student"], "student").path
    device = torch.device(device)
    kw: dict[str, Any] = {"device_map": {"": str(device)}, "dtype": dtype}
    qc = quantization_config(meta.get("student_quant", "none"), dtype if dtype != torch.float32 else torch.bfloat16)
    if qc is not None:
        kw["quantization_config"] = qc
    base = _from_pretrained(path, "student", **kw)
    student = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    student.eval()
    pairs = [(int(a), int(b)) for a, b in meta["layer_map"]]
    projections = None
    if meta.get("projections"):
        from safetensors.torch import load_file

        tensors = load_file(str(adapter_dir / "projections.safetensors"))
        projections = []
        for a, b in pairs:
            w = tensors[f"s{a}_t{b}.weight"]  # (d_T, d_S)
            proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                proj.weight.copy_(w)
            proj.requires_grad_(False)
            projections.append(proj.to(device))
    return student, projections, pairs


def load_run_bridge(adapter_dir: str | Path, teacher: str, device: str | torch.device = "cpu") -> Any:
    """The bridge a run trained in (`<adapter>/bridge`, with P_S as trained), or None for a run without one.

    `teacher` is the teacher being compared against: a bridge fitted for another teacher is refused.
    """
    from minioprd.bridge import load_bridge

    adapter_dir = _run_adapter(adapter_dir)
    meta = json.loads((adapter_dir / "minioprd.json").read_text())
    if not meta.get("bridge"):
        return None
    return load_bridge(adapter_dir / meta["bridge"].get("dir", "bridge"), meta["student"], teacher,
                       [tuple(p) for p in meta["layer_map"]], device=device)


# --------------------------------------------------------------------------------------------- text metrics


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: Sequence[Sequence[int]], n: int = 4) -> float | None:
    """Unique / total n-grams pooled over all responses (an n-gram in two responses counts once as unique).

    None when no response has n tokens. 1.0 = no n-gram repeats anywhere; loops drive it towards 0.
    """
    grams = [g for r in responses for g in _ngrams(list(r), n)]
    return len(set(grams)) / len(grams) if grams else None


def is_looping(tokens: Sequence[int], tail: int = REPETITION_TAIL, n: int = REPETITION_NGRAM,
               min_count: int = REPETITION_MIN_COUNT) -> bool:
    """True when some n-gram occurs >= min_count times in the last `tail` tokens."""
    grams = _ngrams(list(tokens)[-tail:], n)
    return bool(grams) and max(Counter(grams).values()) >= min_count


def repetition_rate(responses: Sequence[Sequence[int]]) -> float:
    """Fraction of responses `is_looping` flags (0.0 for no responses)."""
    return sum(is_looping(r) for r in responses) / len(responses) if responses else 0.0


# --------------------------------------------------------------------------------------------- the report


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _head(model: nn.Module):
    head = model.get_output_embeddings()
    if head is None:
        raise MinioprdError(f"{type(model).__name__} has no output embeddings (LM head): cannot compute the KL")
    weight = head.weight
    # A 4-bit teacher computes in bf16; its (unquantized) head may differ from the captured states' dtype.
    return (lambda h: head(h.to(weight.dtype))), weight.shape[0]


class _Meter:
    """Accumulates KL and layer cosines over rollout batches (token-weighted)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[int, int]],
                 projections: Sequence[nn.Module] | None, cross: Any = None, bridge: Any = None):
        if bridge is not None:
            if projections is not None:
                raise MinioprdError("pass width projections or a bridge, not both")
            if [tuple(p) for p in bridge.pairs] != [tuple(p) for p in pairs]:
                raise MinioprdError(f"the bridge maps layers {bridge.pairs}, the report {pairs}")
            projections = bridge.student_projections
        if projections is not None and len(projections) != len(pairs):
            raise MinioprdError(f"got {len(projections)} projections for {len(pairs)} layer pairs")
        self.student, self.teacher, self.pairs, self.cross, self.bridge = student, teacher, pairs, cross, bridge
        self.projections = list(projections) if projections is not None else None
        self.L_s, self.L_t = num_layers(student), num_layers(teacher)
        self.comparable = projections is not None or student.config.hidden_size == teacher.config.hidden_size
        self.s_layers = sorted({a for a, _ in pairs} | {self.L_s})
        self.t_layers = sorted({b for _, b in pairs} | {self.L_t})
        self.s_head, s_rows = _head(student)
        self.t_head, t_rows = _head(teacher)
        self.vocab = min(s_rows, t_rows)
        self.s_dev, self.t_dev = _device_of(student), _device_of(teacher)
        self.cos_sum = torch.zeros(len(pairs), dtype=torch.float64)
        self.cos_tokens = 0
        self.kl: list[torch.Tensor] = []
        self.response_tokens = self.aligned = self.exact = 0  # cross-tokenizer coverage

    @torch.no_grad()
    def add(self, ro: Rollout) -> None:
        """Both models read `ro`; keep the KL and cosines at the states predicting its response tokens."""
        win = state_window(ro.prompt_len, ro.response_mask.bool(), "predict")
        pos = ro.position_ids()
        s_states = capture_hidden(self.student, ro.input_ids.to(self.s_dev), ro.attention_mask.to(self.s_dev),
                                  pos.to(self.s_dev), self.s_layers, win.start, win.stop)
        if self.cross is None:
            t_states = capture_hidden(self.teacher, ro.input_ids.to(self.t_dev), ro.attention_mask.to(self.t_dev),
                                      pos.to(self.t_dev), self.t_layers, win.start, win.stop)
            mask = win.mask
        else:  # the teacher reads the text in its own tokens; its states are gathered at the student's columns
            inputs = self.cross.align(ro)
            t_states, mask = self.cross.teacher_states(self.teacher, ro, self.t_layers, win, "predict", inputs,
                                                       device=self.t_dev)
            valid = ro.response_mask.bool().to(inputs.token_cols.device)
            self.response_tokens += int(valid.sum())
            self.aligned += int(((inputs.token_cols >= 0) & valid).sum())
            self.exact += int((inputs.exact & valid).sum())
        s_by = dict(zip(self.s_layers, s_states))
        t_by = {b: h.to(self.s_dev) for b, h in zip(self.t_layers, t_states)}
        mask = mask.to(self.s_dev)
        n_tok = int(mask.sum())
        if self.comparable and n_tok:
            targets = [t_by[b].float() for _, b in self.pairs]
            if self.bridge is not None:  # the teacher in the bridge's subspace: (h_T - mu_T) P_T^T
                targets = self.bridge.teacher_transform(targets)
            cos = layer_cosines([s_by[a].float() for a, _ in self.pairs], targets, mask, self.projections)
            self.cos_sum += cos.double().cpu() * n_tok
            self.cos_tokens += n_tok
        if self.cross is None:  # across tokenizers the two distributions have different supports: no KL
            self.kl.append(reverse_kl_per_token(s_by[self.L_s], t_by[self.L_t], mask, self.s_head, self.t_head,
                                                vocab_size=self.vocab).float().cpu())

    def result(self, prefix: str = "") -> dict[str, Any]:
        kl = torch.cat(self.kl) if self.kl else torch.zeros(0)
        layer_cos = (self.cos_sum / self.cos_tokens).tolist() if self.comparable and self.cos_tokens else None
        out = {
            f"{prefix}tokens": int(kl.numel()) if self.cross is None else self.aligned,
            f"{prefix}kl": float(kl.mean()) if kl.numel() else None,
            f"{prefix}kl_median": float(kl.median()) if kl.numel() else None,
            f"{prefix}layer_cos": layer_cos,
            f"{prefix}cos_mean": sum(layer_cos) / len(layer_cos) if layer_cos else None,
            f"{prefix}cos_last": layer_cos[-1] if layer_cos else None,
        }
        if self.cross is not None:
            n = max(self.response_tokens, 1)
            out.update({f"{prefix}aligned_frac": self.aligned / n, f"{prefix}exact_frac": self.exact / n})
        return out


def alignment_report(student: nn.Module, teacher: nn.Module, tokenizer: Any, prompts: list[list[int]],
                     pairs: Sequence[tuple[int, int]], projections: Sequence[nn.Module] | None = None, *,
                     max_new_tokens: int = 64, temperature: float = 0.0, batch_size: int = 8,
                     seed: int = 0, reference: Sequence[Rollout] | None = None,
                     cross: Any = None, bridge: Any = None) -> dict[str, Any]:
    """Student-vs-teacher alignment and generation quality on the student's own responses (module docstring).

    prompts: token ids (as `data.tokenize_prompts` makes them); pairs: hidden_states indices (1..L, the last
    post-norm) as in a run's layer map; projections: one per pair, or None. Runs under no_grad; the student
    keeps whichever adapter is active. Returns a JSON-serialisable dict.

    reference: fixed rollouts (e.g. `rollout(teacher, ...)`, the teacher's own greedy answers) on which the
    KL and cosines are measured again as `ref_kl`, `ref_cos_last`, ...: the same tokens for every student, so
    runs compare without the confound that a looping student's own text is easy for the teacher to predict.

    cross: a `cross_tokenizer.CrossTokenizer` when the teacher's tokenizer differs (module docstring); not with
    reference.
    bridge: a `bridge.Bridge` for `pairs` (instead of projections): cosines in its subspace.
    """
    if not prompts:
        raise MinioprdError("alignment_report needs at least one prompt")
    if cross is not None and reference is not None:
        raise MinioprdError("reference rollouts are in one tokenizer's ids: not usable with a cross-tokenizer teacher")
    pairs = [(int(a), int(b)) for a, b in pairs]
    meter = _Meter(student, teacher, pairs, projections, cross, bridge)
    ref_meter = _Meter(student, teacher, pairs, projections, bridge=bridge) if reference is not None else None
    eos = set(eos_ids(student, tokenizer))

    was_training = student.training
    student.eval()
    responses: list[list[int]] = []
    lengths: list[int] = []
    ended: list[bool] = []
    try:
        with torch.no_grad():
            for bi, lo in enumerate(range(0, len(prompts), batch_size)):
                torch.manual_seed(seed * 1_000_003 + bi)
                ro = rollout(student, tokenizer, prompts[lo:lo + batch_size], n=1, temperature=temperature,
                             max_new_tokens=max_new_tokens)
                meter.add(ro)
                for row, m in zip(ro.responses.cpu(), ro.response_mask.bool().cpu()):
                    toks = row[m].tolist()
                    lengths.append(len(toks))
                    ended.append(bool(toks) and toks[-1] in eos)
                    responses.append([t for t in toks if t not in eos])
            for ro in reference or []:
                ref_meter.add(ro)
    finally:
        student.train(was_training)

    return {
        "prompts": len(prompts),
        **meter.result(),
        **(ref_meter.result("ref_") if ref_meter is not None else {}),
        "pairs": [list(p) for p in pairs],
        "response_len": sum(lengths) / len(lengths),
        "eos_frac": sum(ended) / len(ended),
        "distinct_4": distinct_n(responses, 4),
        "repetition": repetition_rate(responses),
        "samples": [tokenizer.decode(r, skip_special_tokens=True) for r in responses],
        "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature, "batch_size": batch_size,
                     "seed": seed, "vocab_size": meter.vocab, "convention": "predict",
                     "bridge_rank": None if bridge is None else bridge.rank},
    }
