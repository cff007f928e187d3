"""`loss.objective=auto`: which objective a teacher-student pair gets, and why.

Plain OPRD pulls the student's hidden states onto the teacher's. That only makes sense when the two share an
origin (the paper's setting: the teacher is a further-trained copy of the student), so their residual streams
live in the same coordinates. A teacher trained apart (another width or depth, or the same shape from another
initialisation) has states in its own coordinates, and output-space OPD, which only asks for the same
next-token distribution, is the stronger choice; a teacher with another tokenizer cannot be compared in
output space at all, so it gets OPRD-Bridge.

Two stages:
- `shape_hint` (no weights, used by `--dry-run` and `minioprd plan`): what the configs alone decide. Different
  tokenizers -> bridge; different shapes -> the OPD side; the same shape -> undecided until measured.
- the measurement at step 0 (same shapes only) decides between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

# The objective auto picks for a teacher trained apart from the student.
APART = "opd_full"


@dataclass(frozen=True)
class Hint:
    """What the shapes alone say. `objective` is None when only a measurement can decide."""

    objective: str | None  # "oprd" | APART | "bridge" | None (same shape: measured at step 0)
    reason: str


def shape_hint(student_shape: tuple[int, int], teacher_shape: tuple[int, int], same_tokenizer: bool = True) -> Hint:
    """Decide from (layers, width) of both models and whether they share a tokenizer, without weights."""
    (ls, ds), (lt, dt) = student_shape, teacher_shape
    if not same_tokenizer:
        return Hint("bridge", "the tokenizers differ: output-space objectives need a shared vocabulary, so "
                              "representations are matched through an OPRD-Bridge fitted on the run's prompts")
    if (ls, ds) != (lt, dt):
        return Hint(APART, f"student {ls}x{ds} and teacher {lt}x{dt} differ in shape: no shared origin, so "
                           f"the states are not comparable coordinate by coordinate")
    return Hint(None, f"same shape ({ls}x{ds}): whether they share an origin is measured at step 0")
