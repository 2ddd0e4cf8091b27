"""Generated problem sources: small arithmetic worlds with integer answers, for tests and CPU-scale runs.

``digit-sums``: ``a+b`` (or ``a+b-c``) with every operand and running total in 0..9, so every answer is a single
digit and a policy that guesses uniformly is right one time in ten -- a world where even a random model earns
some reward, so every GRPO step carries a learning signal. Difficulty = number of operations.
"""

from __future__ import annotations

import numpy as np

from bcr_jax.data.problems import Problem

PREFIX = "synthetic:"


def _digit_sum(rng: np.random.Generator, max_operations: int) -> tuple[str, int, int]:
    operations = int(rng.integers(1, max_operations + 1))
    total = int(rng.integers(0, 10))
    text = str(total)
    for _ in range(operations):
        if rng.integers(2) and total > 0:
            operand = int(rng.integers(0, total + 1))
            total -= operand
            text += f"-{operand}"
        else:
            operand = int(rng.integers(0, 10 - total))
            total += operand
            text += f"+{operand}"
    return text, total, operations


GENERATORS = {
    "digit-sums": lambda rng: _digit_sum(rng, max_operations=1),
    "digit-chains": lambda rng: _digit_sum(rng, max_operations=3),
}


def is_synthetic(source: str) -> bool:
    return source.startswith(PREFIX)


def generate_problems(source: str, num_problems: int, seed: int = 0) -> list[Problem]:
    """``num_problems`` problems of the generator named by ``source`` (``"synthetic:<name>"``), seeded."""
    name = source.removeprefix(PREFIX)
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic source {source!r}; choose from "
                         f"{', '.join(PREFIX + g for g in GENERATORS)}")
    if num_problems < 1:
        raise ValueError(f"num_problems must be >= 1, got {num_problems}")
    rng = np.random.default_rng([seed, len(name)])
    problems = []
    for index in range(num_problems):
        text, answer, difficulty = GENERATORS[name](rng)
        problems.append(Problem(f"{name}/{seed}/{index}", text, str(answer), float(difficulty), source))
    return problems
