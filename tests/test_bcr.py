"""Tests for bcr_jax.bcr: packing, the answer-splitting policy, segments and token layout."""

import string

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcr_jax import bcr

# --------------------------------------------------------------------------------------------------
# Packing.
# --------------------------------------------------------------------------------------------------


def test_single_problem_gives_the_plain_baseline_prompt():
    assert bcr.pack_problems(["What is $1+1$?"]) == (
        "What is $1+1$?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def test_multi_problem_prompt_layout():
    message = bcr.pack_problems(["First {x}?", "Second?"])
    assert message == (
        "Solve the following 2 problems in order.\n\n"
        "### Problem 1\nFirst {x}?\n\n"
        "### Problem 2\nSecond?\n\n"
        "Please reason step by step. As soon as you have solved problem k (k = 1, ..., 2), write its"
        " final answer on its own line as Answer k::\\boxed{...}, with exactly one box per problem,"
        " then move on to the next problem."
    )


def test_custom_template():
    template = bcr.PromptTemplate(
        single="Q: {problem}", header="[{n}]", section="<{k}> {problem}", footer="end", separator="|"
    )
    assert bcr.pack_problems(["a"], template) == "Q: a"
    assert bcr.pack_problems(["a", "b", "c"], template) == "[3]|<1> a|<2> b|<3> c|end"


def test_packing_nothing_raises():
    with pytest.raises(ValueError, match="at least one problem"):
        bcr.pack_problems([])


# --------------------------------------------------------------------------------------------------
# Splitting: format and policy cases.
# --------------------------------------------------------------------------------------------------


def test_split_handles_nesting_spacing_and_escapes():
    response = (
        "Problem 1 is easy. Answer 1::\\boxed{\\frac{a}{b}}\n"
        "Now problem 2. Answer 2 :: \\boxed {\\{1, 2\\}}\n"
        "Answer  3::  \\boxed{ \\sqrt{\\frac{1}{2}} + {x}^{2} }"
    )
    assert bcr.split_answers(response, 3) == ["\\frac{a}{b}", "\\{1, 2\\}", "\\sqrt{\\frac{1}{2}} + {x}^{2}"]


@pytest.mark.parametrize(
    "response, expected",
    [
        pytest.param("Answer 1::\\boxed{1} Answer 2::\\boxed{2} Answer 3::\\boxed{3}", ["1", "2", "3"], id="clean"),
        pytest.param(
            "Answer 1::\\boxed{1} Answer 1::\\boxed{1} Answer 2::\\boxed{2}", [None, "2", None], id="duplicate-marker"
        ),
        pytest.param("Answer 1::\\boxed{1}\\boxed{4} Answer 2::\\boxed{2}", [None, "2", None], id="two-boxes"),
        pytest.param(
            "Answer 1::\\boxed{1}. Then \\boxed{7}. Answer 2::\\boxed{2}", [None, "2", None], id="stray-box-in-region"
        ),
        pytest.param("Answer 1::\\boxed{\\boxed{1}} Answer 2::\\boxed{2}", [None, "2", None], id="nested-box"),
        pytest.param(
            "Answer 2::\\boxed{2} Answer 1::\\boxed{1} Answer 3::\\boxed{3}", [None, "2", "3"], id="out-of-order"
        ),
        pytest.param("Answer 1::\\boxed{1} Answer 3::\\boxed{3}", ["1", None, "3"], id="skipped-problem"),
        pytest.param(
            "Answer 0::\\boxed{9} Answer 1::\\boxed{1} Answer 4::\\boxed{9}", ["1", None, None], id="out-of-range"
        ),
        pytest.param("Answer 1::\\boxed{1} Answer 7:: \\boxed{2}", ["1", None, None], id="extra-marker-ends-region"),
        pytest.param("\\boxed{1} Answer 1::\\boxed{2}", ["2", None, None], id="box-before-first-marker"),
        pytest.param("Answer 1::\\boxed{1} Answer 2::\\boxed{\\frac{1}{", ["1", None, None], id="truncated-box"),
        pytest.param(
            "Answer 1::\\boxed{} Answer 2::\\boxed{ } Answer 3::\\boxed 3", [None, None, None], id="empty-or-braceless"
        ),
        pytest.param("Answer 1:: 5 Answer 2::\\boxed{2}", [None, "2", None], id="no-box"),
        pytest.param("Answer 1::\\boxed{1}\\boxed{2}\\boxed{3}\\boxed{4}", [None, None, None], id="many-boxes"),
        pytest.param("answer 1::\\boxed{1} Answer 2: \\boxed{2}", [None, None, None], id="malformed-markers"),
        pytest.param("\\boxed{1} \\boxed{2} \\boxed{3}", [None, None, None], id="no-markers"),
        pytest.param(
            "Answer 99999999999999::\\boxed{1} Answer 1::\\boxed{1}", ["1", None, None], id="huge-marker-number"
        ),
    ],
)
def test_split_policy(response, expected):
    assert bcr.split_answers(response, 3) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        pytest.param("So the answer is \\boxed{42}.", ["42"], id="plain"),
        pytest.param("Maybe \\boxed{41}, no: \\boxed{42}.", [None], id="two-boxes"),
        pytest.param("Answer 1::\\boxed{42}", ["42"], id="marker"),
        pytest.param("Answer 1::\\boxed{42} \\boxed{41}", [None], id="marker-two-boxes"),
        pytest.param("no answer", [None], id="none"),
    ],
)
def test_split_single_problem_baseline_format(response, expected):
    assert bcr.split_answers(response, 1) == expected


def test_think_close_rule():
    thinking = "Let me try Answer 1::\\boxed{0} and \\boxed{9}. Hmm </think> wait, still thinking"
    answers = "</think>\nAnswer 1::\\boxed{1}\nAnswer 2::\\boxed{2}"
    assert bcr.split_answers(thinking + answers, 2, require_think_close=True) == ["1", "2"]
    assert bcr.split_answers("Answer 1::\\boxed{1}", 1, require_think_close=True) == [None]
    assert bcr.split_answers("Answer 1::\\boxed{1}", 1, require_think_close=False) == ["1"]
    # The thinking block contains a duplicate marker; without the rule it poisons problem 1.
    assert bcr.split_answers(thinking + answers, 2) == [None, "2"]


def test_split_rejects_bad_n():
    with pytest.raises(ValueError, match="n must be >= 1"):
        bcr.split_answers("Answer 1::\\boxed{1}", 0)


# --------------------------------------------------------------------------------------------------
# Splitting: properties.
# --------------------------------------------------------------------------------------------------

_ATOM = st.text(alphabet=string.ascii_lowercase + string.digits + "+-*/^_=.,;: ()[]|'", min_size=1, max_size=6)
_COMMAND = st.sampled_from(["\\frac", "\\sqrt", "\\pi", "\\{", "\\}", "\\left(", "\\right)", "\\cdot", "\\\\", "\\%"])
_LATEX = st.recursive(
    st.one_of(_ATOM, _COMMAND),
    lambda inner: st.one_of(inner.map(lambda s: "{" + s + "}"), st.lists(inner, min_size=2, max_size=3).map("".join)),
    max_leaves=12,
)
_ANSWER = _LATEX.map(str.strip).filter(bool)
_FILLER = st.text(alphabet=string.ascii_lowercase + string.digits + " \n.,=+()", max_size=30)
_SPACE = st.sampled_from(["", " ", "  ", "\n"])


@st.composite
def _responses(draw):
    """A response answering every problem of a packed prompt, with known answers."""
    n = draw(st.integers(1, 6))
    problems = draw(st.lists(_LATEX, min_size=n, max_size=n))
    answers = draw(st.lists(_ANSWER, min_size=n, max_size=n))
    parts = []
    for k, answer in enumerate(answers, start=1):
        spaces = [draw(_SPACE) for _ in range(4)]
        marker = f"Answer{spaces[0] or ' '}{k}{spaces[1]}::{spaces[2]}\\boxed{spaces[3]}"
        parts.append(draw(_FILLER) + marker + "{" + answer + "}")
    parts.append(draw(_FILLER))
    return problems, "".join(parts), answers


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_responses())
def test_pack_then_split_recovers_the_answers(case):
    problems, response, answers = case
    prompt = bcr.pack_problems(problems)
    if len(problems) == 1:
        assert prompt.startswith(problems[0] + "\n\n") and "\\boxed{}" in prompt
    else:
        sections = [prompt.index(f"### Problem {k}\n{p}\n\n") for k, p in enumerate(problems, start=1)]
        assert sections == sorted(sections)
    assert bcr.split_answers(response, len(answers)) == answers


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_responses(), st.lists(_ANSWER, max_size=3))
def test_thinking_block_is_ignored_and_required(case, thoughts):
    _, response, answers = case
    n = len(answers)
    thinking = "".join(f"Answer 1::\\boxed{{{t}}} \\boxed{{{t}}}" for t in thoughts)
    full = f"<think>{thinking}</think>{response}"
    assert bcr.split_answers(full, n, require_think_close=True) == answers
    assert bcr.split_answers(response, n, require_think_close=True) == [None] * n


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_responses())
def test_spans_tile_the_answer_section_up_to_each_box(case):
    _, response, answers = case
    spans = bcr.answer_spans(response, len(answers))
    start = 0
    for k, (span, answer) in enumerate(zip(spans, answers), start=1):
        assert span[0] == start
        segment = response[span[0] : span[1]]
        assert segment.endswith("{" + answer + "}")
        assert f"{k}" in segment and "::" in segment
        start = span[1]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("Answer :12{}\\boxed</think>x")), max_size=80), st.integers(1, 4))
def test_split_never_fails_on_arbitrary_text(response, n):
    answers = bcr.split_answers(response, n)
    assert len(answers) == n
    for answer in answers:
        assert answer is None or (answer and answer == answer.strip() and answer in response)


def test_hedging_with_many_boxes_never_scores_for_any_n():
    for n in range(1, 5):
        hedged = "".join(f"Answer {k}::" + "".join(f"\\boxed{{{g}}}" for g in range(5)) for k in range(1, n + 1))
        assert bcr.split_answers(hedged, n) == [None] * n


# --------------------------------------------------------------------------------------------------
# Segments.
# --------------------------------------------------------------------------------------------------


def test_answer_spans_by_hand():
    response = "think</think>ab Answer 1::\\boxed{1}cd Answer 2::\\boxed{x}tail"
    # "think</think>" is 13 characters, "ab " / "cd " 3, "Answer k::" 10 and "\\boxed{.}" 9.
    assert bcr.answer_spans(response, 2, require_think_close=True) == [(13, 35), (35, 57)]
    assert bcr.answer_spans(response, 2) == [(0, 35), (35, 57)]
    # A problem without a parsed answer has no span; its text joins the next segment.
    assert bcr.answer_spans("Answer 2::\\boxed{2}", 2) == [None, (0, 19)]


def test_segment_ids_from_offsets():
    spans = [(0, 10), None, (10, 20)]
    offsets = [(0, 4), (4, 10), (10, 12), (12, 21), (20, 25), (0, 0), (25, 25)]
    ids = bcr.segment_ids(spans, offsets, length=9)
    # Tokens start in segment 1, 1, 3, 3; then after the last answer, then zero-width (special) tokens, then padding.
    np.testing.assert_array_equal(ids, [1, 1, 3, 3, 0, 0, 0, 0, 0])
    assert ids.dtype == np.int32
    with pytest.raises(ValueError, match="shorter"):
        bcr.segment_ids(spans, offsets, length=3)


def test_segment_ids_match_spans_character_by_character():
    response = "Answer 1::\\boxed{a}mid Answer 2::\\boxed{b} end"
    spans = bcr.answer_spans(response, 2)
    offsets = [(i, i + 1) for i in range(len(response))]  # One token per character.
    ids = bcr.segment_ids(spans, offsets)
    expected = np.zeros(len(response), np.int32)
    for k, (start, end) in enumerate(spans, start=1):
        expected[start:end] = k
    np.testing.assert_array_equal(ids, expected)
    assert "".join(ch for ch, i in zip(response, ids) if i == 2) == "mid Answer 2::\\boxed{b}"


# --------------------------------------------------------------------------------------------------
# Token layout.
# --------------------------------------------------------------------------------------------------


def test_assemble_prompts_left_pads_into_buckets():
    batch = bcr.assemble_prompts([[5, 6, 7], [8]], pad_id=0, buckets=[2, 4, 8])
    np.testing.assert_array_equal(batch.tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(batch.lengths, [3, 1])
    assert batch.tokens.dtype == np.int32 and batch.lengths.dtype == np.int32
    assert bcr.assemble_prompts([[1] * 5], pad_id=9, multiple_of=4).tokens.shape == (1, 8)
    assert bcr.assemble_prompts([[1] * 5], pad_id=9).tokens.shape == (1, 5)


def test_assemble_prompts_errors():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        bcr.assemble_prompts([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="exceeds the largest bucket 4"):
        bcr.assemble_prompts([[1] * 5], pad_id=0, buckets=[2, 4])
    with pytest.raises(ValueError, match="at least one prompt"):
        bcr.assemble_prompts([], pad_id=0)


def _random_sampler_output(rng, batch=6, prompt_width=7, response_width=5):
    prompt_lengths = rng.integers(1, prompt_width + 1, size=batch).astype(np.int32)
    response_lengths = rng.integers(0, response_width + 1, size=batch).astype(np.int32)
    # Garbage in the padding: the layout must ignore it.
    prompts = rng.integers(1, 1000, size=(batch, prompt_width)).astype(np.int32)
    responses = rng.integers(1, 1000, size=(batch, response_width)).astype(np.int32)
    return prompts, prompt_lengths, responses, response_lengths


def _reference_sequences(prompts, prompt_lengths, responses, response_lengths, pad_id):
    batch, prompt_width = prompts.shape
    width = prompt_width + responses.shape[1]
    tokens = np.full((batch, width), pad_id, np.int32)
    prompt_mask = np.zeros((batch, width), bool)
    response_mask = np.zeros((batch, width), bool)
    for b in range(batch):
        lp, lr = prompt_lengths[b], response_lengths[b]
        tokens[b, : lp + lr] = np.concatenate([prompts[b, prompt_width - lp :], responses[b, :lr]])
        prompt_mask[b, :lp] = True
        response_mask[b, lp : lp + lr] = True
    return tokens, prompt_mask, response_mask


@pytest.mark.parametrize("seed", range(3))
def test_assemble_sequences_matches_numpy_reference(seed):
    inputs = _random_sampler_output(np.random.default_rng(seed))
    lowered = bcr.assemble_sequences.lower(*inputs, -1)  # A jax.jit function: lowers and compiles.
    lowered.compile()
    result = bcr.assemble_sequences(*inputs, -1)
    for got, want in zip(result, _reference_sequences(*inputs, -1)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_place_response_values_matches_numpy_reference():
    rng = np.random.default_rng(7)
    prompts, prompt_lengths, responses, response_lengths = _random_sampler_output(rng)
    values = rng.integers(1, 4, size=responses.shape).astype(np.int32)
    placed = np.asarray(bcr.place_response_values(values, prompt_lengths, prompts.shape[1]))
    expected = np.zeros((values.shape[0], prompts.shape[1] + values.shape[1]), np.int32)
    for b, lp in enumerate(prompt_lengths):
        expected[b, lp : lp + values.shape[1]] = values[b]
    np.testing.assert_array_equal(placed, expected)
    # Aligned with assemble_sequences: response positions carry the response's values.
    response_mask = np.asarray(
        bcr.assemble_sequences(prompts, prompt_lengths, values, response_lengths, 0).response_mask
    )
    np.testing.assert_array_equal(
        placed[response_mask], np.concatenate([values[b, :n] for b, n in enumerate(response_lengths)])
    )
    assert isinstance(bcr.place_response_values, jax.stages.Wrapped)
