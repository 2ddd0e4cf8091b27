"""Tests for bcr_jax.grading: the labelled equivalence suite, hostile inputs and the worker pool."""

import collections
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bcr_jax import bcr, grading

EQUIVALENCE_FILE = Path(__file__).parent / "data" / "equivalence.jsonl"
TIMEOUT_S = 1.0  # CPU seconds per answer.
NUM_WORKERS = 2
# Wall-clock bound on a batch of over-budget answers: each costs at most TIMEOUT_S + 1 s of CPU (the
# soft limit, or the kill one second later), and the 2 shared cores may be busy with other jobs.
LOAD_FACTOR = 4.0
SLACK_S = 5.0
V = grading.Verdict


@pytest.fixture(scope="module")
def grader():
    with grading.Grader(num_workers=NUM_WORKERS, timeout_s=TIMEOUT_S) as pool:
        yield pool


def _equivalence_pairs() -> list[dict]:
    return [json.loads(line) for line in EQUIVALENCE_FILE.read_text(encoding="utf-8").splitlines()]


def _grade_without_stalling(grader, answers, golds, timeout_s=TIMEOUT_S):
    """Verdicts of a batch that must finish within its CPU budget (not at the 30 s backstop)."""
    start = time.monotonic()
    verdicts = grader.grade_batch_verdicts(answers, golds, timeout_s=timeout_s)
    rounds = math.ceil(len(answers) / NUM_WORKERS)
    assert time.monotonic() - start < rounds * (timeout_s + 1.0) * LOAD_FACTOR + SLACK_S
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


def test_missing_empty_and_unbalanced_answers_get_their_verdicts(grader):
    answers = [None, "", "   ", "{1", "1}", "}{", r"\frac{1}{2", r"\{1, 2\}}"]
    golds = ["1", "1", "1", "1", "1", "1", "0.5", r"\{1, 2\}"]
    expected = [V.MISSING] * 3 + [V.UNPARSABLE] * 5
    assert grader.grade_batch_verdicts(answers, golds) == expected
    assert grader.grade_batch(answers, golds) == [False] * len(answers)


def test_answer_length_cap_is_inclusive(grader):
    at_cap = "7" + " " * (grading.DEFAULT_MAX_ANSWER_CHARS - 1)
    assert grader.grade_batch_verdicts([at_cap, at_cap + " "], ["7", "7"]) == [V.EQUAL, V.UNPARSABLE]


def test_verdicts_from_the_workers_and_grade_batch_agrees(grader):
    answers = [r"\frac{1}{2}", r"\frac{1}{3}", "__import__('os')", r"\frac{5}{\text{cm}}", "Yes", "No"]
    golds = ["0.5", "0.5", "0", "5", "yes", "yes"]
    verdicts = grader.grade_batch_verdicts(answers, golds)
    assert verdicts == [V.EQUAL, V.NOT_EQUAL, V.UNPARSABLE, V.UNPARSABLE, V.EQUAL, V.NOT_EQUAL]
    assert grader.grade_batch(answers, golds) == [v is V.EQUAL for v in verdicts]
    assert {v.value for v in V} == {"equal", "not_equal", "missing", "unparsable", "timeout"}
    with pytest.raises(TypeError, match="Verdict.EQUAL"):
        bool(V.NOT_EQUAL)  # `if verdict:` would count every verdict as correct.


def test_text_helpers():
    assert grading.normalize_text(r" \text{ Yes }. ") == "Yes"
    assert grading.normalize_text(r"$\mathrm{x} + 1$") == "x+1"
    assert grading.strip_math_delimiters(r"\( x \)") == "x"
    assert grading.strip_math_delimiters("$5") == "$5"  # Not a delimiter pair.
    assert grading.braces_balanced(r"\{a\}{b}") and not grading.braces_balanced(r"a}{b")
    assert grading.closing_brace(r"{a\}b}c", 0) == 6
    assert grading.closing_brace("{a{b}", 0) is None


def test_length_mismatch_closed_grader_and_bad_budget_raise():
    pool = grading.Grader(num_workers=1)
    with pytest.raises(ValueError, match="2 answers but 1 golds"):
        pool.grade_batch(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        pool.grade_batch([r"\frac{1}{2}"], ["0.5"], timeout_s=0)
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
    assert _grade_without_stalling(grader, answers, ["0"] * len(answers)) == [V.UNPARSABLE] * len(answers)
    # Golds are trusted, but they go through the same parser: nothing is executed either way.
    assert V.EQUAL not in _grade_without_stalling(grader, ["0"] * len(payloads), payloads)
    assert not marker.exists()


def test_huge_numbers_time_out_within_their_cpu_budget(grader):
    answers = [
        r"9^{9^{9^{9}}}",
        r"10^{10^{10^{10}}} - 10^{10^{10^{10}}}",
        r"\gcd(10^{10^{9}}, 6)",
        r"(10^{10^{10}})!",
        r"\binom{10^{9}}{5 \cdot 10^{8}}",
        r"\frac{1}{2}^{10^{9}}",
    ]
    verdicts = _grade_without_stalling(grader, answers, ["1"] * len(answers), timeout_s=0.5)
    assert verdicts == [V.TIMEOUT] * len(answers)


def test_timeout_verdict_under_a_tiny_cpu_budget(grader):
    replaced = grader.num_replaced
    answers, golds = [r"9^{9^{9^{9}}}", r"\frac{1}{2}"], ["1", "0.5"]
    assert grader.grade_batch_verdicts(answers, golds, timeout_s=0.2) == [V.TIMEOUT, V.EQUAL]
    # The soft limit interrupted the tower in Python code: the worker survived it.
    assert grader.num_replaced == replaced
    assert grading.grade_batch_verdicts(answers[:1], golds[:1], timeout_s=0.2, num_workers=1) == [V.TIMEOUT]


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
    assert grader.grade_batch_verdicts(answers, ["1"] * len(answers)) == [V.UNPARSABLE] * len(answers)
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
    # Without the soft deadline the towers run until the kernel's CPU limit (RLIMIT_CPU) kills them.
    with grading.Grader(num_workers=2, timeout_s=0.5, soft_deadline_fraction=None) as pool:
        start = time.monotonic()
        verdicts = pool.grade_batch_verdicts([r"9^{9^{9^{9}}}", r"10^{10^{10^{10}}} + 1"], ["1", "1"])
        assert verdicts == [V.TIMEOUT, V.TIMEOUT]
        assert time.monotonic() - start < (0.5 + 1.0) * LOAD_FACTOR + SLACK_S  # Not the 30 s backstop.
        assert pool.num_replaced == 2
        # The replacements grade; a generous budget keeps a loaded CI machine from failing real work.
        answers, golds = [r"\dfrac{3}{4}", "0.7", r"(x+1)^2"], ["0.75", "0.75", "x^2+2x+1"]
        assert pool.grade_batch(answers, golds, timeout_s=20.0) == [True, False, True]
        assert pool.num_replaced == 2


def test_wall_clock_backstop_kills_a_worker_hung_outside_the_cpu():
    with grading.Grader(num_workers=1, timeout_s=1.0, backstop_s=0.5, startup_timeout_s=30.0) as pool:
        assert pool.grade_batch_verdicts(["0.3"], ["0.4"]) == [V.NOT_EQUAL]  # The worker is ready.
        [worker] = pool._workers
        os.kill(worker.process.pid, signal.SIGSTOP)  # Stopped: it uses no CPU, so only the backstop helps.
        start = time.monotonic()
        assert pool.grade_batch_verdicts([r"\frac{1}{2}"], ["0.5"]) == [V.TIMEOUT]
        assert time.monotonic() - start < 0.5 + SLACK_S
        assert pool.num_replaced == 1
        assert pool.grade_batch_verdicts([r"\frac{1}{2}"], ["0.5"]) == [V.EQUAL]


# --------------------------------------------------------------------------------------------------
# Golds that math-verify 0.9 truncates, and check_golds.
# --------------------------------------------------------------------------------------------------


def test_text_groups_are_rewritten_so_the_whole_expression_is_parsed():
    rewrite = grading.rewrite_text_groups
    assert rewrite(r"1-\frac{1}{\mathrm{e}}") == r"1-\frac{1}{e}"
    assert rewrite(r"\int_0^1 x\,\mathrm{d}x") == r"\int_0^1 x\,dx"
    assert rewrite(r"2\mathrm{i}") == "2i"  # math-verify alone reads 2.
    assert rewrite(r"\operatorname{sin}x").split() == [r"\sin", "x"]
    assert rewrite(r"5\,\mathrm{m}/\mathrm{s}^{2}") == "5"
    assert rewrite(r"(3\text{ cm}, 4\text{ cm})") == "(3, 4)"
    assert rewrite(r"12\text{ dollars}") == "12"
    assert rewrite(r"\text{(C)}").strip() == "(C)"
    assert rewrite(r"50\text{ percent}") == r"50\%"


def test_golds_with_mathrm_groups_are_parsed_whole(grader):
    pairs = [
        ("1-e^{-1}", r"1-\frac{1}{\mathrm{e}}", V.EQUAL),
        (r"\frac{e-1}{e}", r"1-\frac{1}{\mathrm{e}}", V.EQUAL),
        ("e^{1/2}", r"\sqrt{\mathrm{e}}", V.EQUAL),
        ("2e^{-2}", r"\frac{2}{\mathrm{e}^{2}}", V.EQUAL),
        (r"\frac{2}{\mathrm{e}^{2}}", "2e^{-2}", V.EQUAL),
        (r"\int_0^1 x\,\mathrm{d}x", r"\frac{1}{2}", V.EQUAL),
        (r"\sin x", r"\operatorname{sin} x", V.EQUAL),
        ("1+e^{-1}", r"1-\frac{1}{\mathrm{e}}", V.NOT_EQUAL),
        ("1", r"1-\frac{1}{\mathrm{e}}", V.NOT_EQUAL),
        ("e^{-1/2}", r"\sqrt{\mathrm{e}}", V.NOT_EQUAL),
        ("2e^{2}", r"\frac{2}{\mathrm{e}^{2}}", V.NOT_EQUAL),
        (r"\cos x", r"\operatorname{sin} x", V.NOT_EQUAL),
        # Answers get the same rewriting: before it, math-verify truncated these to 2 and 1/2.
        (r"2\mathrm{i}", "2", V.NOT_EQUAL),
        (r"x + \text{a}\frac{1}{2}", "0.5", V.NOT_EQUAL),
    ]
    verdicts = grader.grade_batch_verdicts([a for a, _, _ in pairs], [g for _, g, _ in pairs], timeout_s=20.0)
    wrong = [f"{a!r} vs {g!r}: got {v}, expected {e}" for (a, g, e), v in zip(pairs, verdicts) if v is not e]
    assert not wrong, "\n".join(wrong)


def test_check_golds_counts_golds_that_do_not_parse_whole(grader):
    golds = [
        r"1-\frac{1}{\mathrm{e}}",  # Complete once rewritten.
        "x + c",  # "c" is in math-verify's list of units: it is dropped, leaving "x +".
        r"\frac{5}{\text{cm}}",  # A unit as a denominator leaves \frac{5}{}.
        "42",
        "Yes",
        r"\left(\frac{1}{2}, 3\right]",
        "x + c",
    ]
    report = grader.check_golds(golds, max_examples=1)
    assert (report.num_golds, report.num_incomplete, report.incomplete) == (7, 3, (1, 2, 6))
    assert not report.ok
    assert len(report.examples) == 1 and report.examples[0][:2] == (1, "x + c")
    assert "x +" in report.examples[0][2]
    assert str(report).startswith("3 of 7 golds do not parse to a complete expression; e.g. #1 'x + c'")
    assert grader.check_golds([r"\sqrt{\mathrm{e}}", "7", r"\{1, 2\}"]).ok
    assert grading.check_golds(golds[:3], num_workers=1).incomplete == (1, 2)


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
    assert grading.grade_batch_verdicts([r"50\%", None], ["0.5", "1"], num_workers=1) == [V.EQUAL, V.MISSING]


def test_grading_from_a_script_without_a_main_guard_and_from_python_c(tmp_path):
    # spawn/forkserver workers would re-run this script's top level (and die bootstrapping) if they
    # re-imported the caller's __main__.
    script = tmp_path / "grade_me.py"
    script.write_text(
        textwrap.dedent(
            """
            from bcr_jax import grading
            print(grading.grade("1/2", "0.5"))
            with grading.Grader(1, start_method="spawn") as pool:
                print(pool.grade(r"\\frac{1}{3}", "0.5"))
            """
        )
    )
    one_liner = 'from bcr_jax import grading; print(grading.grade("1/2", "0.5"))'
    pipes = {"cwd": tmp_path, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    runs = [
        subprocess.Popen([sys.executable, str(script)], **pipes),
        subprocess.Popen([sys.executable, "-c", one_liner], **pipes),
    ]
    (script_out, script_err), (c_out, c_err) = (run.communicate(timeout=120) for run in runs)
    assert (runs[0].returncode, script_out.split()) == (0, ["True", "False"]), script_err
    assert (runs[1].returncode, c_out.split()) == (0, ["True"]), c_err
