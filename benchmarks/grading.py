"""Grading throughput: answers graded per second in one rollout-sized batch.

    python benchmarks/grading.py [--num-workers N] [--timeout-s S] [--batch-size 512]

Two mixes, each of unique answer/gold pairs (so the workers' parse caches do not flatter the
numbers):

* plain: fractions vs decimals, integers, polynomials, intervals, tuples, percentages, radicals and
  yes/no answers, about half of them equivalent to their gold;
* adversarial: another plain mix with a ``--hostile-fraction`` of the answers replaced by hostile
  ones (power towers, giant factorials and gcds, a megabyte of braces, code injection, unbalanced
  braces).

To keep grading under 5% of a training step of S seconds that grades B answers, the rate must be
above B / (0.05 S).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bcr_jax import grading

HOSTILE_ANSWERS = (
    r"9^{9^{9^{9}}}",
    r"(10^{10^{10}})!",
    r"\gcd(10^{10^{9}}, 6)",
    "{" * 2**20,
    "__import__('os').system('true')",
    r"\frac{1}{2",
)


def _pair(rng: np.random.Generator) -> tuple[str, str]:
    """One (answer, gold) pair of a random kind; equivalent with probability 1/2."""
    a, b = (int(x) for x in rng.integers(2, 500, size=2))
    same = bool(rng.integers(2))
    kind = int(rng.integers(8))
    if kind == 0:
        gold = rf"\frac{{{a}}}{{{2 ** (b % 6)}}}"
        return (str(a / 2 ** (b % 6)) if same else str(a / 2 ** (b % 6) + 0.5)), gold
    if kind == 1:
        return (f"x = {a * b}" if same else str(a * b + 1)), str(a * b)
    if kind == 2:
        return (f"(x + {a})^2" if same else f"(x + {a + 1})^2"), f"x^2 + {2 * a}x + {a * a}"
    if kind == 3:
        return (rf"\left({a}, {a + b}\right]" if same else f"[{a}, {a + b}]"), f"({a}, {a + b}]"
    if kind == 4:
        return (rf"\left({a},{b}\right)" if same else f"({b}, {a})"), f"({a}, {b})"
    if kind == 5:
        return (str(a / 1000) if same else str(a / 100)), rf"{a / 10}\%"
    if kind == 6:
        return (rf"\sqrt{{{a * a * b}}}" if same else rf"\sqrt{{{a * b}}}"), rf"{a}\sqrt{{{b}}}"
    return ("yes" if same else "no"), "Yes"


def plain_mix(size: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    answers, golds = zip(*(_pair(rng) for _ in range(size)))
    return list(answers), list(golds)


def adversarial_mix(size: int, seed: int, hostile_fraction: float) -> tuple[list[str], list[str], int]:
    answers, golds = plain_mix(size, seed)
    rng = np.random.default_rng(seed)
    hostile = rng.choice(size, size=int(round(size * hostile_fraction)), replace=False)
    for n, index in enumerate(hostile):
        answers[index] = HOSTILE_ANSWERS[n % len(HOSTILE_ANSWERS)]
    return answers, golds, len(hostile)


def _measure(grader: grading.Grader, answers: list[str], golds: list[str]) -> tuple[float, int]:
    replaced_before = grader.num_replaced
    start = time.perf_counter()
    grader.grade_batch(answers, golds)
    return time.perf_counter() - start, grader.num_replaced - replaced_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=None, help="default: CPU count, at most 16")
    parser.add_argument("--timeout-s", type=float, default=grading.DEFAULT_TIMEOUT_S)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--hostile-fraction", type=float, default=0.1)
    args = parser.parse_args()

    with grading.Grader(args.num_workers, timeout_s=args.timeout_s) as grader:
        grader.grade_batch(*plain_mix(4 * grader.num_workers, seed=0))  # Workers started and warm.
        print(f"workers={grader.num_workers} timeout_s={args.timeout_s} batch={args.batch_size}")
        seconds, replaced = _measure(grader, *plain_mix(args.batch_size, seed=1))
        print(
            f"plain       : {args.batch_size / seconds:8.1f} answers/s ({seconds:.2f} s, workers replaced: {replaced})"
        )
        answers, golds, num_hostile = adversarial_mix(args.batch_size, seed=2, hostile_fraction=args.hostile_fraction)
        seconds, replaced = _measure(grader, answers, golds)
        print(
            f"adversarial : {args.batch_size / seconds:8.1f} answers/s "
            f"({seconds:.2f} s, {num_hostile} hostile, workers replaced: {replaced})"
        )


if __name__ == "__main__":
    main()
