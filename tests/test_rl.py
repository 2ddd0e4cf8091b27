"""Tests for bcr_jax.rl: every transform against a plain numpy re-implementation, under jax.jit."""

import jax
import numpy as np
import pytest

from bcr_jax import rl

PROMPTS, GROUP, PROBLEMS, TOKENS = 4, 5, 3, 11
BATCH = PROMPTS * GROUP


def _random_verdicts(seed: int):
    rng = np.random.default_rng(seed)
    # Prompts pack 1..N problems; the mask is shared by the G samples of a prompt.
    problems_per_prompt = rng.integers(1, PROBLEMS + 1, size=PROMPTS)
    problem_mask = np.repeat(np.arange(PROBLEMS)[None, :] < problems_per_prompt[:, None], GROUP, axis=0)
    answered = rng.random((BATCH, PROBLEMS)) < 0.8
    correct = answered & (rng.random((BATCH, PROBLEMS)) < 0.5)
    response_lengths = rng.integers(0, TOKENS + 1, size=BATCH)
    response_mask = np.arange(TOKENS)[None, :] < response_lengths[:, None]
    segment_ids = rng.integers(0, PROBLEMS + 1, size=(BATCH, TOKENS)).astype(np.int32)
    return correct, answered, problem_mask, response_mask, segment_ids


# Straightforward numpy references, written row by row / group by group.


def _np_instance_rewards(correct, answered, problem_mask, format_weight):
    rewards = np.zeros(correct.shape, np.float64)
    for b in range(correct.shape[0]):
        for k in range(correct.shape[1]):
            if problem_mask[b, k]:
                rewards[b, k] = float(correct[b, k]) + format_weight * float(answered[b, k])
    return rewards


def _np_sequence_rewards(rewards, problem_mask, reduction):
    out = []
    for row, mask in zip(rewards, problem_mask):
        real = row[mask]
        out.append(real.sum() if reduction == "sum" else (real.mean() if len(real) else 0.0))
    return np.array(out)


def _np_group_advantages(rewards, group_size, normalise):
    out = np.zeros_like(rewards, dtype=np.float64)
    for start in range(0, rewards.shape[0], group_size):
        group = rewards[start : start + group_size].astype(np.float64)
        centred = group - group.mean(axis=0)
        out[start : start + group_size] = centred / (group.std(axis=0, ddof=1) + 1e-6) if normalise else centred
    return out


def _np_segment_token_advantages(segment_ids, instance_advantages, sequence_advantages, response_mask):
    out = np.zeros(segment_ids.shape)
    for b in range(segment_ids.shape[0]):
        for t in range(segment_ids.shape[1]):
            if response_mask[b, t]:
                k = segment_ids[b, t]
                out[b, t] = instance_advantages[b, k - 1] if k >= 1 else sequence_advantages[b]
    return out


def _assert_close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _assert_jitted(fn):
    assert isinstance(fn, jax.stages.Wrapped), f"{fn.__name__} is not a jax.jit function"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("format_weight", [0.0, 0.3])
def test_instance_rewards(seed, format_weight):
    correct, answered, problem_mask, *_ = _random_verdicts(seed)
    _assert_jitted(rl.instance_rewards)
    got = rl.instance_rewards(correct, answered, problem_mask, format_weight)
    _assert_close(got, _np_instance_rewards(correct, answered, problem_mask, format_weight))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_rewards(seed, reduction):
    correct, answered, problem_mask, *_ = _random_verdicts(seed)
    rewards = _np_instance_rewards(correct, answered, problem_mask, 0.2)
    _assert_jitted(rl.sequence_rewards)
    got = rl.sequence_rewards(rewards, problem_mask, reduction)
    _assert_close(got, _np_sequence_rewards(rewards, problem_mask, reduction))


def test_sequence_rewards_by_hand():
    rewards = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    mask = np.array([[True, True, True], [True, False, False]])
    _assert_close(rl.sequence_rewards(rewards, mask, "mean"), [2 / 3, 1.0])
    _assert_close(rl.sequence_rewards(rewards, mask, "sum"), [2.0, 1.0])
    with pytest.raises(ValueError, match="reduction"):
        rl.sequence_rewards(rewards, mask, "max")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name, normalise", [("grpo", True), ("dr_grpo", False)])
def test_advantage_estimators(seed, name, normalise):
    rng = np.random.default_rng(seed)
    estimator = rl.get_advantage_fn(name)
    _assert_jitted(estimator)
    # Sequence rewards [B] and per-problem rewards [B, N], including groups with equal rewards.
    for rewards in (rng.random(BATCH), rng.integers(0, 2, size=(BATCH, PROBLEMS)).astype(np.float32)):
        _assert_close(estimator(rewards, GROUP), _np_group_advantages(rewards, GROUP, normalise))


def test_grpo_by_hand():
    # One group of two: mean 0.5, unbiased std sqrt(0.5).
    _assert_close(rl.grpo_advantages(np.array([1.0, 0.0]), 2), [0.5 / np.sqrt(0.5), -0.5 / np.sqrt(0.5)])
    _assert_close(rl.dr_grpo_advantages(np.array([1.0, 0.0, 0.0, 0.0]), 4), [0.75, -0.25, -0.25, -0.25])
    # A group where every sample scored the same carries no signal: exactly zero, not rounding
    # noise divided by a ~0 std.
    rewards = np.array([[1.0, 0.3]] * 5 + [[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for estimator in (rl.grpo_advantages, rl.dr_grpo_advantages):
        np.testing.assert_array_equal(np.asarray(estimator(rewards, 5))[:5], 0.0)


def test_estimator_errors():
    with pytest.raises(ValueError, match="valid choices: dr_grpo, grpo"):
        rl.get_advantage_fn("ppo")
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        rl.grpo_advantages(np.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rl.grpo_advantages(np.zeros(3), 1)


@pytest.mark.parametrize("seed", range(3))
def test_token_advantages(seed):
    *_, response_mask, _ = _random_verdicts(seed)
    advantages = np.random.default_rng(seed).normal(size=BATCH)
    _assert_jitted(rl.token_advantages)
    _assert_close(rl.token_advantages(advantages, response_mask), advantages[:, None] * response_mask)


@pytest.mark.parametrize("seed", range(3))
def test_segment_token_advantages(seed):
    *_, response_mask, segment_ids = _random_verdicts(seed)
    rng = np.random.default_rng(seed)
    instance_advantages = rng.normal(size=(BATCH, PROBLEMS))
    sequence_advantages = rng.normal(size=BATCH)
    _assert_jitted(rl.segment_token_advantages)
    got = rl.segment_token_advantages(segment_ids, instance_advantages, sequence_advantages, response_mask)
    want = _np_segment_token_advantages(segment_ids, instance_advantages, sequence_advantages, response_mask)
    _assert_close(got, want)


def test_segment_ids_out_of_range_fall_back_to_the_sequence_advantage():
    segment_ids = np.array([[0, 1, 2, 3, -1]])
    got = rl.segment_token_advantages(segment_ids, np.array([[10.0, 20.0]]), np.array([5.0]), np.ones((1, 5), bool))
    _assert_close(got, [[5.0, 10.0, 20.0, 5.0, 5.0]])


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(
    "config",
    [
        rl.RewardConfig(),
        rl.RewardConfig(estimator="dr_grpo", reduction="sum", format_weight=0.1),
        rl.RewardConfig(credit="segment"),
        rl.RewardConfig(estimator="dr_grpo", format_weight=0.5, credit="segment"),
    ],
    ids=["paper", "dr-grpo-sum-format", "segment", "dr-grpo-segment-format"],
)
def test_compute_advantages_end_to_end(seed, config):
    correct, answered, problem_mask, response_mask, segment_ids = _random_verdicts(seed)
    _assert_jitted(rl.compute_advantages)
    result = rl.compute_advantages(config, GROUP, correct, answered, problem_mask, response_mask, segment_ids)

    normalise = config.estimator == "grpo"
    per_problem = _np_instance_rewards(correct, answered, problem_mask, config.format_weight)
    rewards = _np_sequence_rewards(per_problem, problem_mask, config.reduction)
    advantages = _np_group_advantages(rewards, GROUP, normalise)
    if config.credit == "sequence":
        tokens = advantages[:, None] * response_mask
    else:
        instance = _np_group_advantages(per_problem, GROUP, normalise)
        tokens = _np_segment_token_advantages(segment_ids, instance, advantages, response_mask)
    _assert_close(result.sequence_rewards, rewards)
    _assert_close(result.sequence_advantages, advantages)
    _assert_close(result.token_advantages, tokens)


def test_segment_credit_without_parsed_answers_equals_sequence_credit():
    correct, answered, problem_mask, response_mask, _ = _random_verdicts(0)
    no_segments = np.zeros((BATCH, TOKENS), np.int32)
    segment = rl.compute_advantages(
        rl.RewardConfig(credit="segment"), GROUP, correct, answered, problem_mask, response_mask, no_segments
    )
    sequence = rl.compute_advantages(rl.RewardConfig(), GROUP, correct, answered, problem_mask, response_mask)
    _assert_close(segment.token_advantages, np.asarray(sequence.token_advantages))


def test_segment_credit_by_hand():
    # One prompt, two samples, two problems. Sample 0 solves problem 1 only, sample 1 problem 2 only:
    # equal sequence rewards (no sequence signal) but opposite per-problem credit.
    correct = np.array([[True, False], [False, True]])
    mask = np.ones((2, 2), bool)
    segment_ids = np.array([[1, 1, 2, 0], [1, 2, 2, 0]])
    result = rl.compute_advantages(
        rl.RewardConfig(estimator="dr_grpo", credit="segment"),
        2,
        correct,
        mask,
        mask,
        np.ones((2, 4), bool),
        segment_ids,
    )
    _assert_close(result.sequence_advantages, [0.0, 0.0])
    _assert_close(result.token_advantages, [[0.5, 0.5, -0.5, 0.0], [-0.5, 0.5, 0.5, 0.0]])


def test_reward_config_validation():
    with pytest.raises(ValueError, match="valid choices"):
        rl.RewardConfig(estimator="reinforce")
    with pytest.raises(ValueError, match="reduction"):
        rl.RewardConfig(reduction="max")
    with pytest.raises(ValueError, match="credit"):
        rl.RewardConfig(credit="token")
    correct, answered, problem_mask, response_mask, _ = _random_verdicts(0)
    with pytest.raises(ValueError, match="segment_ids"):
        rl.compute_advantages(rl.RewardConfig(credit="segment"), GROUP, correct, answered, problem_mask, response_mask)
