"""Grading verdicts must not depend on how busy the machine is: budgets count CPU time, not wall time."""

import subprocess
import sys

from bcr_jax import grading

V = grading.Verdict
# CPU seconds per answer. The slowest pair below needs ~0.2 s alone; on 2 cores shared by 16 workers
# and 2 busy loops it needs several wall-clock seconds, which a wall-clock limit would call a timeout.
TIMEOUT_S = 1.0
# Equivalent pairs of the kinds math-verify is slow on (equations, intervals, matrices, sums,
# polynomials, tuples, sets): 30-200 ms each alone on one core of the development machine.
SLOW_PAIRS = [
    (r"(x+1)^6", r"x^6+6x^5+15x^4+20x^3+15x^2+6x+1"),
    (r"(x-1)(x+2)(x-3)", r"x^3 - 2x^2 - 5x + 6"),
    (r"(x-1)(x+2)(x-3)(x+4)", r"x^4 + 2x^3 - 13x^2 - 14x + 24"),
    (r"y = -\frac{3}{4}x + \frac{5}{2}", r"3x + 4y = 10"),
    (r"y = \frac{1}{2}x + 3", r"y = 0.5x + 3"),
    (
        r"\begin{pmatrix} 1 & \frac{1}{2} & 0 \\ \frac{1}{3} & 1 & 2 \\ 0 & 0.5 & 1 \end{pmatrix}",
        r"\begin{pmatrix} 1 & 0.5 & 0 \\ 1/3 & 1 & 2 \\ 0 & \frac{1}{2} & 1 \end{pmatrix}",
    ),
    (
        r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
        r"\begin{pmatrix} \frac{2}{2} & 2 \\ 3 & 2^2 \end{pmatrix}",
    ),
    (
        r"\left(-\infty, -\frac{1}{2}\right) \cup \left(\frac{1}{3}, 2\right] \cup (5, \infty)",
        r"(-\infty,-0.5)\cup(1/3,2]\cup(5,\infty)",
    ),
    (r"(-\infty, -2) \cup (3, \infty)", r"(-\infty,-2)\cup(3,+\infty)"),
    (r"\sum_{k=1}^{n} k", r"\frac{n(n+1)}{2}"),
    (r"\sum_{k=1}^{n} k^2", r"\frac{n(n+1)(2n+1)}{6}"),
    (r"\sum_{k=1}^{\infty} \frac{1}{2^k}", "1"),
    (r"\left(\frac{1}{2}, \frac{\sqrt{3}}{2}, 1\right)", r"(0.5, \frac{\sqrt{3}}{2}, 1)"),
    (r"\{(1,2), (3,4)\}", r"\{(3,4),(1,2)\}"),
    (r"\sqrt{2}\sin\left(x + \frac{\pi}{4}\right)", r"\sin x + \cos x"),
    (r"\int_0^1 x^2 \, dx", r"\frac{1}{3}"),
]


def test_verdicts_are_the_same_on_an_idle_and_on_an_overloaded_machine():
    answers, golds = [a for a, _ in SLOW_PAIRS], [g for _, g in SLOW_PAIRS]
    with grading.Grader(num_workers=1, timeout_s=TIMEOUT_S) as pool:
        idle = pool.grade_batch_verdicts(answers, golds)
    assert idle == [V.EQUAL] * len(SLOW_PAIRS)

    # 8 workers per core of the 2-core development machine, competing with two busy loops.
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with grading.Grader(num_workers=16, timeout_s=TIMEOUT_S) as pool:
            loaded = pool.grade_batch_verdicts(answers, golds)
            replaced = pool.num_replaced
        assert all(burner.poll() is None for burner in burners), "a CPU burner died: the machine was not loaded"
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert loaded == idle
    assert replaced == 0
