"""grading.py: answer extraction, math-verify grading on real answer strings, metrics against hand-computed values."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from minioprd.grading import (answers_match, avg_at_k, distinct_ngram_ratio, extract_answer, grade, ground_truth,
                              maj_at_k, majority_vote, mean_length, mean_pass_at_k, no_answer_fraction, pass_at_k,
                              pass_ks, summarize)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


# --------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("response, expected", [
    ("first \\boxed{1}, then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # the last box, nested braces kept
    ("\\fbox{7}", "7"),
    ("Adding up, we get 5.\n\nAnswer: $5$", "5"),  # DAPO's format; $...$ removed
    ("**Answer:** 12\n", "12"),
    ("Final answer: 3.", "3"),
    ("so 9*8 = 72\n#### 72", "72"),
    ("\\boxed{5}\nWait, no.\nAnswer: 7", "7"),  # whichever format comes last
    ("Answer: 7\nLet me box it: \\boxed{8}", "8"),
    ("put it in \\boxed{}", None),  # an empty box is the instruction echoed, not an answer
    ("I think it is 7", None),  # no last-number fallback
    ("The answer: 3", None),  # `Answer:` must start a line
    ("\\boxed{1 + {2", None),  # unbalanced braces
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_ground_truth_unwraps_box_and_gsm8k():
    assert ground_truth("\\boxed{204}") == "204"
    assert ground_truth("9*8 = <<9*8=72>>72 rolls.\n#### 72") == "72"
    assert ground_truth("#### 1,000") == "1000"
    assert ground_truth(" \\left( 3, \\frac{\\pi}{2} \\right) ") == "\\left( 3, \\frac{\\pi}{2} \\right)"


# --------------------------------------------------------------------------------------------- grading


def _answer_rows():
    return [json.loads(line) for line in (FIXTURES / "answers.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", _answer_rows(), ids=lambda r: f"{r['source']}:{r['gold'][:18]}->{r['correct']}")
def test_grade_real_answer_formats(row):
    """Ground truths copied from ../shared/data (MATH-500, AIMO, AIME24, Minerva, Olympiad-Bench) and GSM8K /
    DAPO formats: equivalent forms accepted, wrong answers rejected."""
    g = grade(row["response"], row["gold"])
    assert g.correct is row["correct"]
    assert (g.extracted is None) == (row["source"] == "none")


def test_grade_without_gold_or_answer():
    assert grade("\\boxed{3}", None).correct is False and grade("\\boxed{3}", None).extracted == "3"
    assert grade("no answer here", "3").extracted is None


def test_answers_match_number_forms():
    assert answers_match("142.0", "142") and answers_match("142", "142.0")
    assert answers_match("\\frac{1}{2}", "0.5") and not answers_match("\\frac{1}{2}", "0.6")
    assert not answers_match("7", "x" * 5000)  # too long to be an answer: not parsed, not a match


def test_grading_works_off_the_main_thread():
    """math-verify's signal timeout raises off the main thread; grading must turn it off there instead."""
    results = []
    t = threading.Thread(target=lambda: results.append(
        (grade("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"), grade("\\boxed{4}", "5"))))
    t.start()
    t.join(timeout=60)
    assert results and results[0][0].correct is True and results[0][1].correct is False


# --------------------------------------------------------------------------------------------- metrics


def test_pass_at_k_hand_values():
    # 1 - C(14,8)/C(16,8) = 1 - 3003/12870
    assert pass_at_k(16, 2, 8) == pytest.approx(1 - 3003 / 12870)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c/n
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct sample
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_avg_and_mean_pass_at_k():
    correct = [[True, False], [False, False], [True, True]]
    assert avg_at_k(correct) == pytest.approx((0.5 + 0 + 1) / 3)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))  # unbiased pass@1 = avg
    assert mean_pass_at_k(correct, 2) == pytest.approx((1 + 0 + 1) / 3)
    assert avg_at_k([]) == 0.0


def test_majority_vote_and_maj_at_k():
    assert majority_vote(["5", "7", "5"]) == 0
    assert majority_vote(["3", "4"]) == 0  # tie: the answer that came first
    assert majority_vote(["4", "3", "3", "4"]) == 0  # tie 2-2: "4" came first
    assert majority_vote([None, "2", None, "9", "9"]) == 3  # None never votes
    assert majority_vote([None, None]) is None
    assert majority_vote(["1/2", "2", "0.5"]) == 0 and majority_vote(["2", "1/2", "0.5"]) == 0
    assert majority_vote(["2", "1/2", "0.5"], same=answers_match) == 1  # 1/2 and 0.5 are one answer
    answers = [["5", "7", "5"], ["3", "4"], [None, None], ["2", "\\frac{1}{2}", "0.5"]]
    correct = [[True, False, True], [False, True], [False, False], [False, True, True]]
    # problem 0: "5" wins (right); 1: tie -> "3" (wrong); 2: no answer; 3: string vote -> "2" (wrong)
    assert maj_at_k(answers, correct) == pytest.approx(1 / 4)
    assert maj_at_k(answers, correct, same=answers_match) == pytest.approx(2 / 4)  # 3: 1/2 = 0.5 wins
    with pytest.raises(ValueError):
        maj_at_k(answers, correct[:2])


def test_length_no_answer_and_distinct():
    assert no_answer_fraction(["1", None, "2", None]) == 0.5 and no_answer_fraction([]) == 0.0
    assert mean_length([3, 5, 10]) == 6.0
    a = ["a", "b", "c", "d", "e"]  # 4-grams abcd, bcde
    b = ["a", "b", "c", "d", "a", "b", "c", "d"]  # abcd x2, bcda, cdab, dabc
    assert distinct_ngram_ratio([a, b], 4) == pytest.approx(5 / 7)  # pooled: 5 unique of 7
    assert distinct_ngram_ratio([list(range(10))], 4) == 1.0
    assert distinct_ngram_ratio([["a", "b", "c"]], 4) is None


def test_pass_ks():
    assert pass_ks(1) == [1] and pass_ks(3) == [1, 2, 3] and pass_ks(16) == [1, 2, 4, 8, 16]


def test_summarize_hand_computed():
    def s(extracted, correct, length, response="w1 w2 w3 w4", truncated=False):
        return {"extracted": extracted, "correct": correct, "length": length, "response": response,
                "truncated": truncated}

    problems = [[s("5", True, 10), s("5", True, 20)],
                [s("3", False, 30, truncated=True), s(None, False, 40, response="w1 w2 w3 w4 w5")]]
    m = summarize(problems)
    assert m["problems"] == 2 and m["samples"] == 4 and m["k"] == 2
    assert m["avg@2"] == pytest.approx(0.5) and m["pass@1"] == pytest.approx(0.5) and m["pass@2"] == pytest.approx(0.5)
    assert m["maj@2"] == pytest.approx(0.5)
    assert m["no_answer"] == pytest.approx(0.25) and m["mean_length"] == pytest.approx(25.0)
    assert m["truncated"] == pytest.approx(0.25)
    assert m["distinct_4gram"] == pytest.approx(2 / 5)  # 4-grams: w1-4 x4, w2-5 x1 -> 2 unique of 5
    assert m["solve_none"] == 1 and m["solve_all"] == 1
    assert summarize([]) == {"problems": 0, "samples": 0}
