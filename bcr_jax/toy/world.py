"""The toy world: chains of single-digit operations, a 22-token tokenizer, and deliberately verbose solution traces.

Problems. A chain like ``7-3+5-6`` of 2-4 operations whose running totals all stay in 0..9, so every step is one
``a+b=c`` line over single digits and the answer is one digit. Difficulty = number of operations.

Format. BCR's even at N = 1: the prompt holds ``### Problem k`` sections (bcr.COMPACT_TEMPLATE) and the response
answers each problem in order as ``Answer k::\\boxed{c}``.

Verbose traces, the analogue of R1-style reflection loops: after each step the trace re-checks it a geometric number
of times (``check 3+4=7 ok``, another check with probability `check_prob` after each), never changing the answer.
With `check_prob` = 0.4 there are 0.67 checks per step on average and the checks are about 40% of a trace's tokens
(`redundancy_share` measures it): the part of a trace that a budget can remove without losing accuracy. The
probability is below 1/2 on purpose: greedy decoding then never checks, rather than looping on a coin flip it
always resolves the same way.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from bcr_jax import bcr
from bcr_jax.tokenizer import CharTokenizer

ALPHABET = "0123456789+-=\n"
WORDS = ("### Problem ", "check ", " ok", "Answer ", "::\\boxed{", "}")
CHECK = "check "
DEFAULT_CHECK_PROB = 0.4


def tokenizer() -> CharTokenizer:
    """The toy tokenizer: <pad>, <eos>, six whole-word markers, 14 characters (22 ids)."""
    return CharTokenizer(ALPHABET, WORDS)


def vocab_size() -> int:
    return 2 + len(WORDS) + len(ALPHABET)


@dataclasses.dataclass(frozen=True)
class ToyProblem:
    id: str
    text: str  # "7-3+5"
    steps: tuple[tuple[int, str, int, int], ...]  # (a, op, b, result) per operation
    answer: int

    @property
    def difficulty(self) -> int:
        return len(self.steps)


def make_problem(rng: np.random.Generator, problem_id: str, min_ops: int = 2, max_ops: int = 4) -> ToyProblem:
    total = int(rng.integers(0, 10))
    text, steps = str(total), []
    for _ in range(int(rng.integers(min_ops, max_ops + 1))):
        subtract = bool(rng.integers(2)) if 0 < total < 9 else total == 9
        operand = int(rng.integers(0, total + 1)) if subtract else int(rng.integers(0, 10 - total))
        result = total - operand if subtract else total + operand
        op = "-" if subtract else "+"
        steps.append((total, op, operand, result))
        text += f"{op}{operand}"
        total = result
    return ToyProblem(problem_id, text, tuple(steps), total)


def make_problems(num: int, seed: int, prefix: str = "toy") -> list[ToyProblem]:
    rng = np.random.default_rng(seed)
    return [make_problem(rng, f"{prefix}/{seed}/{i}") for i in range(num)]


def solution(problem: ToyProblem, k: int, rng: np.random.Generator | None, check_prob: float) -> str:
    """Problem k's part of a trace: its steps, each re-checked a geometric number of times, then its answer line."""
    lines = []
    for a, op, b, c in problem.steps:
        step = f"{a}{op}{b}={c}"
        lines.append(step)
        while rng is not None and rng.random() < check_prob:
            lines.append(f"{CHECK}{step} ok")
    lines.append(f"Answer {k}::\\boxed{{{problem.answer}}}")
    return "".join(line + "\n" for line in lines)


def prompt_text(problems) -> str:
    return bcr.pack_problems([p.text for p in problems], bcr.COMPACT_TEMPLATE)


def trace(problems, rng: np.random.Generator | None, check_prob: float = DEFAULT_CHECK_PROB) -> str:
    """The reference response for a packed prompt (rng None: the concise trace, no checks)."""
    return "".join(solution(p, k, rng, check_prob) for k, p in enumerate(problems, start=1))


def count_checks(text: str) -> int:
    return text.count(CHECK)


def redundancy_share(num_prompts: int = 2000, n: int = 1, seed: int = 0, check_prob: float = DEFAULT_CHECK_PROB):
    """Fraction of verbose-trace tokens spent on checks (measured on generated traces)."""
    rng = np.random.default_rng(seed)
    tok = tokenizer()
    total = checks = 0
    for i in range(num_prompts):
        problems = [make_problem(rng, str(i)) for _ in range(n)]
        text = trace(problems, rng, check_prob)
        total += len(tok.encode(text)) + 1  # + EOS
        checks += sum(len(tok.encode(line + "\n")) for line in text.splitlines() if line.startswith(CHECK))
    return checks / total


def trace_lengths(n: int, num_prompts: int, seed: int, check_prob: float = DEFAULT_CHECK_PROB) -> np.ndarray:
    """Token lengths (EOS included) of verbose traces of N-problem prompts."""
    rng = np.random.default_rng(seed)
    tok = tokenizer()
    return np.array([len(tok.encode(trace([make_problem(rng, "") for _ in range(n)], rng, check_prob))) + 1
                     for _ in range(num_prompts)])


def write_problems(path: pathlib.Path, problems) -> pathlib.Path:
    """A local problem file the trainer (`data.source=local`) and the evaluation read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": p.id, "problem": p.text, "answer": str(p.answer), "difficulty": p.difficulty} for p in problems]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_sft_data(path: pathlib.Path, num_examples: int, seed: int, n_mix: dict[int, float],
                   check_prob: float = DEFAULT_CHECK_PROB) -> pathlib.Path:
    """`num_examples` (prompt, verbose response) pairs, N drawn from `n_mix`, for `mode=sft`."""
    rng = np.random.default_rng(seed)
    ns, weights = zip(*sorted(n_mix.items()))
    weights = np.asarray(weights, float) / np.sum(weights)
    lines = []
    for i in range(num_examples):
        n = int(rng.choice(ns, p=weights))
        problems = [make_problem(rng, f"sft/{i}/{k}") for k in range(n)]
        lines.append(json.dumps({"prompt": prompt_text(problems), "response": trace(problems, rng, check_prob)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path
