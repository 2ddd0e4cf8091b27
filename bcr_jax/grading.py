"""Grading model answers against gold answers: math-verify in sandboxed, CPU-time-limited workers.

Answers are model output, so they are untrusted: nothing here evaluates them as code. The only
route from text to mathematics is math-verify's LaTeX parser (``latex2sympy2_extended`` feeding
sympy); its ``ExprExtractionConfig`` is never used because it hands raw text to
``sympy.parse_expr``, which calls ``eval``.

Verdicts
--------
Every answer gets a :class:`Verdict`: ``equal``, ``not_equal``, ``missing`` (no answer: ``None`` or
blank), ``unparsable`` (too long, unbalanced braces, or nothing math-verify can read as a complete
expression) or ``timeout`` (grading ran out of its CPU-time or memory budget, or its worker died).
:meth:`Grader.grade_batch` returns ``verdict is Verdict.EQUAL`` per answer.

How one (answer, gold) pair is decided
--------------------------------------
1. *Cheap checks in the parent.* A missing or blank answer is ``missing``; one longer than
   ``max_answer_chars`` (1000 by default: no real final answer is that long, but a megabyte of
   braces is) or with unbalanced braces is ``unparsable``, without leaving the parent.
2. *Text comparison in the parent.* Answers equal to the gold after :func:`normalize_text` are
   ``equal``, and two plain integers (the most common answer type) are compared by value: the verdict
   math-verify would give, without the round trip. Word answers -- golds made only of letters and
   spaces, at least two letters ("Yes", "East", "odd") -- are decided here, case-insensitively:
   math-verify reads a word as a product of symbols and would call "Yes" and "sey" equal.
3. *math-verify in a worker process.* Both sides are wrapped as ``\\boxed{...}`` and compared with
   ``math_verify.verify(gold, answer)`` (fractions vs decimals, ``\\dfrac``, ``\\left(``, degrees,
   percent, units, intervals, tuples, sets, expressions, matrices). An answer whose parse is not a
   complete expression (no sympy object, unbalanced braces or a dangling operator left after
   math-verify's own normalisation) is ``unparsable``, never compared: a truncated parse can equal
   the gold by accident.

Normalisations where math-verify alone gets the mathematically wrong verdict (both sides, before
step 3; each is covered by pairs in ``tests/data/equivalence.jsonl`` or ``tests/test_grading.py``):

* Surrounding math delimiters (``$...$``, ``\\(...\\)``, ``\\[...\\]``) are removed, since gold
  answers of some sets carry them and math-verify would otherwise not see a single boxed formula.
* ``°`` becomes ``^\\circ`` and ``\\varnothing`` becomes ``\\emptyset`` (math-verify parses
  neither), and thin-space thousands separators (``1\\,000``) are removed.
* Text groups (``\\text{}``, ``\\mathrm{}``, ``\\mbox{}``, ``\\operatorname{}`` and relatives) are
  rewritten by :func:`rewrite_text_groups`. math-verify 0.9 turns ``\\mathrm`` into ``\\text`` and
  then deletes everything from the first ``\\text{`` to the end of the string as a "unit" whenever
  the string ends in a brace, so ``1-\\frac{1}{\\mathrm{e}}`` parses as ``1-\\frac{1}{`` and
  ``2\\mathrm{i}`` as ``2``. Single letters are unwrapped (``\\mathrm{e}`` -> ``e``, ``\\mathrm{d}``
  -> ``d``), function names become commands (``\\operatorname{sin}`` -> ``\\sin``), units and a
  trailing top-level text group are dropped (what math-verify meant to do), other text is unwrapped.
* A free symbol named ``i`` is the imaginary unit (math-verify keeps it a plain symbol, so
  ``\\sqrt{-4}`` and ``2i`` differ).
* Intervals and sets compare equal to the relations describing them (``0 < x < 1`` vs ``(0, 1)``),
  in both directions (math-verify's ``allow_set_relation_comp``).
* If a side carries a percent sign and the first comparison fails, the comparison is repeated with
  the percent signs dropped: math-verify accepts ``50\\%`` for ``50`` but not ``12.5\\%`` for
  ``12.5``, while ``0.5`` for ``50\\%`` already passes the first comparison.

Golds are trusted dataset text, but some still do not parse to a complete expression;
:func:`check_golds` counts them (with examples) so a data loader can report them at load time.

Limits: CPU time, not wall time
-------------------------------
Workers are started from a ``forkserver`` (``spawn`` where unavailable; never ``fork``, which is
unsafe once JAX threads run in the parent) that has math-verify preloaded, so the import cost is
paid once per pool and a replacement worker starts in milliseconds. Each worker grades one answer
at a time. Its budget is ``timeout_s`` seconds of *its own process's CPU time*, so a loaded machine
(other jobs, more workers than cores) slows grading down but never changes a verdict:

1. *Soft limit* (``ITIMER_PROF``, at ``soft_deadline_fraction * timeout_s`` of CPU time, 3/4 by
   default): SIGPROF raises a BaseException that aborts slow-but-interruptible sympy work; verdict
   ``timeout``, and the worker carries on with the next answer.
2. *Hard limit* (``RLIMIT_CPU``, whole seconds, at least one second after ``timeout_s``): the
   kernel kills a worker stuck in C code that never returns to the interpreter; verdict
   ``timeout``, and the parent starts a replacement.
3. *Wall-clock backstop* in the parent (``max(10 * timeout_s, 30 s)`` from dispatch by default):
   kills a worker hung outside the CPU (blocked, stopped). Time an answer spends queued for a free
   worker is not counted: the clock starts when it is sent.

An address-space limit turns a runaway big integer into a MemoryError (verdict ``timeout``) instead
of swapping the host. So one adversarial answer (``9^{9^{9^{9}}}``, a megabyte of braces) costs at
most about ``timeout_s`` CPU seconds of one worker and cannot stall or crash training.

Grading from any caller
-----------------------
``spawn`` and ``forkserver`` children normally re-import the parent's ``__main__`` module, so a
plain script that calls :func:`grade` at top level without an ``if __name__ == "__main__"`` guard
would re-run itself in every worker and die with multiprocessing's bootstrapping error. Workers need
nothing from the caller's main module, so their start-up data omits it (see
:func:`_omit_main_module_for_workers`), and :func:`grade` works from any script, ``python -c`` or a
notebook.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import os
import re
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MAX_ANSWER_CHARS = 1000
DEFAULT_MEMORY_LIMIT_MB = 2048
# The soft (in-worker, SIGPROF) deadline as a fraction of the CPU-time budget: an answer costs
# what it did when the limits were wall-clock ones (3/4 of timeout_s). The hard CPU limit
# (RLIMIT_CPU) comes at least a second after timeout_s: it has whole-second granularity, and a
# SIGPROF handler runs only once a long C-level operation (a big-integer multiply) returns.
DEFAULT_SOFT_DEADLINE_FRACTION = 0.75
# The parent's wall-clock backstop per answer: max(factor * timeout_s, minimum). Generous, because
# it exists only for workers hung outside the CPU; on a loaded machine wall time >> CPU time.
BACKSTOP_FACTOR = 10.0
BACKSTOP_MIN_S = 30.0
_WORKER_NAME = "bcr-grading-worker"
_READY = "ready"


class Verdict(enum.Enum):
    """Why an answer scored what it did (see the module docstring)."""

    EQUAL = "equal"
    NOT_EQUAL = "not_equal"
    MISSING = "missing"  # No answer: None or blank.
    UNPARSABLE = "unparsable"  # Too long, unbalanced braces, or no complete expression.
    TIMEOUT = "timeout"  # Out of CPU time or memory, or the worker died.

    def __bool__(self) -> bool:
        # Every enum member is truthy, so ``if verdict:`` would silently count NOT_EQUAL as correct.
        raise TypeError("a Verdict has no truth value; compare with `is Verdict.EQUAL` or use grade_batch()")


@dataclasses.dataclass(frozen=True)
class GoldReport:
    """What :func:`check_golds` found.

    Attributes:
      num_golds: Golds checked.
      num_incomplete: Golds that do not parse to a complete expression (they can never be matched
        by a correct answer, or match wrong ones).
      incomplete: Indices (into the checked sequence) of those golds.
      examples: Up to ``max_examples`` ``(index, gold, what math-verify made of it)``.
    """

    num_golds: int
    num_incomplete: int
    incomplete: tuple[int, ...]
    examples: tuple[tuple[int, str, str], ...]

    @property
    def ok(self) -> bool:
        return self.num_incomplete == 0

    def __str__(self) -> str:
        summary = f"{self.num_incomplete} of {self.num_golds} golds do not parse to a complete expression"
        if not self.examples:
            return summary
        return summary + "; e.g. " + "; ".join(f"#{i} {gold!r}: {why}" for i, gold, why in self.examples)


# --------------------------------------------------------------------------------------------------
# Text helpers (parent side; no parsing of mathematics).
# --------------------------------------------------------------------------------------------------

_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_WORD_ANSWER = re.compile(r"[A-Za-z][A-Za-z ]*[A-Za-z]")
_INTEGER = re.compile(r"[+-]?\d+")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def closing_brace(text: str, open_index: int, end: int | None = None) -> int | None:
    """Index one past the brace closing ``text[open_index] == '{'``, or None if not before ``end``.

    LaTeX escapes are honoured: ``\\{`` and ``\\}`` are literal characters, ``\\\\`` is one.
    """
    depth = 0
    for token in _BRACE_TOKEN.finditer(text, open_index, len(text) if end is None else end):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return token.end()
    return None


def braces_balanced(text: str) -> bool:
    """Whether every unescaped brace in ``text`` is matched (``"a}{b"`` is not)."""
    return closing_brace("{" + text + "}", 0) == len(text) + 2


def _brace_depth(text: str, end: int) -> int:
    depth = 0
    for token in _BRACE_TOKEN.finditer(text, 0, end):
        depth += {"{": 1, "}": -1}.get(token.group(), 0)
    return depth


def strip_math_delimiters(text: str) -> str:
    """Removes one pair of surrounding ``$``, ``$$``, ``\\(...\\)`` or ``\\[...\\]``."""
    text = text.strip()
    for opening, closing in _MATH_DELIMITERS:
        if len(text) >= len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
            return text[len(opening) : len(text) - len(closing)].strip()
    return text


def normalize_text(text: str) -> str:
    """The form used for text comparison: ``\\text{}``-like wrappers, ``$``, whitespace and a
    trailing full stop removed."""
    text = _TEXT_COMMAND.sub(r"\1", text)
    return "".join(text.replace("$", "").split()).rstrip(".")


def _gold_decided_in_parent(gold: str) -> bool:
    """Whether every answer to this gold is decided by text in the parent (integers, words)."""
    normalized = normalize_text(gold)
    plain = _TEXT_COMMAND.sub(r"\1", strip_math_delimiters(gold)).strip().rstrip(".")
    return bool(_INTEGER.fullmatch(normalized) or _WORD_ANSWER.fullmatch(plain))


def _decide_in_parent(answer: str | None, gold: str, max_answer_chars: int) -> Verdict | None:
    """Steps 1 and 2 of the module docstring: a verdict, or None to ask math-verify."""
    if not isinstance(answer, str) or not answer.strip():
        return Verdict.MISSING
    if len(answer) > max_answer_chars or not braces_balanced(answer):
        return Verdict.UNPARSABLE
    normalized_answer, normalized_gold = normalize_text(answer), normalize_text(gold)
    if normalized_answer == normalized_gold:
        return Verdict.EQUAL
    if _INTEGER.fullmatch(normalized_answer) and _INTEGER.fullmatch(normalized_gold):
        return Verdict.EQUAL if int(normalized_answer) == int(normalized_gold) else Verdict.NOT_EQUAL
    plain_gold = _TEXT_COMMAND.sub(r"\1", strip_math_delimiters(gold)).strip().rstrip(".")
    if _WORD_ANSWER.fullmatch(plain_gold):
        return Verdict.EQUAL if normalized_answer.casefold() == normalized_gold.casefold() else Verdict.NOT_EQUAL
    return None


# --------------------------------------------------------------------------------------------------
# LaTeX normalisation (runs in the workers; text rewriting only, nothing is evaluated).
# --------------------------------------------------------------------------------------------------

_TEXT_GROUP = re.compile(r"\\(operatorname\*?|text(?:rm|it|bf|sf|up|normal)?|math(?:rm|it|bf|sf|normal)|mbox)\s*\{")
_TEXT_SPACING = re.compile(r"~|\\[,;:!> ]|\\q?quad(?![A-Za-z])")
# Functions latex2sympy reads as ``\\sin`` but not as ``\\operatorname{sin}`` / ``\\mathrm{sin}``.
_FUNCTION_NAMES = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh arcsinh arccosh arctanh ln log exp gcd lcm max min"
    .split()
)
_PERCENT_WORDS = frozenset({"%", "\\%", "percent", "percentage", "pct"})
# What may follow a trailing unit group: a power (``\\text{ cm}^2``), spaces, a full stop.
_AFTER_TRAILING_GROUP = re.compile(r"\s*(?:\^\s*(?:\d|\{\s*\d\s*\}))?\s*\.?\s*")
_UNIT_POWER = re.compile(r"\s*\^\s*(?:\d|\{\s*\d\s*\})")
_UNIT_SEPARATORS = re.compile(r"\s+|/|\*|\\cdot(?![A-Za-z])")
_OWN_UNITS = ("cm", "m", "mm", "km", "kg", "g", "s", "sec", "min", "hour", "day", "year", "degree", "unit", "inch")


@functools.cache
def _units() -> frozenset[str]:
    """math-verify's own unit words (those it strips after a number), single-word ones only."""
    try:
        from latex2sympy2_extended.math_normalization import units
    except ImportError:  # A renamed private list must not break grading; fall back to common units.
        units = _OWN_UNITS
    return frozenset(u for u in (unit.strip() for unit in units) if re.fullmatch(r"[A-Za-z]+", u))


def _is_unit(words: str) -> bool:
    """Whether text like ``cm^2``, ``m/s`` or ``square feet`` consists of unit words only."""
    tokens = [t for t in _UNIT_SEPARATORS.split(_UNIT_POWER.sub(" ", words)) if t]
    units = _units()
    return bool(tokens) and all(
        t in units or (t.endswith("s") and t[:-1] in units) or (t.endswith("es") and t[:-2] in units) for t in tokens
    )


_UNIT_TAIL_SEPARATORS = (" ", "~", "/", "\\,", "\\;", "\\:", "\\!", "\\ ", "\\cdot")
_UNIT_TAIL_POWER = re.compile(r"\^\s*(?:-?\d|\{\s*-?\d\s*\})\s*$")


def _drop_unit_tail(text: str) -> str:
    """Drops a top-level tail of unit groups after an expression (``5\\,\\mathrm{m}/\\mathrm{s}^{2}``).

    Done before the groups are rewritten one by one, because a unit letter alone (``\\mathrm{s}``)
    cannot be told from a variable, while a tail of units after a number can.
    """
    groups_by_end = {}  # One pass: each text group by the index one past its closing brace.
    for match in _TEXT_GROUP.finditer(text):
        group_end = closing_brace(text, match.end() - 1)
        if group_end is not None:
            groups_by_end[group_end] = match
    start = end = len(text.rstrip().rstrip(".").rstrip())
    while True:
        pos = start
        while True:  # Separators between unit groups.
            separator = next((sep for sep in _UNIT_TAIL_SEPARATORS if text.endswith(sep, 0, pos)), None)
            if separator is None:
                break
            pos -= len(separator)
        power = _UNIT_TAIL_POWER.search(text, 0, pos)
        group = groups_by_end.get(power.start() if power else pos)
        if group is None:
            break
        content = text[group.end() : (power.start() if power else pos) - 1]
        if not _is_unit(_TEXT_SPACING.sub(" ", content).strip()):
            break
        start = group.start()
    if start == end or not text[:start].strip() or _brace_depth(text, start) != 0:
        return text
    while separator := next((sep for sep in _UNIT_TAIL_SEPARATORS if text.endswith(sep, 0, start)), None):
        start -= len(separator)  # The spacing before the units goes too.
    return text[:start] + text[end:]


def rewrite_text_groups(text: str) -> str:
    """Rewrites ``\\text{}``-like groups so math-verify parses the whole expression (module docstring).

    A tail of unit groups after an expression is dropped first. Then innermost (rightmost) groups
    first, each is replaced by the first rule that applies: a function name in
    ``\\operatorname``/``\\mathrm`` -> the command (``\\sin``); a percent word -> ``\\%``; one letter
    without spacing -> the letter (``\\mathrm{e}`` -> ``e``); a trailing top-level group after some
    expression, or a unit anywhere -> dropped; other text -> unwrapped.
    """
    text = _drop_unit_tail(text)
    while True:
        matches = list(_TEXT_GROUP.finditer(text))
        if not matches:
            return text
        match = matches[-1]
        open_index = match.end() - 1
        end = closing_brace(text, open_index)
        if end is None:  # Unbalanced: leave the rest to the parser (it will fail or flag it).
            return text
        command, content = match.group(1), text[open_index + 1 : end - 1]
        core = _TEXT_SPACING.sub(" ", content).strip()
        after = end
        if not core:
            replacement = " "
        elif command.startswith(("operatorname", "mathrm")) and core in _FUNCTION_NAMES:
            replacement = f"\\{core} "
        elif core in _PERCENT_WORDS:
            replacement = "\\%"
        elif len(core) == 1 and core.isalpha() and content == core:
            replacement = core
        elif (
            _AFTER_TRAILING_GROUP.fullmatch(text, end)
            and text[: match.start()].strip()
            and _brace_depth(text, match.start()) == 0
        ) or _is_unit(core):
            replacement = ""
            power = _UNIT_POWER.match(text, end)
            after = power.end() if power else end
        elif "\\" in content or "{" in content or "}" in content:
            replacement = "{" + content + "}"
        else:
            replacement = f" {core} "
        text = text[: match.start()] + replacement + text[after:]


_LATEX_REPLACEMENTS = (("°", "^\\circ"), ("\\varnothing", "\\emptyset"))
_THOUSANDS_THIN_SPACE = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_PERCENT = re.compile(r"\\?%")
# The end of an incomplete parse: an operator or an opening bracket with nothing after it.
_DANGLING = re.compile(r"(?:(?<!\\)[-+*/^_=,({\[]|\\frac|\\cdot|\\times|\\sqrt|\\left)\s*$")


def _normalize_latex(text: str) -> str:
    """The text-level normalisations of the module docstring, before math-verify parses."""
    text = strip_math_delimiters(text)
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    text = rewrite_text_groups(text)
    return _THOUSANDS_THIN_SPACE.sub("", text).strip()


# --------------------------------------------------------------------------------------------------
# Worker side.
# --------------------------------------------------------------------------------------------------


class _SoftDeadline(BaseException):
    """Raised by SIGPROF inside a worker. A BaseException so math-verify's ``except Exception``
    handlers cannot swallow it and carry on with the next comparison."""


_soft_deadline_armed = False


def _raise_soft_deadline(signum, frame):
    # A SIGPROF whose Python handler runs only after the task ended must not hit the pipe protocol.
    if _soft_deadline_armed:
        raise _SoftDeadline


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _arm(budget_s: float, soft_deadline_fraction: float | None) -> None:
    """Starts the task's CPU-time limits (module docstring, "Limits")."""
    global _soft_deadline_armed
    soft_s = budget_s * soft_deadline_fraction if soft_deadline_fraction else None
    hard_limit = resource.getrlimit(resource.RLIMIT_CPU)[1]
    kill_at = math.ceil(_cpu_seconds() + budget_s + (1.0 if soft_s else 0.0))
    if hard_limit != resource.RLIM_INFINITY:
        kill_at = min(kill_at, hard_limit)
    resource.setrlimit(resource.RLIMIT_CPU, (kill_at, hard_limit))
    if soft_s:
        _soft_deadline_armed = True
        signal.setitimer(signal.ITIMER_PROF, soft_s)


def _disarm() -> None:
    global _soft_deadline_armed
    _soft_deadline_armed = False  # First: a late SIGPROF now does nothing.
    signal.setitimer(signal.ITIMER_PROF, 0)
    hard_limit = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (hard_limit, hard_limit))


def _imaginary_unit(expr):
    """Reads a free symbol named ``i`` as the imaginary unit."""
    import sympy

    symbols = getattr(expr, "free_symbols", ())
    return expr.xreplace({s: sympy.I for s in symbols if s.name == "i"}) if symbols else expr


@functools.lru_cache(maxsize=4096)
def _parse_boxed(text: str) -> list:
    """math-verify's parse of one normalised answer, LaTeX extraction only (module docstring)."""
    import math_verify

    parsed = math_verify.parse(
        "\\boxed{" + text + "}",
        extraction_config=[math_verify.LatexExtractionConfig()],
        parsing_timeout=None,
    )
    return [item if isinstance(item, str) else _imaginary_unit(item) for item in parsed]


def _incomplete(parsed: list) -> str | None:
    """Why a parse is not one complete expression, or None if it is."""
    if not any(not isinstance(item, str) for item in parsed):
        return "no expression" if not parsed else f"no expression (read as text {parsed[-1]!r})"
    for item in parsed:
        if isinstance(item, str) and (not braces_balanced(item) or _DANGLING.search(item)):
            return f"parsed as {item!r}"
    return None


def _compare(answer: str, gold: str) -> Verdict:
    import math_verify

    try:
        answer_parsed = _parse_boxed(answer)
    except Exception:  # Malformed LaTeX that math-verify did not catch itself.
        return Verdict.UNPARSABLE
    if _incomplete(answer_parsed):
        return Verdict.UNPARSABLE
    gold_parsed = _parse_boxed(gold)
    if not gold_parsed:
        return Verdict.NOT_EQUAL
    equal = math_verify.verify(gold_parsed, answer_parsed, allow_set_relation_comp=True, timeout_seconds=None)
    return Verdict.EQUAL if equal else Verdict.NOT_EQUAL


def _verdict(answer: str, gold: str) -> Verdict:
    answer, gold = _normalize_latex(answer), _normalize_latex(gold)
    verdict = _compare(answer, gold)
    if verdict is Verdict.NOT_EQUAL and (_PERCENT.search(answer) or _PERCENT.search(gold)):
        if _compare(_PERCENT.sub("", answer), _PERCENT.sub("", gold)) is Verdict.EQUAL:
            return Verdict.EQUAL
    return verdict


def _gold_problem(gold: str) -> str | None:
    """Why a gold does not parse to a complete expression, or None if it does."""
    return _incomplete(_parse_boxed(_normalize_latex(gold)))


def _run_task(kind: str, payload, budget_s: float, soft_deadline_fraction: float | None):
    """One task under its CPU-time limits: a Verdict value ("grade") or a gold problem ("gold")."""
    try:
        try:
            _arm(budget_s, soft_deadline_fraction)
            if kind == "grade":
                return _verdict(*payload).value
            return _gold_problem(payload)
        finally:
            _disarm()
    except (_SoftDeadline, MemoryError):  # Out of budget: too expensive to grade.
        _disarm()  # Again: the soft deadline may have fired inside the first call.
        return Verdict.TIMEOUT.value if kind == "grade" else f"over its {budget_s:g} s CPU budget"
    except Exception as error:  # Malformed LaTeX, sympy bugs: not verified.
        return Verdict.NOT_EQUAL.value if kind == "grade" else f"{type(error).__name__}: {error}"


def _worker_main(conn: multiprocessing.connection.Connection, memory_limit_bytes: int | None) -> None:
    """Serves ``(index, kind, payload, budget_s, soft_deadline_fraction)`` tasks until hung up on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle.
    signal.signal(signal.SIGPROF, _raise_soft_deadline)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)  # The hard CPU limit kills.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # ... without a core dump of a 2 GB process.
    if memory_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    # Timeouts are enforced here and by the parent; math-verify's own alarm-based ones are off.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    _verdict("1", "1")  # Warm-up: math-verify builds its parser lazily on first use.
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, kind, payload, budget_s, soft_deadline_fraction = task
        conn.send((index, _run_task(kind, payload, budget_s, soft_deadline_fraction)))


# --------------------------------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------------------------------

_main_filter_lock = threading.Lock()


def _omit_main_module_for_workers() -> None:
    """Makes grading workers start without re-importing the caller's ``__main__`` (idempotent).

    ``spawn`` and ``forkserver`` children run ``multiprocessing.spawn.prepare(data)``, which
    re-imports the parent's main module when ``data`` names it (``init_main_from_path`` /
    ``init_main_from_name``): a script without a main guard would re-run itself in every worker.
    Both start methods build ``data`` with ``multiprocessing.spawn.get_preparation_data(name)``,
    passing the process name, so that function is wrapped to drop the two keys for processes named
    :data:`_WORKER_NAME` only. The workers' target lives in this importable module, so they need
    nothing from ``__main__``. Unlike hiding ``__main__.__file__`` while starting, this changes no
    shared state that other threads could observe, and every other process starts as before.
    """
    with _main_filter_lock:
        original = multiprocessing.spawn.get_preparation_data
        if getattr(original, "_bcr_grading_filter", False):
            return

        @functools.wraps(original)
        def get_preparation_data(name):
            data = original(name)
            if name == _WORKER_NAME:
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
            return data

        get_preparation_data._bcr_grading_filter = True
        multiprocessing.spawn.get_preparation_data = get_preparation_data


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    start_deadline: float
    ready: bool = False
    task: int | None = None  # Index (within the current batch) of the task being run.
    deadline: float = math.inf  # The wall-clock backstop of that task.


def _start_method(requested: str | None) -> str:
    if requested == "fork":
        raise ValueError("start_method='fork' is unsafe with JAX threads in the parent; use 'forkserver' or 'spawn'")
    if requested is not None:
        return requested
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class Grader:
    """A persistent pool of grading workers; use as a context manager or call :meth:`close`.

    Args:
      num_workers: Worker processes (default: the CPU count, at most 16). More workers than cores
        is fine: limits count each worker's CPU time, not wall time.
      timeout_s: Default CPU-time budget per answer, in seconds of the worker's own CPU time.
      max_answer_chars: Longer answers are ``unparsable`` without being parsed.
      memory_limit_mb: Address-space limit of each worker (None for no limit).
      soft_deadline_fraction: When the in-worker soft deadline fires, as a fraction of
        ``timeout_s`` of CPU time; the kernel's CPU-limit kill follows at least a second after
        ``timeout_s``. None: no soft deadline, every overrun ends in that kill, at ``timeout_s``
        (rounded up to whole seconds of the worker's CPU time).
      start_method: ``"forkserver"`` (default where available) or ``"spawn"``.
      startup_timeout_s: How long (wall clock) a new worker may take to become ready.
      backstop_s: Wall-clock limit per answer from dispatch, against workers hung outside the CPU
        (default: ``max(10 * timeout_s, 30)``).

    Not thread-safe across concurrent batches: calls are serialised by a lock.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
        memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
        soft_deadline_fraction: float | None = DEFAULT_SOFT_DEADLINE_FRACTION,
        start_method: str | None = None,
        startup_timeout_s: float = 120.0,
        backstop_s: float | None = None,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.num_workers = num_workers or min(os.cpu_count() or 1, 16)
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.soft_deadline_fraction = soft_deadline_fraction
        self.backstop_s = backstop_s
        self.num_replaced = 0  # Workers killed for overrunning or found dead; a health metric.
        self._memory_limit_bytes = memory_limit_mb * 2**20 if memory_limit_mb else None
        self._startup_timeout_s = startup_timeout_s
        method = _start_method(start_method)
        self._context = multiprocessing.get_context(method)
        if method == "forkserver":
            # Takes effect when this process first starts its forkserver.
            self._context.set_forkserver_preload(["math_verify", __name__])
        _omit_main_module_for_workers()
        self._lock = threading.Lock()
        self._workers = [self._start_worker() for _ in range(self.num_workers)]

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return not self._workers

    def close(self) -> None:
        """Stops every worker (idempotent)."""
        with self._lock:
            for worker in self._workers:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
            for worker in self._workers:
                worker.process.join(timeout=1.0)
                self._stop(worker)
            self._workers = []

    def grade(self, answer: str | None, gold: str, *, timeout_s: float | None = None) -> bool:
        """Whether ``answer`` is equivalent to ``gold`` (see the module docstring)."""
        return self.grade_batch([answer], [gold], timeout_s=timeout_s)[0]

    def grade_batch(
        self,
        answers: Sequence[str | None],
        golds: Sequence[str],
        *,
        timeout_s: float | None = None,
    ) -> list[bool]:
        """Grades ``answers[i]`` against ``golds[i]`` in parallel: True iff the verdict is equal."""
        return [v is Verdict.EQUAL for v in self.grade_batch_verdicts(answers, golds, timeout_s=timeout_s)]

    def grade_batch_verdicts(
        self,
        answers: Sequence[str | None],
        golds: Sequence[str],
        *,
        timeout_s: float | None = None,
    ) -> list[Verdict]:
        """Grades ``answers[i]`` against ``golds[i]`` in parallel; one :class:`Verdict` per answer."""
        if len(answers) != len(golds):
            raise ValueError(f"got {len(answers)} answers but {len(golds)} golds")
        verdicts: list[Verdict | None] = [
            _decide_in_parent(answer, gold, self.max_answer_chars) for answer, gold in zip(answers, golds)
        ]
        tasks = {i: ("grade", (answers[i], golds[i])) for i, v in enumerate(verdicts) if v is None}
        results = self._run_tasks(tasks, timeout_s, killed=Verdict.TIMEOUT.value)
        for index, value in results.items():
            verdicts[index] = Verdict(value)
        return verdicts

    def check_golds(
        self, golds: Sequence[str], *, timeout_s: float | None = None, max_examples: int = 5
    ) -> GoldReport:
        """Which golds do not parse to a complete expression (see :func:`check_golds`)."""
        unique: dict[str, list[int]] = {}
        for index, gold in enumerate(golds):
            if not isinstance(gold, str):
                raise TypeError(f"gold #{index} is {type(gold).__name__}, not a string")
            if not _gold_decided_in_parent(gold):
                unique.setdefault(gold, []).append(index)
        distinct = list(unique)
        tasks = {i: ("gold", gold) for i, gold in enumerate(distinct)}
        problems = self._run_tasks(tasks, timeout_s, killed="its worker was killed (over its CPU budget)")
        bad = sorted((unique[distinct[i]][0], i) for i, why in problems.items() if why is not None)
        incomplete = tuple(sorted(index for _, i in bad for index in unique[distinct[i]]))
        examples = tuple((index, distinct[i], problems[i]) for index, i in bad[:max_examples])
        return GoldReport(len(golds), len(incomplete), incomplete, examples)

    def _run_tasks(self, tasks: dict[int, tuple], timeout_s: float | None, killed) -> dict:
        """Runs ``{index: (kind, payload)}`` on the workers; ``{index: result}``, ``killed`` for an
        index whose worker died or was killed."""
        budget_s = self.timeout_s if timeout_s is None else timeout_s
        if budget_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {budget_s}")
        backstop_s = self.backstop_s or max(BACKSTOP_FACTOR * budget_s, BACKSTOP_MIN_S)
        results: dict = {}
        with self._lock:
            if self.closed:
                raise RuntimeError("Grader is closed")
            if tasks:
                message = lambda index: (index, *tasks[index], budget_s, self.soft_deadline_fraction)  # noqa: E731
                self._run(deque(tasks), message, results, killed, backstop_s)
        return results

    def _run(self, queue: deque[int], message: Callable[[int], tuple], results: dict, killed, backstop_s) -> None:
        """Dispatches queued tasks to idle workers until every result is in."""
        while queue or any(w.task is not None for w in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.task is None and queue:
                    index = queue.popleft()
                    try:
                        worker.conn.send(message(index))
                    except OSError:  # Died while idle: not this task's fault, so retry it.
                        queue.appendleft(index)
                        self._replace(slot)
                        continue
                    # The backstop starts at dispatch: time spent queued is not the answer's.
                    worker.task, worker.deadline = index, time.monotonic() + backstop_s
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            wake_at = min(w.deadline if w.ready else w.start_deadline for w in waiting)
            ready = multiprocessing.connection.wait(
                [w.conn for w in waiting], timeout=max(0.0, wake_at - time.monotonic())
            )
            for conn in ready:
                self._receive(self._slot_of(conn), results, killed)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.task is not None and now >= worker.deadline:
                    if worker.conn.poll():  # Replied while we woke up: no need to kill it.
                        self._receive(slot, results, killed)
                    else:  # Hung: killed and replaced.
                        results[worker.task] = killed
                        self._replace(slot)
                elif not worker.ready and now >= worker.start_deadline:
                    raise RuntimeError(f"grading worker did not start within {self._startup_timeout_s:.0f}s")

    def _receive(self, slot: int, results: dict, killed) -> None:
        worker = self._workers[slot]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            if not worker.ready:
                raise RuntimeError(
                    f"grading worker exited during start-up (exit code {worker.process.exitcode})"
                ) from None
            # Killed by its hard CPU limit (SIGXCPU) or crashed mid-task.
            results[worker.task] = killed
            self._replace(slot)
            return
        if message == _READY:
            worker.ready = True
            return
        index, result = message
        results[index] = result
        worker.task, worker.deadline = None, math.inf

    def _slot_of(self, conn) -> int:
        return next(slot for slot, worker in enumerate(self._workers) if worker.conn is conn)

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self._memory_limit_bytes),
            name=_WORKER_NAME,
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn, time.monotonic() + self._startup_timeout_s)

    def _replace(self, slot: int) -> None:
        self._stop(self._workers[slot])
        self._workers[slot] = self._start_worker()
        self.num_replaced += 1

    @staticmethod
    def _stop(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()


# --------------------------------------------------------------------------------------------------
# Module-level convenience API over a lazily created default grader.
# --------------------------------------------------------------------------------------------------

_default_grader: Grader | None = None
_default_grader_lock = threading.Lock()


def _get_default_grader(num_workers: int | None) -> Grader:
    global _default_grader
    with _default_grader_lock:
        stale = _default_grader is not None and (
            _default_grader.closed or (num_workers and num_workers != _default_grader.num_workers)
        )
        if stale:
            _default_grader.close()
            _default_grader = None
        if _default_grader is None:
            _default_grader = Grader(num_workers)
            atexit.register(_default_grader.close)
        return _default_grader


def grade(answer: str | None, gold: str, *, timeout_s: float | None = None) -> bool:
    """Grades one answer with the module's default :class:`Grader` (created on first use)."""
    return _get_default_grader(None).grade(answer, gold, timeout_s=timeout_s)


def grade_batch(
    answers: Sequence[str | None],
    golds: Sequence[str],
    *,
    timeout_s: float | None = None,
    num_workers: int | None = None,
) -> list[bool]:
    """Grades a batch with the default :class:`Grader`; a different ``num_workers`` rebuilds it."""
    return _get_default_grader(num_workers).grade_batch(answers, golds, timeout_s=timeout_s)


def grade_batch_verdicts(
    answers: Sequence[str | None],
    golds: Sequence[str],
    *,
    timeout_s: float | None = None,
    num_workers: int | None = None,
) -> list[Verdict]:
    """Like :func:`grade_batch`, with a :class:`Verdict` per answer instead of a bool."""
    return _get_default_grader(num_workers).grade_batch_verdicts(answers, golds, timeout_s=timeout_s)


def check_golds(
    golds: Sequence[str],
    *,
    timeout_s: float | None = None,
    max_examples: int = 5,
    num_workers: int | None = None,
) -> GoldReport:
    """Counts the golds that do not parse to a complete expression, for data loaders at load time.

    Such a gold is one no answer can reliably match (``1-\\frac{1}{`` is what math-verify 0.9 made
    of ``1-\\frac{1}{\\mathrm{e}}`` before :func:`rewrite_text_groups`). Integer and word golds are
    decided by text and always complete; the rest are parsed once per distinct gold in the default
    :class:`Grader`'s workers, under the same CPU-time budget as answers. Returns a
    :class:`GoldReport`; ``str(report)`` is a one-line summary with examples.
    """
    return _get_default_grader(num_workers).check_golds(golds, timeout_s=timeout_s, max_examples=max_examples)
