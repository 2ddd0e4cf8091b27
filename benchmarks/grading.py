"""Grading throughput: answers graded per second in one rollout-sized batch.

    python benchmarks/grading.py [--num-workers N] [--timeout-s S] [--batch-size 512] [--repeats 3]
                                 [--module bcr_jax.grading ...] [--mixes plain adversarial]

Two mixes, each of unique answer/gold pairs (so the workers' parse caches do not flatter the
numbers):

* plain: fractions vs decimals, integers, polynomials, intervals, tuples, percentages, radicals and
  yes/no answers, about half of them equivalent to their gold;
* adversarial: another plain mix with a ``--hostile-fraction`` of the answers replaced by hostile
  ones (power towers, giant factorials and gcds, a megabyte of braces, code injection, unbalanced
  braces).

To keep grading under 5% of a training step of S seconds that grades B answers, the rate must be
above B / (0.05 S).

Each mix is graded ``--repeats`` times (fresh pairs each time) and the median rate is reported with
its spread (slowest-fastest repeat), since the benchmark machine may be shared. ``--module`` grades
with other copies of the grading module (before/after comparisons), their batches interleaved (the
order rotating) so that all see the same load, e.g. against an earlier commit's::

    mkdir -p /tmp/old && git show COMMIT:bcr_jax/grading.py > /tmp/old/old_grading.py
    PYTHONPATH=/tmp/old python benchmarks/grading.py --num-workers 2 --module old_grading bcr_jax.grading
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import numpy as np

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


def _measure(grader, answers: list[str], golds: list[str]) -> tuple[float, int]:
    replaced_before = grader.num_replaced
    start = time.perf_counter()
    grader.grade_batch(answers, golds)
    return time.perf_counter() - start, grader.num_replaced - replaced_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=None, help="default: CPU count, at most 16")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--hostile-fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3, help="batches per mix; the median rate is reported")
    parser.add_argument(
        "--module", nargs="+", default=["bcr_jax.grading"],
        help="grading modules to benchmark; with several, their batches alternate so they share the load",
    )
    parser.add_argument("--mixes", nargs="+", default=["plain", "adversarial"], choices=["plain", "adversarial"])
    args = parser.parse_args()

    graders = {}
    try:
        for name in args.module:
            graders[name] = importlib.import_module(name).Grader(args.num_workers, timeout_s=args.timeout_s)
            graders[name].grade_batch(*plain_mix(4 * graders[name].num_workers, seed=0))  # Started and warm.
        num_workers = next(iter(graders.values())).num_workers
        print(f"workers={num_workers} timeout_s={args.timeout_s} batch={args.batch_size} repeats={args.repeats}")
        for mix in args.mixes:
            rates = {name: [] for name in graders}
            replaced = dict.fromkeys(graders, 0)
            for repeat in range(args.repeats):
                if mix == "plain":
                    answers, golds = plain_mix(args.batch_size, seed=1 + 2 * repeat)
                else:
                    seed = 2 + 2 * repeat
                    answers, golds, num_hostile = adversarial_mix(args.batch_size, seed, args.hostile_fraction)
                names = list(graders)  # Interleaved, the order rotating: each module sees the same load.
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    seconds, num_replaced = _measure(graders[name], answers, golds)
                    rates[name].append(args.batch_size / seconds)
                    replaced[name] += num_replaced
            hostile = f" ({num_hostile} hostile)" if mix == "adversarial" else ""
            for name in graders:
                print(
                    f"{mix}{hostile} {name}: {statistics.median(rates[name]):.1f} answers/s median, spread "
                    f"{min(rates[name]):.1f}-{max(rates[name]):.1f} over "
                    f"[{', '.join(f'{r:.1f}' for r in rates[name])}], workers replaced: {replaced[name]}"
                )
    finally:
        for grader in graders.values():
            grader.close()


if __name__ == "__main__":
    main()
