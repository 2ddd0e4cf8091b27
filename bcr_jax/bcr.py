"""The N-problem task format of Batched Contextual Reinforcement (BCR).

A BCR prompt holds N problems (``### Problem 1`` ... ``### Problem N``) that the model solves in
order inside one shared response budget, writing each final answer as ``Answer k::\\boxed{...}``.
This module owns the text side of that contract and the fixed-shape token layout around it:

* :func:`pack_problems` renders the user message (N = 1 gives the plain single-problem prompt of
  the baseline);
* :func:`split_answers` / :func:`answer_spans` parse a (possibly truncated) response back into
  per-problem answers and character segments, and :func:`segment_ids` maps those segments onto
  tokens for segment-level credit;
* :func:`assemble_prompts` left-pads prompts for the sampler, :func:`assemble_sequences` and
  :func:`place_response_values` turn sampler output into right-padded trainer sequences.

Answer-parsing policy
---------------------
The parser is the reward's only view of a response, so it is deliberately strict: every rule below
exists so that hedging or format games can never raise the score.

1. *Answer section.* With ``require_think_close`` (DeepScaleR's rule for thinking models) only the
   text after the last ``</think>`` is read; a response without ``</think>`` has no answers at all.
   Otherwise the whole response is read.
2. *Markers.* A marker is ``Answer k::``, with optional whitespace around ``k`` and before ``::``
   (``Answer 2 :: \\boxed {x}`` is fine). Every marker, valid or not, ends the answer region of the
   marker before it; the region of a marker runs from its end to the next marker (or the end of
   the text).
3. *Ignored markers.* Markers with ``k < 1`` or ``k > n`` never yield an answer (they still end the
   previous region, so "extra answers" cannot smuggle a box into a real one).
4. *Duplicates.* If ``Answer k::`` occurs more than once, problem k is None: an answer cannot be
   submitted twice.
5. *Order.* Problems are solved in order, so markers must appear with strictly increasing k. A
   marker whose k is not greater than the largest k seen before it is invalid (its problem is
   None); skipping a problem is allowed (``Answer 1`` then ``Answer 3`` leaves problem 2 None).
6. *Exactly one box.* A valid marker's answer is the content of the single ``\\boxed{...}`` in its
   region. No box, more than one ``\\boxed`` (including nested ones), an empty box, or a box whose
   closing brace is missing from the region (e.g. cut off by the token budget) makes it None --
   many boxed guesses never score.
7. *Baseline format.* For ``n == 1`` and a response without any marker, the whole answer section
   is problem 1's region (the plain "put your final answer within \\boxed{}" format); rule 6 applies.

Braces are matched with LaTeX escapes honoured: ``\\{`` and ``\\}`` are literal characters, so
``\\boxed{\\{1, 2\\}}`` yields ``\\{1, 2\\}``.

Segments
--------
Problem k's segment (for segment-level credit) runs from the end of the previous *parsed* answer
(or the start of the answer section) to the end of k's ``\\boxed{...}``; problems without a parsed
answer have no segment, so their text falls into the next parsed problem's segment. Tokens outside
every segment -- a thinking block, text after the last parsed answer, special tokens with no
characters -- get segment id 0, which :mod:`bcr_jax.rl` credits with the whole-sequence advantage.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bcr_jax.grading import closing_brace

THINK_CLOSE = "</think>"

_MARKER = re.compile(r"Answer\s*(\d+)\s*::")
_BOXED = re.compile(r"\\boxed(?![A-Za-z])")
_BOX_OPEN = re.compile(r"\\boxed\s*\{")
# Marker numbers longer than this are out of range anyway; capping them keeps int() cheap.
_MAX_MARKER_DIGITS = 6


# --------------------------------------------------------------------------------------------------
# Packing.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """``str.format`` templates of the user message (literal braces are doubled).

    Attributes:
      single: The whole message for one problem (the baseline prompt); placeholder ``{problem}``.
      header: Text before the problem sections; placeholder ``{n}``.
      section: One problem's section; placeholders ``{k}`` (1-based) and ``{problem}``.
      footer: The answer-format instruction after the sections; placeholder ``{n}``.
      separator: Joins header, sections and footer.
    """

    single: str = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    header: str = "Solve the following {n} problems in order."
    section: str = "### Problem {k}\n{problem}"
    footer: str = (
        "Please reason step by step. As soon as you have solved problem k (k = 1, ..., {n}), write its"
        " final answer on its own line as Answer k::\\boxed{{...}}, with exactly one box per problem,"
        " then move on to the next problem."
    )
    separator: str = "\n\n"


DEFAULT_TEMPLATE = PromptTemplate()
# For small synthetic worlds with character tokenizers: the sections alone, no instructions.
COMPACT_TEMPLATE = PromptTemplate(single="{problem}", header="", section="### Problem {k}\n{problem}", footer="",
                                  separator="\n")
TEMPLATES = {"default": DEFAULT_TEMPLATE, "compact": COMPACT_TEMPLATE}


def pack_problems(problems: Sequence[str], template: PromptTemplate | None = None) -> str:
    """Renders the user message for ``len(problems)`` problems to be solved in order."""
    template = template or DEFAULT_TEMPLATE
    if not problems:
        raise ValueError("pack_problems needs at least one problem")
    if len(problems) == 1:
        return template.single.format(problem=problems[0])
    n = len(problems)
    parts = [template.header.format(n=n)]
    parts += [template.section.format(k=k, problem=p) for k, p in enumerate(problems, start=1)]
    parts.append(template.footer.format(n=n))
    return template.separator.join(part for part in parts if part)  # an empty header / footer adds nothing


# --------------------------------------------------------------------------------------------------
# Splitting a response into answers.
# --------------------------------------------------------------------------------------------------


class _Answer(NamedTuple):
    text: str
    end: int  # One past the closing brace of the box, in response coordinates.


def _boxed_answer(text: str, start: int, end: int) -> _Answer | None:
    """The answer of the region ``text[start:end]``: its single, closed, non-empty box (rule 6)."""
    boxes = _BOXED.finditer(text, start, end)
    first = next(boxes, None)
    if first is None or next(boxes, None) is not None:
        return None
    opening = _BOX_OPEN.match(text, first.start(), end)
    if opening is None:
        return None
    close = closing_brace(text, opening.end() - 1, end)
    if close is None:
        return None
    content = text[opening.end() : close - 1].strip()
    return _Answer(content, close) if content else None


def _answer_section_start(response: str, require_think_close: bool) -> int | None:
    if not require_think_close:
        return 0
    close = response.rfind(THINK_CLOSE)
    return None if close < 0 else close + len(THINK_CLOSE)


def _parse(response: str, n: int, require_think_close: bool) -> tuple[int, list[_Answer | None]]:
    """Applies the module's answer policy; returns (answer-section start, answers by problem)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    answers: list[_Answer | None] = [None] * n
    start = _answer_section_start(response, require_think_close)
    if start is None:
        return 0, answers

    markers = []  # (region start, region end, k) for every marker in the answer section.
    found = list(_MARKER.finditer(response, start))
    for i, match in enumerate(found):
        digits = match.group(1)
        k = int(digits) if len(digits) <= _MAX_MARKER_DIGITS else 0
        region_end = found[i + 1].start() if i + 1 < len(found) else len(response)
        markers.append((match.end(), region_end, k))
    if not markers:
        if n == 1:
            answers[0] = _boxed_answer(response, start, len(response))
        return start, answers

    counts = collections.Counter(k for _, _, k in markers)
    largest_k = 0
    for region_start, region_end, k in markers:
        if not 1 <= k <= n:
            continue
        in_order = k > largest_k
        largest_k = max(largest_k, k)
        if in_order and counts[k] == 1:
            answers[k - 1] = _boxed_answer(response, region_start, region_end)
    return start, answers


def split_answers(response: str, n: int, *, require_think_close: bool = False) -> list[str | None]:
    """Per-problem answers (``\\boxed`` contents, stripped) of a response; None where unparsed.

    See the module docstring for the policy on duplicated, out-of-order, extra and truncated
    answers.
    """
    _, answers = _parse(response, n, require_think_close)
    return [None if a is None else a.text for a in answers]


def answer_spans(response: str, n: int, *, require_think_close: bool = False) -> list[tuple[int, int] | None]:
    """Character span ``[start, end)`` of each problem's segment; None where no answer parsed.

    A segment runs from the end of the previous parsed answer (or the start of the answer section)
    to the end of the problem's ``\\boxed{...}``.
    """
    start, answers = _parse(response, n, require_think_close)
    spans: list[tuple[int, int] | None] = []
    for answer in answers:
        if answer is None:
            spans.append(None)
        else:
            spans.append((start, answer.end))
            start = answer.end
    return spans


def segment_ids(
    spans: Sequence[tuple[int, int] | None],
    token_offsets: np.ndarray | Sequence[tuple[int, int]],
    length: int | None = None,
) -> np.ndarray:
    """Maps character spans to per-token segment ids (host side).

    Args:
      spans: Output of :func:`answer_spans` for the response the tokens encode.
      token_offsets: ``[T, 2]`` character ``(start, end)`` of each response token in the response
        string (e.g. a fast tokenizer's ``offset_mapping``).
      length: Pad the result with 0 to this many tokens (the response width ``R``); defaults to T.

    Returns:
      ``[length]`` int32: ``k`` for a token whose first character lies in problem k's segment, else
      0 (before the first segment, after the last one, or a token covering no characters).
    """
    offsets = np.asarray(token_offsets, dtype=np.int64).reshape(-1, 2)
    num_tokens = offsets.shape[0]
    length = num_tokens if length is None else length
    if length < num_tokens:
        raise ValueError(f"length={length} is shorter than the {num_tokens} token offsets")
    starts, ends = offsets[:, 0], offsets[:, 1]
    covers_text = ends > starts
    ids = np.zeros(length, dtype=np.int32)
    for k, span in enumerate(spans, start=1):
        if span is not None:
            inside = covers_text & (starts >= span[0]) & (starts < span[1])
            ids[:num_tokens][inside] = k
    return ids


# --------------------------------------------------------------------------------------------------
# Fixed-shape token layout.
# --------------------------------------------------------------------------------------------------


class PromptBatch(NamedTuple):
    tokens: np.ndarray  # [B, P] int32, left-padded (prompt i occupies the last lengths[i] columns).
    lengths: np.ndarray  # [B] int32.


class SequenceBatch(NamedTuple):
    tokens: jax.Array  # [B, P + R] int32, right-padded: prompt, then response, then pad_id.
    prompt_mask: jax.Array  # [B, P + R] bool.
    response_mask: jax.Array  # [B, P + R] bool.


def bucket_length(length: int, buckets: Sequence[int] | None = None, multiple_of: int = 1) -> int:
    """The padded width for ``length`` tokens: the smallest fitting bucket, else a multiple.

    Fixed widths keep the number of compiled shapes small. With ``buckets`` the result is the
    smallest bucket >= length (a ValueError if none fits); otherwise length rounded up to
    ``multiple_of``.
    """
    if buckets:
        fitting = [b for b in buckets if b >= length]
        if not fitting:
            raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")
        return min(fitting)
    return -(-length // multiple_of) * multiple_of


def assemble_prompts(
    token_lists: Sequence[Sequence[int]],
    pad_id: int,
    *,
    buckets: Sequence[int] | None = None,
    multiple_of: int = 1,
) -> PromptBatch:
    """Left-pads tokenized prompts into a ``[B, P]`` int32 array (the sampler's layout).

    ``P`` is :func:`bucket_length` of the longest prompt. Empty prompts are rejected: the sampler
    needs at least one real token to condition on.
    """
    if not token_lists:
        raise ValueError("assemble_prompts needs at least one prompt")
    lengths = np.array([len(tokens) for tokens in token_lists], dtype=np.int32)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise ValueError(f"prompt {empty[0]} is empty")
    width = bucket_length(int(lengths.max()), buckets, multiple_of)
    batch = np.full((len(token_lists), width), pad_id, dtype=np.int32)
    for row, tokens in enumerate(token_lists):
        batch[row, width - len(tokens) :] = tokens
    return PromptBatch(batch, lengths)


def _shift_left(values: jax.Array, shift: jax.Array, fill_value) -> jax.Array:
    """``out[b, t] = values[b, t + shift[b]]``, with ``fill_value`` past the end of the row."""
    width = values.shape[1]
    index = jnp.arange(width)[None, :] + shift[:, None]
    gathered = jnp.take_along_axis(values, jnp.minimum(index, width - 1), axis=1)
    return jnp.where(index < width, gathered, fill_value)


@jax.jit
def assemble_sequences(
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    response_tokens: jax.Array,
    response_lengths: jax.Array,
    pad_id: int,
) -> SequenceBatch:
    """Joins left-padded prompts and right-padded responses into right-padded sequences.

    Args:
      prompt_tokens: ``[B, P]`` left-padded prompts (see :func:`assemble_prompts`).
      prompt_lengths: ``[B]`` real prompt lengths.
      response_tokens: ``[B, R]`` responses starting at column 0; columns at or past
        ``response_lengths`` are ignored (whatever the sampler left there).
      response_lengths: ``[B]`` real response lengths (including EOS if it was sampled).
      pad_id: Token written after each sequence.

    Returns:
      ``[B, P + R]`` tokens with the prompt at ``[0, Lp)`` and the response at ``[Lp, Lp + Lr)``,
      plus the two masks.
    """
    prompt_width = prompt_tokens.shape[1]
    joined = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
    tokens = _shift_left(joined, prompt_width - prompt_lengths, pad_id)
    position = jnp.arange(joined.shape[1])[None, :]
    prompt_mask = position < prompt_lengths[:, None]
    in_sequence = position < (prompt_lengths + response_lengths)[:, None]
    response_mask = in_sequence & ~prompt_mask
    return SequenceBatch(jnp.where(in_sequence, tokens, pad_id), prompt_mask, response_mask)


@functools.partial(jax.jit, static_argnames="prompt_width")
def place_response_values(values: jax.Array, prompt_lengths: jax.Array, prompt_width: int, fill_value=0) -> jax.Array:
    """Moves per-response-token values ``[B, R]`` to their positions in :func:`assemble_sequences`.

    E.g. segment ids computed per response token become ``[B, P + R]`` aligned with the sequence
    tokens; prompt positions and positions past the row's end hold ``fill_value`` (mask the rest
    with the response mask). ``prompt_width`` is ``P``, a static Python int.
    """
    batch = values.shape[0]
    prompt_part = jnp.full((batch, prompt_width), fill_value, dtype=values.dtype)
    joined = jnp.concatenate([prompt_part, values], axis=1)
    return _shift_left(joined, prompt_width - prompt_lengths, jnp.asarray(fill_value, values.dtype))
