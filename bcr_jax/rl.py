"""Rewards and advantages for BCR's GRPO, as jittable pure functions of arrays.

Layout: rows are prompt-major, ``B = P * G`` -- row ``p * G + g`` is sample ``g`` of prompt ``p`` --
and each prompt holds up to ``N`` problems. Inputs come from the task layer
(:mod:`bcr_jax.bcr`, :mod:`bcr_jax.grading`):

* ``correct [B, N]``: the grader's per-instance verdicts;
* ``answered [B, N]``: a well-formed answer was parsed (``split_answers`` gave a string);
* ``problem_mask [B, N]``: slot k holds a real problem (prompts may pack fewer than N);
* ``response_mask [B, T]`` and, for segment credit, ``segment_ids [B, T]`` (0..N).

Pipeline (:func:`compute_advantages` runs it end to end under one ``jit``)::

    instance_rewards [B, N] = problem_mask * (correct + format_weight * answered)
    sequence_rewards [B]    = sum or mean of instance rewards over real problems
    advantages [B]          = estimator over the G samples of each prompt
    token_advantages [B, T] = advantage on every response token

The paper's reward is pure accuracy (``format_weight = 0``); a problem whose answer was cut off by
the token budget is simply not correct. With ``reduction="mean"`` the format term is
``format_weight`` times the fraction of well-formed answers; with ``"sum"`` it is summed likewise.

Segment-level credit (``credit="segment"``) is an option beside the paper's whole-sequence reward:
each problem's instance reward is normalised within its group (problem k across the G samples of
its prompt), and a response token in problem k's segment gets problem k's advantage. Segment 0
(thinking block, text after the last parsed answer, unparsed responses) gets the whole-sequence
advantage, so a response without any parsed answer is trained exactly as under sequence credit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Reduction = Literal["sum", "mean"]
Credit = Literal["sequence", "segment"]
AdvantageFn = Callable[[jax.Array, int], jax.Array]


# --------------------------------------------------------------------------------------------------
# Rewards.
# --------------------------------------------------------------------------------------------------


@jax.jit
def instance_rewards(
    correct: jax.Array, answered: jax.Array, problem_mask: jax.Array, format_weight: float = 0.0
) -> jax.Array:
    """Per-problem reward ``[B, N]``: correctness plus the optional format term, 0 on padding."""
    reward = correct.astype(jnp.float32) + format_weight * answered.astype(jnp.float32)
    return jnp.where(problem_mask, reward, 0.0)


@functools.partial(jax.jit, static_argnames="reduction")
def sequence_rewards(rewards: jax.Array, problem_mask: jax.Array, reduction: Reduction = "mean") -> jax.Array:
    """Reduces instance rewards ``[B, N]`` over the real problems of each row to ``[B]``."""
    total = jnp.sum(jnp.where(problem_mask, rewards, 0.0), axis=-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / jnp.maximum(jnp.sum(problem_mask, axis=-1), 1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


# --------------------------------------------------------------------------------------------------
# Group-relative advantage estimators. Each maps rewards [B, ...] to advantages of the same shape,
# normalising over the G samples of each prompt independently for every trailing index.
# --------------------------------------------------------------------------------------------------


def _centred(rewards: jax.Array, group_size: int) -> jax.Array:
    """Rewards ``[B, ...]`` as ``[P, G, ...]`` groups minus their group means."""
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"batch of {rewards.shape[0]} rows is not a multiple of group_size={group_size}")
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size, *rewards.shape[1:])
    # XLA computes a mean as sum * (1/G), which is inexact; shifting by the group's first reward
    # first makes a group of equal rewards centre to exactly 0 instead of to rounding noise that
    # GRPO's division by a ~0 std would blow up into a spurious advantage.
    shifted = grouped - grouped[:, :1]
    return shifted - shifted.mean(axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames="group_size")
def grpo_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """GRPO: ``(r - mean) / (std + eps)`` within each group (unbiased std, as in TRL and tunix)."""
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2 for a standard deviation, got {group_size}")
    centred = _centred(rewards, group_size)
    std = centred.std(axis=1, ddof=1, keepdims=True)
    return (centred / (std + eps)).reshape(rewards.shape)


@functools.partial(jax.jit, static_argnames="group_size")
def dr_grpo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """Dr. GRPO: ``r - mean`` within each group (no std normalisation, which biases difficulty)."""
    return _centred(rewards, group_size).reshape(rewards.shape)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
}


def get_advantage_fn(name: str) -> AdvantageFn:
    """The estimator registered as ``name`` in :data:`ADVANTAGE_ESTIMATORS`."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        valid = ", ".join(sorted(ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown advantage estimator {name!r}; valid choices: {valid}") from None


# --------------------------------------------------------------------------------------------------
# Token advantages.
# --------------------------------------------------------------------------------------------------


@jax.jit
def token_advantages(advantages: jax.Array, response_mask: jax.Array) -> jax.Array:
    """Broadcasts sequence advantages ``[B]`` onto the response tokens ``[B, T]``."""
    return jnp.where(response_mask, advantages[:, None], 0.0)


@jax.jit
def segment_token_advantages(
    segment_ids: jax.Array,
    instance_advantages: jax.Array,
    sequence_advantages: jax.Array,
    response_mask: jax.Array,
) -> jax.Array:
    """Token advantages ``[B, T]`` from segment ids ``[B, T]`` (0..N).

    A response token in segment k (1..N) gets ``instance_advantages[:, k - 1]``; segment 0 -- and
    any id outside 1..N -- gets ``sequence_advantages``. Non-response tokens get 0.
    """
    num_problems = instance_advantages.shape[1]
    in_problem = (segment_ids >= 1) & (segment_ids <= num_problems)
    column = jnp.clip(segment_ids - 1, 0, num_problems - 1)
    per_problem = jnp.take_along_axis(instance_advantages, column, axis=1)
    advantages = jnp.where(in_problem, per_problem, sequence_advantages[:, None])
    return jnp.where(response_mask, advantages, 0.0)


# --------------------------------------------------------------------------------------------------
# End to end.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How verdicts become advantages (hashable: it is a static argument under ``jit``).

    Attributes:
      estimator: A key of :data:`ADVANTAGE_ESTIMATORS`.
      reduction: ``"mean"`` or ``"sum"`` of the instance rewards of a sequence.
      format_weight: Weight of the well-formed-answer term (0 in the paper).
      credit: ``"sequence"`` (the paper) or ``"segment"`` (per-problem credit by segment id).
    """

    estimator: str = "grpo"
    reduction: Reduction = "mean"
    format_weight: float = 0.0
    credit: Credit = "sequence"

    def __post_init__(self):
        get_advantage_fn(self.estimator)
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.credit not in ("sequence", "segment"):
            raise ValueError(f"credit must be 'sequence' or 'segment', got {self.credit!r}")


class Advantages(NamedTuple):
    sequence_rewards: jax.Array  # [B]
    sequence_advantages: jax.Array  # [B]
    token_advantages: jax.Array  # [B, T]


@functools.partial(jax.jit, static_argnames=("config", "group_size"))
def compute_advantages(
    config: RewardConfig,
    group_size: int,
    correct: jax.Array,
    answered: jax.Array,
    problem_mask: jax.Array,
    response_mask: jax.Array,
    segment_ids: jax.Array | None = None,
) -> Advantages:
    """Verdicts ``[B, N]`` to token advantages ``[B, T]`` as configured (see module docstring)."""
    estimate = get_advantage_fn(config.estimator)
    per_problem = instance_rewards(correct, answered, problem_mask, config.format_weight)
    rewards = sequence_rewards(per_problem, problem_mask, config.reduction)
    advantages = estimate(rewards, group_size)
    if config.credit == "sequence":
        return Advantages(rewards, advantages, token_advantages(advantages, response_mask))
    if segment_ids is None:
        raise ValueError("credit='segment' needs segment_ids")
    per_token = segment_token_advantages(segment_ids, estimate(per_problem, group_size), advantages, response_mask)
    return Advantages(rewards, advantages, per_token)


# --------------------------------------------------------------------------------------------------
# Policy losses: added by the trainer issue.
# --------------------------------------------------------------------------------------------------
