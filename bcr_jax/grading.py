"""Grading model answers against gold answers: math-verify in sandboxed, time-limited workers.

Answers are model output, so they are untrusted: nothing here evaluates them as code. The only
route from text to mathematics is math-verify's LaTeX parser (``latex2sympy2_extended`` feeding
sympy); its ``ExprExtractionConfig`` is never used because it hands raw text to
``sympy.parse_expr``, which calls ``eval``.

How one (answer, gold) pair is decided
--------------------------------------
1. *Cheap checks in the parent.* A missing or empty answer, one longer than ``max_answer_chars``
   (1000 by default: no real final answer is that long, but a megabyte of braces is) or one with
   unbalanced braces scores False without leaving the parent.
2. *Text comparison in the parent.* Answers equal to the gold after :func:`normalize_text` score
   True, and two plain integers (the most common answer type) are compared by value: the verdict
   math-verify would give, without the round trip. Word answers -- golds made only of letters and
   spaces, at least two letters ("Yes", "East", "odd") -- are decided here, case-insensitively:
   math-verify reads a word as a product of symbols and would call "Yes" and "sey" equal.
3. *math-verify in a worker process.* Both sides are wrapped as ``\\boxed{...}`` and compared with
   ``math_verify.verify(gold, answer)`` (fractions vs decimals, ``\\dfrac``, ``\\left(``, degrees,
   percent, units, intervals, tuples, sets, expressions, matrices).

Normalisations where math-verify alone gets the mathematically wrong verdict (both sides, before
step 3; each is covered by pairs in ``tests/data/equivalence.jsonl``):

* Surrounding math delimiters (``$...$``, ``\\(...\\)``, ``\\[...\\]``) are removed, since gold
  answers of some sets carry them and math-verify would otherwise not see a single boxed formula.
* ``°`` becomes ``^\\circ`` and ``\\varnothing`` becomes ``\\emptyset`` (math-verify parses
  neither), and thin-space thousands separators (``1\\,000``) are removed.
* A free symbol named ``i`` is the imaginary unit (math-verify keeps it a plain symbol, so
  ``\\sqrt{-4}`` and ``2i`` differ).
* Intervals and sets compare equal to the relations describing them (``0 < x < 1`` vs ``(0, 1)``),
  in both directions (math-verify's ``allow_set_relation_comp``).
* If a side carries a percent sign and the first comparison fails, the comparison is repeated with
  the percent signs dropped: math-verify accepts ``50\\%`` for ``50`` but not ``12.5\\%`` for
  ``12.5``, while ``0.5`` for ``50\\%`` already passes the first comparison.

Isolation
---------
Workers are started from a ``forkserver`` (``spawn`` where unavailable; never ``fork``, which is
unsafe once JAX threads run in the parent) that has math-verify preloaded, so the import cost is
paid once per pool and a replacement worker starts in milliseconds. Each worker grades one answer
at a time under a hard wall-clock deadline measured by the parent: a worker that overruns is
SIGKILLed and replaced, and that answer scores False. Inside the worker a soft deadline (at 3/4 of
the hard one) aborts slow-but-interruptible sympy work without the cost of a replacement, and an
address-space limit turns a runaway big integer into a MemoryError instead of swapping the host.
So one adversarial answer (``9^{9^{9^{9}}}``, a megabyte of braces) costs at most ``timeout_s`` of
one worker and cannot stall or crash training.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MAX_ANSWER_CHARS = 1000
DEFAULT_MEMORY_LIMIT_MB = 2048
# The soft (in-worker) deadline as a fraction of the hard one; the rest is headroom for the worker
# to unwind and reply before the parent kills it.
DEFAULT_SOFT_DEADLINE_FRACTION = 0.75
_READY = "ready"

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


def _decide_in_parent(answer: str | None, gold: str, max_answer_chars: int) -> bool | None:
    """Steps 1 and 2 of the module docstring: a verdict, or None to ask math-verify."""
    if not isinstance(answer, str) or len(answer) > max_answer_chars:
        return False
    if not answer.strip() or not braces_balanced(answer):
        return False
    normalized_answer, normalized_gold = normalize_text(answer), normalize_text(gold)
    if normalized_answer == normalized_gold:
        return True
    if _INTEGER.fullmatch(normalized_answer) and _INTEGER.fullmatch(normalized_gold):
        return int(normalized_answer) == int(normalized_gold)
    plain_gold = _TEXT_COMMAND.sub(r"\1", strip_math_delimiters(gold)).strip().rstrip(".")
    if _WORD_ANSWER.fullmatch(plain_gold):
        return normalized_answer.casefold() == normalized_gold.casefold()
    return None


# --------------------------------------------------------------------------------------------------
# Worker side.
# --------------------------------------------------------------------------------------------------


class _SoftDeadline(BaseException):
    """Raised by SIGALRM inside a worker. A BaseException so math-verify's ``except Exception``
    handlers cannot swallow it and carry on with the next comparison."""


def _raise_soft_deadline(signum, frame):
    raise _SoftDeadline


_LATEX_REPLACEMENTS = (("°", "^\\circ"), ("\\varnothing", "\\emptyset"))
_THOUSANDS_THIN_SPACE = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_PERCENT = re.compile(r"\\?%")


def _normalize_latex(text: str) -> str:
    """The text-level normalisations of the module docstring, before math-verify parses."""
    text = strip_math_delimiters(text)
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    return _THOUSANDS_THIN_SPACE.sub("", text)


def _imaginary_unit(expr):
    """Reads a free symbol named ``i`` as the imaginary unit."""
    import sympy

    symbols = getattr(expr, "free_symbols", ())
    return expr.xreplace({s: sympy.I for s in symbols if s.name == "i"}) if symbols else expr


@functools.lru_cache(maxsize=4096)
def _parse_boxed(text: str) -> list:
    """math-verify's parse of one answer, LaTeX extraction only (see the module docstring)."""
    import math_verify

    parsed = math_verify.parse(
        "\\boxed{" + text + "}",
        extraction_config=[math_verify.LatexExtractionConfig()],
        parsing_timeout=None,
    )
    return [item if isinstance(item, str) else _imaginary_unit(item) for item in parsed]


def _equivalent(answer: str, gold: str) -> bool:
    import math_verify

    gold_parsed, answer_parsed = _parse_boxed(gold), _parse_boxed(answer)
    if not gold_parsed or not answer_parsed:
        return False
    return math_verify.verify(gold_parsed, answer_parsed, allow_set_relation_comp=True, timeout_seconds=None)


def _verify(answer: str, gold: str) -> bool:
    answer, gold = _normalize_latex(answer), _normalize_latex(gold)
    if _equivalent(answer, gold):
        return True
    if _PERCENT.search(answer) or _PERCENT.search(gold):
        return _equivalent(_PERCENT.sub("", answer), _PERCENT.sub("", gold))
    return False


def _verify_before(answer: str, gold: str, soft_deadline_s: float | None) -> bool:
    if soft_deadline_s:
        signal.setitimer(signal.ITIMER_REAL, soft_deadline_s)
    try:
        return _verify(answer, gold)
    except Exception:  # Malformed LaTeX, MemoryError, sympy bugs: all mean "not verified".
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _worker_main(conn: multiprocessing.connection.Connection, memory_limit_bytes: int | None) -> None:
    """Serves ``(index, answer, gold, soft_deadline_s)`` tasks until the parent hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle.
    signal.signal(signal.SIGALRM, _raise_soft_deadline)
    if memory_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    # Timeouts are enforced here and by the parent; math-verify's own alarm-based ones are off.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    _verify("1", "1")  # Warm-up: math-verify builds its parser lazily on first use.
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, answer, gold, soft_deadline_s = task
        try:
            verdict = _verify_before(answer, gold, soft_deadline_s)
        except _SoftDeadline:  # Out of time: the answer was too expensive to verify.
            verdict = False
        conn.send((index, verdict))


# --------------------------------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    start_deadline: float
    ready: bool = False
    task: int | None = None  # Index (within the current batch) of the answer being graded.
    deadline: float = math.inf


def _start_method(requested: str | None) -> str:
    if requested == "fork":
        raise ValueError("start_method='fork' is unsafe with JAX threads in the parent; use 'forkserver' or 'spawn'")
    if requested is not None:
        return requested
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class Grader:
    """A persistent pool of grading workers; use as a context manager or call :meth:`close`.

    Args:
      num_workers: Worker processes (default: the CPU count, at most 16).
      timeout_s: Default hard wall-clock limit per answer, from dispatch to verdict.
      max_answer_chars: Longer answers score False without being parsed.
      memory_limit_mb: Address-space limit of each worker (None for no limit).
      soft_deadline_fraction: When the in-worker soft deadline fires, as a fraction of the hard
        one (None: no soft deadline, every overrun ends in a kill).
      start_method: ``"forkserver"`` (default where available) or ``"spawn"``.
      startup_timeout_s: How long a new worker may take to become ready before grading fails.

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
    ):
        self.num_workers = num_workers or min(os.cpu_count() or 1, 16)
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.soft_deadline_fraction = soft_deadline_fraction
        self.num_replaced = 0  # Workers killed for overrunning or found dead; a health metric.
        self._memory_limit_bytes = memory_limit_mb * 2**20 if memory_limit_mb else None
        self._startup_timeout_s = startup_timeout_s
        method = _start_method(start_method)
        self._context = multiprocessing.get_context(method)
        if method == "forkserver":
            # Takes effect when this process first starts its forkserver.
            self._context.set_forkserver_preload(["math_verify", __name__])
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
        """Grades ``answers[i]`` against ``golds[i]`` in parallel; one verdict per answer."""
        if len(answers) != len(golds):
            raise ValueError(f"got {len(answers)} answers but {len(golds)} golds")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        verdicts = [False] * len(answers)
        queue: deque[int] = deque()
        for index, (answer, gold) in enumerate(zip(answers, golds)):
            verdict = _decide_in_parent(answer, gold, self.max_answer_chars)
            if verdict is None:
                queue.append(index)
            else:
                verdicts[index] = verdict
        with self._lock:
            if self.closed:
                raise RuntimeError("Grader is closed")
            self._run(queue, answers, golds, verdicts, timeout_s)
        return verdicts

    def _run(self, queue, answers, golds, verdicts, timeout_s) -> None:
        """Dispatches queued answers to idle workers until every verdict is in."""
        fraction = self.soft_deadline_fraction
        soft_deadline_s = None if fraction is None else timeout_s * fraction
        while queue or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.task is None and queue:
                    index = queue.popleft()
                    try:
                        worker.conn.send((index, answers[index], golds[index], soft_deadline_s))
                    except OSError:  # Died while idle: not this answer's fault, so retry it.
                        queue.appendleft(index)
                        self._replace(slot)
                        continue
                    worker.task, worker.deadline = index, now + timeout_s
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            wake_at = min(w.deadline if w.ready else w.start_deadline for w in waiting)
            ready = multiprocessing.connection.wait(
                [w.conn for w in waiting], timeout=max(0.0, wake_at - time.monotonic())
            )
            for conn in ready:
                self._receive(self._slot_of(conn), verdicts)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.task is not None and now >= worker.deadline:
                    if worker.conn.poll():  # Replied while we woke up: no need to kill it.
                        self._receive(slot, verdicts)
                    else:
                        self._replace(slot)  # Overran: killed, and its answer keeps its False verdict.
                elif not worker.ready and now >= worker.start_deadline:
                    raise RuntimeError(f"grading worker did not start within {self._startup_timeout_s:.0f}s")

    def _receive(self, slot: int, verdicts: list[bool]) -> None:
        worker = self._workers[slot]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            if not worker.ready:
                raise RuntimeError(
                    f"grading worker exited during start-up (exit code {worker.process.exitcode})"
                ) from None
            self._replace(slot)  # Crashed mid-answer: that answer keeps its False verdict.
            return
        if message == _READY:
            worker.ready = True
            return
        index, verdict = message
        verdicts[index] = verdict
        worker.task, worker.deadline = None, math.inf

    def _slot_of(self, conn) -> int:
        return next(slot for slot, worker in enumerate(self._workers) if worker.conn is conn)

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self._memory_limit_bytes),
            name="bcr-grading-worker",
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
