"""Tests for bcr_jax.grading: the labelled equivalence suite, hostile inputs and the worker pool."""

import collections
import json
import math
import time
from pathlib import Path

import pytest

from bcr_jax import bcr, grading

EQUIVALENCE_FILE = Path(__file__).parent / "data" / "equivalence.jsonl"
TIMEOUT_S = 1.0
NUM_WORKERS = 2
# Scheduling slack on top of the per-answer limit: replacing a killed worker, a loaded CI machine.
SLACK_S = 2.5


@pytest.fixture(scope="module")
def grader():
    with grading.Grader(num_workers=NUM_WORKERS, timeout_s=TIMEOUT_S) as pool:
        yield pool


def _equivalence_pairs() -> list[dict]:
    return [json.loads(line) for line in EQUIVALENCE_FILE.read_text(encoding="utf-8").splitlines()]


def _grade_within_limit(grader, answers, golds):
    """Grades and checks the batch finished within its worst case: every answer at the limit."""
    start = time.monotonic()
    verdicts = grader.grade_batch(answers, golds)
    rounds = math.ceil(len(answers) / NUM_WORKERS)
    assert time.monotonic() - start < rounds * TIMEOUT_S + SLACK_S
    return verdicts


# --------------------------------------------------------------------------------------------------
# The labelled equivalence suite.
# --------------------------------------------------------------------------------------------------


def test_equivalence_suite_is_large_and_covers_both_verdicts_per_category():
    pairs = _equivalence_pairs()
    assert len(pairs) >= 150
    verdicts_by_category = collections.defaultdict(set)
    for pair in pairs:
        verdicts_by_category[pair["category"]].add(pair["expected"])
    assert {
        "fraction_decimal",
        "frac_variants",
        "left_right",
        "degrees",
        "percent",
        "units",
        "intervals",
        "tuples",
        "sets",
        "expressions",
        "text",
        "numbers",
    } <= set(verdicts_by_category)
    assert all(verdicts == {True, False} for verdicts in verdicts_by_category.values())


def test_equivalence_suite(grader):
    pairs = _equivalence_pairs()
    # A generous limit: a legitimate pair must never be failed by a slow CI machine.
    verdicts = grader.grade_batch([p["answer"] for p in pairs], [p["gold"] for p in pairs], timeout_s=20.0)
    wrong = [
        f"{p['category']}: {p['answer']!r} vs gold {p['gold']!r}: got {v}, expected {p['expected']}"
        for p, v in zip(pairs, verdicts)
        if v != p["expected"]
    ]
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------------------------------
# Parent-side checks.
# --------------------------------------------------------------------------------------------------


def test_missing_empty_and_unbalanced_answers_score_false(grader):
    answers = [None, "", "   ", "{1", "1}", "}{", r"\frac{1}{2", r"\{1, 2\}}"]
    golds = ["1", "1", "1", "1", "1", "1", "0.5", r"\{1, 2\}"]
    assert grader.grade_batch(answers, golds) == [False] * len(answers)


def test_answer_length_cap_is_inclusive(grader):
    at_cap = "7" + " " * (grading.DEFAULT_MAX_ANSWER_CHARS - 1)
    assert grader.grade_batch([at_cap, at_cap + " "], ["7", "7"]) == [True, False]


def test_text_helpers():
    assert grading.normalize_text(r" \text{ Yes }. ") == "Yes"
    assert grading.normalize_text(r"$\mathrm{x} + 1$") == "x+1"
    assert grading.strip_math_delimiters(r"\( x \)") == "x"
    assert grading.strip_math_delimiters("$5") == "$5"  # Not a delimiter pair.
    assert grading.braces_balanced(r"\{a\}{b}") and not grading.braces_balanced(r"a}{b")
    assert grading.closing_brace(r"{a\}b}c", 0) == 6
    assert grading.closing_brace("{a{b}", 0) is None


def test_length_mismatch_and_closed_grader_raise():
    pool = grading.Grader(num_workers=1)
    with pytest.raises(ValueError, match="2 answers but 1 golds"):
        pool.grade_batch(["1", "2"], ["1"])
    pool.close()
    pool.close()  # Idempotent.
    with pytest.raises(RuntimeError, match="closed"):
        pool.grade_batch([r"\frac{1}{2}"], ["0.5"])


def test_fork_start_method_is_refused():
    with pytest.raises(ValueError, match="fork"):
        grading.Grader(num_workers=1, start_method="fork")


# --------------------------------------------------------------------------------------------------
# Hostile inputs.
# --------------------------------------------------------------------------------------------------


def test_code_injection_is_never_executed(grader, tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"eval(\"__import__('os').system('touch {marker}')\")",
        f'exec(\'open("{marker}", "w").close()\')',
        f"\\text{{__import__('os').system('touch {marker}')}}",
        f"(lambda: __import__('subprocess').run(['touch', '{marker}']))()",
    ]
    response = "".join(f"Answer {k}::\\boxed{{{p}}}\n" for k, p in enumerate(payloads, start=1))
    answers = bcr.split_answers(response, len(payloads))
    assert answers == payloads
    assert _grade_within_limit(grader, answers, ["0"] * len(answers)) == [False] * len(answers)
    # Golds are trusted, but they go through the same parser: nothing is executed either way.
    assert _grade_within_limit(grader, ["0"] * len(payloads), payloads) == [False] * len(payloads)
    assert not marker.exists()


def test_huge_numbers_score_false_within_the_limit(grader):
    answers = [
        r"9^{9^{9^{9}}}",
        r"10^{10^{10^{10}}} - 10^{10^{10^{10}}}",
        r"\gcd(10^{10^{9}}, 6)",
        r"(10^{10^{10}})!",
        r"\binom{10^{9}}{5 \cdot 10^{8}}",
        r"\frac{1}{2}^{10^{9}}",
    ]
    assert _grade_within_limit(grader, answers, ["1"] * len(answers)) == [False] * len(answers)


def test_megabyte_inputs_are_rejected_cheaply(grader):
    braces = "{" * 2**20
    long_expression = "1+" * 2**19 + "1"
    start = time.monotonic()
    assert bcr.split_answers("Answer 1::\\boxed{" + braces, 1) == [None]
    assert bcr.split_answers(f"Answer 1::\\boxed{{{long_expression}}}", 1) == [long_expression]
    long_reasoning = "Let me think about this carefully. " * 30_000 + "Answer 1::\\boxed{12} Answer 2::\\boxed{x}"
    assert len(long_reasoning) > 2**20
    assert bcr.split_answers(long_reasoning, 2, require_think_close=True) == [None, None]
    assert bcr.split_answers(long_reasoning, 2) == ["12", "x"]
    answers = [braces, "}" * 2**20, long_expression, "x" * 2**20]
    assert grader.grade_batch(answers, ["1"] * len(answers)) == [False] * len(answers)
    assert time.monotonic() - start < 5.0


def test_wrong_markers_and_many_boxes_score_nothing(grader):
    response = (
        "Answer 0::\\boxed{1} Answer 4::\\boxed{1} "  # Out of range: ignored.
        "Answer 1::\\boxed{1}\\boxed{2}\\boxed{3} "  # Hedging: problem 1 is None.
        "Answer 2::\\boxed{2} Answer 3::\\boxed{3} Answer 3::\\boxed{3}"  # Repeated: problem 3 is None.
    )
    answers = bcr.split_answers(response, 3)
    assert answers == [None, "2", None]
    assert grader.grade_batch(answers, ["1", "2", "3"]) == [False, True, False]


def test_overrunning_worker_is_killed_replaced_and_the_pool_keeps_working():
    # Without the soft deadline the towers run until the parent kills their workers.
    with grading.Grader(num_workers=2, timeout_s=0.5, soft_deadline_fraction=None) as pool:
        start = time.monotonic()
        assert pool.grade_batch([r"9^{9^{9^{9}}}", r"10^{10^{10^{10}}} + 1"], ["1", "1"]) == [False, False]
        assert time.monotonic() - start < 0.5 + SLACK_S
        assert pool.num_replaced == 2
        # The replacements grade; a generous limit keeps a loaded CI machine from failing real work.
        answers, golds = [r"\dfrac{3}{4}", "0.7", r"(x+1)^2"], ["0.75", "0.75", "x^2+2x+1"]
        assert pool.grade_batch(answers, golds, timeout_s=20.0) == [True, False, True]
        assert pool.num_replaced == 2


# --------------------------------------------------------------------------------------------------
# Pool variants and the module-level API.
# --------------------------------------------------------------------------------------------------


def test_spawn_workers_grade_too():
    with grading.Grader(num_workers=1, start_method="spawn") as pool:
        assert pool.grade_batch([r"\frac{2}{4}", "3"], ["0.5", "4"]) == [True, False]


def test_module_level_api():
    assert grading.grade(r"\left(1, 2\right)", "(1,2)") is True
    assert grading.grade(r"(2, 1)", "(1,2)") is False
    assert grading.grade_batch([r"50\%", "Yes", None], ["0.5", "yes", "1"], num_workers=1) == [True, True, False]
