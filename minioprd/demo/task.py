"""The demo's task, `builtin:arithmetic`: 2-digit sums and differences answered by a short chain of column steps
and `\\boxed{}`, in three disjoint splits, and how a model is scored on it.

Scoring uses the package's own evaluators, the ones `minioprd eval` and the in-loop evaluation use:
  accuracy     greedy answers graded by `grading.grade` (`evaluate.evaluate_task`);
  kl, cos      with a teacher: `alignment.alignment_report` on the same greedy answers of the evaluated model
               (reverse KL(student || teacher) per token, hidden-state cosine per layer pair, mean and last),
               its answers graded as above.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_NEW_TOKENS = 32  # the longest reference solution is 28 tokens + EOS


def task_splits() -> dict[str, list[Any]]:
    """train (the builtin 2000), val (200 more, for picking checkpoints and learning rates), test (the builtin
    200); no question is in two splits."""
    from minioprd.data import arithmetic_examples, load_examples

    train = load_examples("builtin:arithmetic", split="train")
    test = load_examples("builtin:arithmetic", split="test")
    seen = {str(e.prompt) for e in train} | {str(e.prompt) for e in test}
    val = arithmetic_examples(200, seed=2, exclude=seen)
    return {"train": train, "val": val, "test": test}


def encode_prompts(tokenizer: Any, examples: list[Any]) -> list[list[int]]:
    """The ChatML prompts (no suffix) as token ids, exactly as `distill.prepare` renders them."""
    from minioprd.data import render_prompts

    return tokenizer(render_prompts(tokenizer, examples, suffix="", chat_template="true"),
                     add_special_tokens=False)["input_ids"]


class TestSet:
    """Greedy accuracy on a list of examples; given the teacher also the per-token reverse KL(student ||
    teacher) and the hidden-state cosine to it, both on the evaluated model's own greedy responses."""

    def __init__(self, tokenizer: Any, examples: list[Any], max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = 256):
        from minioprd.evaluate import prepare_task

        self.tokenizer, self.examples = tokenizer, list(examples)
        self.task = prepare_task(tokenizer, self.examples, prompt_suffix="", chat_template="true")
        self.prompts = self.task.prompts
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, model: Any, teacher: Any = None, pairs: list[tuple[int, int]] | None = None,
                 projections: Any = None) -> dict[str, float]:
        """`pairs`: (student, teacher) hidden_states indices for the cosine; a pair of different widths needs
        `projections` (one per pair), else no cosine is reported."""
        from minioprd.alignment import alignment_report
        from minioprd.evaluate import evaluate_task
        from minioprd.grading import grade

        if teacher is None:
            m = evaluate_task(model, self.tokenizer, self.task, k=1, greedy=True,
                              max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
            return {"acc": m["avg@1"]}
        with torch.random.fork_rng(devices=[]):  # the report seeds its own batches: leave the run's RNG alone
            a = alignment_report(model, teacher, self.tokenizer, self.prompts, pairs or [],
                                 list(projections) if projections is not None and len(projections) else None,
                                 max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        right = sum(grade(text, answer).correct for text, answer in zip(a["samples"], self.task.answers))
        out = {"acc": right / len(self.prompts), "kl": a["kl"]}
        if a["cos_mean"] is not None:
            out.update(cos=a["cos_mean"], cos_last=a["cos_last"])
        return out


def test_sets(tokenizer: Any, n_test: int = 200, n_val: int = 200) -> dict[str, Any]:
    """The test and validation `TestSet`s (first n of each split) and the train split's examples."""
    sp = task_splits()
    return {"test": TestSet(tokenizer, sp["test"][:n_test]), "val": TestSet(tokenizer, sp["val"][:n_val]),
            "train_examples": sp["train"]}


def gap_closed(after: float, before: float, teacher: float) -> float | None:
    """(after - before) / (teacher - before); None when the teacher is not better than the student."""
    return (after - before) / (teacher - before) if teacher > before else None
