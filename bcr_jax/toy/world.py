"""The toy world: chains of single-digit operations solved by rewriting, with deliberately redundant self-checks.

Problems. A chain like ``7-3+5-6`` of 2-4 operations whose running totals all stay in 0..9, so the answer is one
digit. Difficulty = number of operations.

Format. BCR's even at N = 1: the prompt holds ``### Problem k`` sections (bcr.COMPACT_TEMPLATE) and the response
answers each problem in order as ``Answer k::\\boxed{c}``.

Traces: rewriting, so that every line depends only on the line above it. Problem k's part of a response copies its
expression, then rewrites what is left one operation at a time, then answers::

    7-3+5-6
    4+5-6
    check 4+5-6 ok
    9-6
    3
    check 3 ok
    Answer 1::\\boxed{3}

A check (``check <the line above> ok``) repeats the line it follows, so the line after it still reads the same
input: a check costs tokens and can change nothing downstream. That is the analogue of R1-style reflection loops that
the issue asks for: pure redundancy (in the earlier ``a+b=c`` format each check line was one more chance to copy a
wrong operand, and accuracy fell with the number of checks).

Checks are drawn per rewrite line: the first with probability `first_check_prob`, each repeat with
`repeat_check_prob`. Above 1/2 for the first and below it for repeats on purpose: greedy decoding then writes exactly
one check per line instead of looping on a coin flip it always resolves the same way. A share of traces
(`concise_share`, SFT data only) has no checks at all, at every N, so that the check-free style RL may move towards
stays inside the warm start's training distribution even at N = 8.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from bcr_jax import bcr
from bcr_jax.tokenizer import CharTokenizer

ALPHABET = "0123456789+-\n"
WORDS = ("### Problem ", "check ", " ok", "Answer ", "::\\boxed{", "}")
CHECK = "check "


@dataclasses.dataclass(frozen=True)
class Verbosity:
    """How checks are drawn: per rewrite line, a first check with `first`, each further one with `repeat`."""
    first: float = 0.75
    repeat: float = 0.3

    def __post_init__(self):
        for name in ("first", "repeat"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"Verbosity.{name}: must be in [0, 1), got {getattr(self, name)}")

    @property
    def checks_per_line(self) -> float:
        return self.first / (1.0 - self.repeat)


VERBOSE = Verbosity()


def tokenizer() -> CharTokenizer:
    """The toy tokenizer: <pad>, <eos>, six whole-word markers, 13 characters (21 ids)."""
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


def rewrites(problem: ToyProblem) -> list[str]:
    """The lines after the copied expression: what is left after each operation (the last is the answer digit)."""
    lines = []
    for i, (_, _, _, result) in enumerate(problem.steps):
        lines.append(str(result) + "".join(f"{op}{b}" for _, op, b, _ in problem.steps[i + 1:]))
    return lines


def solution(problem: ToyProblem, k: int, rng: np.random.Generator | None, verbosity: Verbosity = VERBOSE) -> str:
    """Problem k's part of a trace (rng None: concise, no checks)."""
    lines = [problem.text]
    for line in rewrites(problem):
        lines.append(line)
        if rng is None:
            continue
        probability = verbosity.first
        while rng.random() < probability:
            lines.append(f"{CHECK}{line} ok")
            probability = verbosity.repeat
    lines.append(f"Answer {k}::\\boxed{{{problem.answer}}}")
    return "".join(line + "\n" for line in lines)


def prompt_text(problems) -> str:
    return bcr.pack_problems([p.text for p in problems], bcr.COMPACT_TEMPLATE)


def trace(problems, rng: np.random.Generator | None, verbosity: Verbosity = VERBOSE) -> str:
    """The reference response for a packed prompt (rng None: the concise trace, no checks)."""
    return "".join(solution(p, k, rng, verbosity) for k, p in enumerate(problems, start=1))


def count_checks(text: str) -> int:
    return text.count(CHECK)


def checks_by_problem(response: str, n: int) -> list[int]:
    """Check lines written for each of the N problems: those before `Answer k::` count for problem k (a problem
    whose answer line never came gets the checks written after the last answer, or 0)."""
    counts, current = [0] * n, 0
    for line in response.splitlines():
        if line.startswith(CHECK) and current < n:
            counts[current] += 1
        elif line.startswith("Answer ") and "::" in line:
            current += 1
    return counts


def redundancy_share(num_prompts: int = 2000, n: int = 1, seed: int = 0, verbosity: Verbosity = VERBOSE) -> float:
    """Fraction of verbose-trace tokens (EOS included) spent on check lines, measured on generated traces."""
    rng = np.random.default_rng(seed)
    tok = tokenizer()
    total = checks = 0
    for i in range(num_prompts):
        problems = [make_problem(rng, str(i)) for _ in range(n)]
        text = trace(problems, rng, verbosity)
        total += len(tok.encode(text)) + 1
        checks += sum(len(tok.encode(line + "\n")) for line in text.splitlines() if line.startswith(CHECK))
    return checks / total


def trace_lengths(n: int, num_prompts: int, seed: int, verbosity: Verbosity | None = VERBOSE) -> np.ndarray:
    """Token lengths (EOS included) of traces of N-problem prompts (verbosity None: concise)."""
    rng = np.random.default_rng(seed)
    tok = tokenizer()
    lengths = []
    for _ in range(num_prompts):
        problems = [make_problem(rng, "") for _ in range(n)]
        text = trace(problems, rng, verbosity) if verbosity is not None else trace(problems, None)
        lengths.append(len(tok.encode(text)) + 1)
    return np.array(lengths)


def write_problems(path: pathlib.Path, problems) -> pathlib.Path:
    """A local problem file the trainer (`data.source=local`) and the evaluation read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": p.id, "problem": p.text, "answer": str(p.answer), "difficulty": p.difficulty} for p in problems]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_sft_data(path: pathlib.Path, num_examples: int, seed: int, n_mix: dict[int, float],
                   verbosity: Verbosity = VERBOSE, concise_share: float = 0.0) -> pathlib.Path:
    """`num_examples` (prompt, response) pairs, N drawn from `n_mix`, a `concise_share` of them without checks."""
    if not 0.0 <= concise_share <= 1.0:
        raise ValueError(f"concise_share: must be in [0, 1], got {concise_share}")
    rng = np.random.default_rng(seed)
    ns, weights = zip(*sorted(n_mix.items()))
    weights = np.asarray(weights, float) / np.sum(weights)
    lines = []
    for i in range(num_examples):
        n = int(rng.choice(ns, p=weights))
        problems = [make_problem(rng, f"sft/{i}/{k}") for k in range(n)]
        response = trace(problems, None) if rng.random() < concise_share else trace(problems, rng, verbosity)
        lines.append(json.dumps({"prompt": prompt_text(problems), "response": response}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
    return path
