"""Answer extraction, grading with HuggingFace `math-verify`, and the evaluation metrics as pure functions.

    g = grade("... so the answer is \\boxed{\\frac{1}{2}}.", "0.5")     # Grade(extracted='\\frac{1}{2}', correct=True)
    avg_at_k([[True, False], [False, False]])                         # 0.25
    pass_at_k(n=16, c=2, k=8)                                         # 1 - C(14,8)/C(16,8) = 0.7667

Extraction (`extract_answer`) reads the final answer a response commits to, in one of three formats, whichever
comes last in the text: the last `\\boxed{...}` (or `\\fbox{...}`), an `Answer: ...` line (DAPO-Math's format)
or `#### ...` (GSM8K's). A response with none of them has no answer (counted by `no_answer_fraction`); there is
no "last number in the text" fallback, which would credit guesses. Equivalence (`answers_match`) is
math-verify's: LaTeX and plain expressions are parsed to SymPy and compared symbolically, so `142.0` equals
`142`, `\\left( 3, \\frac{\\pi}{2} \\right)` equals `(3, \\pi/2)`, `\\$18.90` equals `18.9` and `(3,4]` differs
from `(3,4)`.

math-verify bounds each parse and comparison with `signal.alarm`, which only works in the main thread; off it
(a data-loader or UI thread) the timeout is turned off instead of raising, and answers longer than
`MAX_ANSWER_CHARS` are graded wrong without parsing, so a runaway response cannot stall the grader.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

from minioprd.data import last_boxed

MAX_ANSWER_CHARS = 1000  # longer "answers" are rambling, not answers; parsing them can take seconds
TIMEOUT_S = 5  # math-verify's own default, per parse and per comparison

_ANSWER_LINE = re.compile(r"^[ \t>*_#]*(?:final[ \t]+)?answer[ \t*_]*:[ \t*_]*(.+?)[ \t]*$",
                          re.IGNORECASE | re.MULTILINE)
_GSM8K = re.compile(r"####[ \t]*([^\n]+?)[ \t]*$", re.MULTILINE)
# Plain scientific notation (Minerva writes `4.5e33`): LaTeX parsing reads `e` as Euler's number.
_MATH_DOLLAR = re.compile(r"(?<!\\)\$")
_SCI = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?\d+)$")


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns once when its timeout is off; we turn it off on purpose off the main thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())


@dataclass(frozen=True)
class Grade:
    extracted: str | None  # the answer the response commits to; None when it gives none
    correct: bool


# --------------------------------------------------------------------------------------------- extraction


def extract_answer(response: str) -> str | None:
    """The final answer in `response`: the last `\\boxed{}`, `Answer: ...` line or `#### ...`, whichever is
    last in the text; surrounding `$...$` and a trailing full stop are removed. None when there is none."""
    found: list[tuple[int, str]] = []  # (position, answer)
    start = max(response.rfind("\\boxed{"), response.rfind("\\fbox{"))
    if start >= 0:
        boxed = last_boxed(response)
        if boxed is not None and boxed.strip():
            found.append((start, boxed))
    lines = list(_ANSWER_LINE.finditer(response))
    if lines:
        found.append((lines[-1].start(), lines[-1].group(1)))
    gsm = list(_GSM8K.finditer(response))
    if gsm:
        found.append((gsm[-1].start(), gsm[-1].group(1)))
    for _, text in sorted(found, reverse=True):
        answer = _clean(text)
        if answer:
            return answer
    return None


def _clean(text: str) -> str:
    """`$5$.` -> `5`: a sentence's full stop and the inline-math dollars are not part of the answer."""
    text = text.strip().strip("*").strip().removesuffix(".").strip()
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text.removesuffix(".").strip()


def ground_truth(answer: str) -> str:
    """A data set's answer as the bare expression: `\\boxed{204}` -> `204`, `... #### 72` -> `72`."""
    text = str(answer).strip()
    gsm = list(_GSM8K.finditer(text))
    if gsm:
        return gsm[-1].group(1).replace(",", "").strip()
    boxed = last_boxed(text)
    return boxed.strip() if boxed is not None else text


# --------------------------------------------------------------------------------------------- grading


def _timeout() -> int | None:
    """math-verify's signal-based timeout works only in the main thread (and where SIGALRM exists)."""
    main = threading.current_thread() is threading.main_thread()
    return TIMEOUT_S if main and hasattr(signal, "SIGALRM") else None


def _as_latex(expr: str) -> str:
    """`expr` as text math-verify reads as one expression: `$...$`, scientific notation rewritten."""
    expr = expr.strip()
    sci = _SCI.match(expr)
    if sci:
        expr = f"{sci.group(1)}\\times 10^{{{int(sci.group(2))}}}"
    # Olympiad-Bench writes `$...$` (sometimes several pieces: `$69$,$84$`); `\$` is a literal dollar sign.
    return "$" + _MATH_DOLLAR.sub("", expr) + "$"


@lru_cache(maxsize=4096)
def _parse(expr: str, timeout: int | None) -> tuple[Any, ...]:
    from math_verify import parse

    try:
        return tuple(parse(_as_latex(expr), parsing_timeout=timeout))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - math-verify raises many types on odd input; unparsable = no match
        return ()


def answers_match(gold: str, answer: str) -> bool:
    """True if `answer` is mathematically equal to `gold` (both bare expressions), per math-verify.

    Falls back to exact string equality (after whitespace is removed) when either side does not parse.
    """
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    if "".join(gold.split()) == "".join(answer.split()):
        return True
    from math_verify import verify

    timeout = _timeout()
    g, a = _parse(gold, timeout), _parse(answer, timeout)
    if not g or not a:
        return False
    try:
        return bool(verify(list(g), list(a), timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - a comparison that blows up is not a match
        return False


def grade(response: str, gold: str | None) -> Grade:
    """Extract the answer of `response` and compare it with the data set's answer `gold`."""
    extracted = extract_answer(response)
    if extracted is None or gold is None:
        return Grade(extracted, False)
    return Grade(extracted, answers_match(ground_truth(gold), extracted))


# --------------------------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (the paper's Avg@16)."""
    rows = [r for r in correct if len(r)]
    return sum(sum(r) / len(r) for r in rows) / len(rows) if rows else 0.0


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems (each problem needs at least k samples)."""
    rows = [r for r in correct if len(r)]
    return sum(pass_at_k(len(r), sum(r), k) for r in rows) / len(rows) if rows else 0.0


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> int | None:
    """Index of the sample whose answer gets the most votes; None when no sample has an answer.

    Answers are grouped with `same` (default: equal after whitespace is removed), each joining the first group
    whose first answer it matches. Ties go to the group whose first answer comes first, so the result is
    deterministic; the winner's first sample is returned.
    """
    same = same or (lambda a, b: "".join(a.split()) == "".join(b.split()))
    groups: list[list[int]] = []  # sample indices; groups[g][0] is the representative
    for i, a in enumerate(answers):
        if a is None:
            continue
        for g in groups:
            if same(answers[g[0]], a):  # type: ignore[arg-type]
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    best = max(range(len(groups)), key=lambda g: (len(groups[g]), -g))
    return groups[best][0]


def maj_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]],
             same: Callable[[str, str], bool] | None = None) -> float:
    """Mean over problems of: the majority-vote answer (see `majority_vote`) is correct."""
    if len(answers) != len(correct):
        raise ValueError(f"maj@k needs one answer list per problem: {len(answers)} vs {len(correct)}")
    if not answers:
        return 0.0
    hits = 0
    for a, c in zip(answers, correct):
        i = majority_vote(a, same)
        hits += bool(i is not None and c[i])
    return hits / len(answers)


def no_answer_fraction(answers: Sequence[str | None]) -> float:
    """Fraction of responses with no extractable answer."""
    return sum(a is None for a in answers) / len(answers) if answers else 0.0


def mean_length(lengths: Sequence[int]) -> float:
    """Mean response length (tokens)."""
    return sum(lengths) / len(lengths) if lengths else 0.0


def distinct_ngram_ratio(responses: Sequence[Sequence[Any]], n: int = 4) -> float | None:
    """Unique / total n-grams pooled over all responses (the paper's Dist-4g; an n-gram that occurs in two
    responses counts once as unique, as in `alignment.distinct_n`); None when no response has n tokens.

    Falls towards 0 as responses loop ("the the the ...") or repeat each other.
    """
    grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def pass_ks(k: int) -> list[int]:
    """The k values pass@k is reported at for k samples per problem: 1, 2, 4, ... and k itself."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return out + [k]


def summarize(problems: Sequence[Sequence[dict[str, Any]]], same: Callable[[str, str], bool] | None = None
              ) -> dict[str, Any]:
    """All metrics from graded samples, grouped by problem; each sample is a dict with `extracted`,
    `correct`, `length` (tokens), `truncated` and `response` (text).

    pass@j is reported for the j in `pass_ks(k)` where k is the smallest sample count of a problem. Dist-4g is
    counted on whitespace-separated words, as the authors' grade.py does: it then means the same for models
    with different tokenizers, and a resumed evaluation recomputes it from samples.jsonl's text.
    """
    problems = [p for p in problems if len(p)]
    flat = [s for p in problems for s in p]
    if not flat:
        return {"problems": 0, "samples": 0}
    correct = [[bool(s["correct"]) for s in p] for p in problems]
    answers = [[s["extracted"] for s in p] for p in problems]
    k = min(len(p) for p in problems)
    out: dict[str, Any] = {"problems": len(problems), "samples": len(flat), "k": k,
                           f"avg@{k}": avg_at_k(correct)}
    for j in pass_ks(k):
        out[f"pass@{j}"] = mean_pass_at_k(correct, j)
    out[f"maj@{k}"] = maj_at_k(answers, correct, same)
    out["no_answer"] = no_answer_fraction([a for row in answers for a in row])
    out["mean_length"] = mean_length([int(s["length"]) for s in flat])
    out["truncated"] = sum(bool(s.get("truncated")) for s in flat) / len(flat)
    out["distinct_4gram"] = distinct_ngram_ratio([str(s.get("response", "")).split() for s in flat], 4)
    counts = Counter(int(sum(c)) for c in correct)
    out["solve_none"], out["solve_all"] = counts.get(0, 0), sum(all(c) for c in correct)
    return out
