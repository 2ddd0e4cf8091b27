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
                              (optional shaping: - length penalty, + DAPO overlong penalty)
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
      length_penalty: λ of the explicit length-penalty baseline the paper shows collapsing: the sequence reward
        becomes ``reward - λ * |y| / budget`` (0 = BCR's pure accuracy reward).
      overlong_buffer: DAPO's soft overlong punishment (verl ``reward_model.overlong_buffer.len``): the last this many
        tokens of the budget add :func:`overlong_penalty` to the sequence reward (0 = off).
      overlong_penalty_factor: The penalty at the budget is ``-overlong_penalty_factor`` (verl
        ``overlong_buffer.penalty_factor``).
    """

    estimator: str = "grpo"
    reduction: Reduction = "mean"
    format_weight: float = 0.0
    credit: Credit = "sequence"
    length_penalty: float = 0.0
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0

    def __post_init__(self):
        get_advantage_fn(self.estimator)
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.credit not in ("sequence", "segment"):
            raise ValueError(f"credit must be 'sequence' or 'segment', got {self.credit!r}")
        if self.overlong_buffer < 0 or self.overlong_penalty_factor < 0:
            raise ValueError(f"overlong_buffer and overlong_penalty_factor must be >= 0, got {self.overlong_buffer}, "
                             f"{self.overlong_penalty_factor}")


def overlong_penalty(response_lengths, budget: int, buffer: int, factor: float = 1.0):
    """DAPO's soft overlong punishment ``[B]``: 0 up to ``budget - buffer`` response tokens, then linear down to
    ``-factor`` at ``budget`` (a response cut off by the budget gets the whole ``-factor``)."""
    if not 0 < buffer <= budget:
        raise ValueError(f"overlong buffer must be in 1..budget={budget}, got {buffer}")
    excess = jnp.asarray(response_lengths, jnp.float32) - (budget - buffer)
    return jnp.minimum(-factor * excess / buffer, 0.0)


class Advantages(NamedTuple):
    sequence_rewards: jax.Array  # [B]
    sequence_advantages: jax.Array  # [B]
    token_advantages: jax.Array  # [B, T]


@functools.partial(jax.jit, static_argnames=("config", "group_size", "budget"))
def compute_advantages(
    config: RewardConfig,
    group_size: int,
    correct: jax.Array,
    answered: jax.Array,
    problem_mask: jax.Array,
    response_mask: jax.Array,
    segment_ids: jax.Array | None = None,
    response_lengths: jax.Array | None = None,
    budget: int | None = None,
) -> Advantages:
    """Verdicts ``[B, N]`` to token advantages ``[B, T]`` as configured (see module docstring).

    ``response_lengths [B]`` and ``budget`` are needed only for ``config.length_penalty`` and
    ``config.overlong_buffer``.
    """
    estimate = get_advantage_fn(config.estimator)
    per_problem = instance_rewards(correct, answered, problem_mask, config.format_weight)
    rewards = sequence_rewards(per_problem, problem_mask, config.reduction)
    if (config.length_penalty or config.overlong_buffer) and (response_lengths is None or not budget):
        raise ValueError("length_penalty and overlong_buffer need response_lengths and budget")
    if config.length_penalty:
        rewards = rewards - config.length_penalty * response_lengths.astype(jnp.float32) / budget
    if config.overlong_buffer:
        rewards = rewards + overlong_penalty(response_lengths, budget, config.overlong_buffer,
                                             config.overlong_penalty_factor)
    advantages = estimate(rewards, group_size)
    if config.credit == "sequence":
        return Advantages(rewards, advantages, token_advantages(advantages, response_mask))
    if segment_ids is None:
        raise ValueError("credit='segment' needs segment_ids")
    per_token = segment_token_advantages(segment_ids, estimate(per_problem, group_size), advantages, response_mask)
    return Advantages(rewards, advantages, per_token)


# --------------------------------------------------------------------------------------------------
# Policy losses.
#
# A loss is a per-token value [B, T]; an aggregation turns the loss mask into per-token weights that
# sum the per-token values to the scalar loss. Weights are computed once over a whole mini-batch
# (before it is split into micro-batches), so accumulating micro-batch gradients gives exactly the
# mini-batch gradient for every aggregation.
#
# Rows without loss tokens (a truncated response under `mask_truncated`, a dropped tied group, an
# empty response) follow one convention in every aggregation, verl's: such a row adds nothing to any
# numerator and still counts as a row, so every "seq-mean" divides by all B rows of the mini-batch
# (verl's `global_batch_size`); token-mean divides by the loss tokens, to which an empty row adds
# nothing. A masked token leaves the numerator and every denominator together (the opposite is
# TRL#6369's bug).
# --------------------------------------------------------------------------------------------------

# verl clamps log(ratio) to +-20 before exp: the ratio stays finite in f32, and past it the gradient is 0.
LOG_RATIO_CLAMP = 20.0


def importance_ratio(logprobs, old_logprobs):
    """``exp(logp - old_logp)`` with the log-ratio clamped to ``+-LOG_RATIO_CLAMP`` (as verl)."""
    return jnp.exp(jnp.clip(logprobs - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float,
                      clip_ratio_c: float = 0.0):
    """PPO's clipped surrogate with separate bounds (DAPO's clip-higher): per-token loss
    ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``, where the clipped term was the smaller one, and where
    the dual clip bound.

    With ``clip_ratio_c > 0`` (dual-clip PPO, verl's ``clip_ratio_c``), a negative-advantage token's loss is capped
    at ``-clip_ratio_c * A``: a token whose ratio exploded cannot dominate the batch (its gradient is then 0).
    """
    ratio = importance_ratio(logprobs, old_logprobs)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -jnp.minimum(unclipped, clipped)
    if not clip_ratio_c:
        return per_token, clipped < unclipped, jnp.zeros(advantages.shape, bool)
    cap = -clip_ratio_c * advantages
    dual_clipped = (advantages < 0) & (per_token > cap)
    return jnp.where(dual_clipped, cap, per_token), clipped < unclipped, dual_clipped


def unclipped_surrogate(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float,
                        clip_ratio_c: float = 0.0):
    """The importance-weighted policy gradient ``-r A`` without a trust region (a baseline; clip bounds unused)."""
    del clip_low, clip_high, clip_ratio_c
    never = jnp.zeros(advantages.shape, bool)
    return -importance_ratio(logprobs, old_logprobs) * advantages, never, never


POLICY_LOSSES = {"clipped": clipped_surrogate, "unclipped": unclipped_surrogate}


def token_mean_weights(loss_mask, budget: int):
    """Every loss token of the mini-batch counts equally (DAPO; verl ``token-mean``)."""
    del budget
    mask = loss_mask.astype(jnp.float32)
    return mask / jnp.maximum(mask.sum(), 1.0)


def seq_mean_token_sum_weights(loss_mask, budget: int):
    """Each row's token sum, then the mean over all rows (verl ``seq-mean-token-sum``): long responses weigh more."""
    del budget
    mask = loss_mask.astype(jnp.float32)
    return mask / mask.shape[0]


def seq_mean_token_mean_weights(loss_mask, budget: int):
    """Mean over each row's loss tokens, then over all rows (the original GRPO; verl ``seq-mean-token-mean``)."""
    del budget
    mask = loss_mask.astype(jnp.float32)
    tokens_per_row = mask.sum(axis=1, keepdims=True)
    return mask / jnp.maximum(tokens_per_row, 1.0) / mask.shape[0]


def seq_mean_token_sum_norm_weights(loss_mask, budget: int):
    """Dr. GRPO: each row's token sum over a constant, the budget, then the mean over all rows -- no length bias.

    verl's ``seq-mean-token-sum-norm`` divides the summed row losses by ``loss_scale_factor``; this is that with
    ``loss_scale_factor = budget * rows`` (Dr. GRPO's ``1/G sum_i sum_t / L_max``), fixed for a given batch shape.
    """
    mask = loss_mask.astype(jnp.float32)
    return mask / (budget * mask.shape[0])


AGGREGATIONS = {
    "token-mean": token_mean_weights,
    "seq-mean-token-sum": seq_mean_token_sum_weights,
    "seq-mean-token-mean": seq_mean_token_mean_weights,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm_weights,
}


def k3_kl(logprobs, ref_logprobs):
    """Schulman's k3 estimator of KL(policy || reference) per token: ``exp(d) - d - 1`` with ``d = ref - logp``
    (unbiased, always >= 0)."""
    delta = ref_logprobs - logprobs
    return jnp.exp(delta) - delta - 1.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The policy-gradient objective (hashable: a static argument under ``jit``).

    Attributes:
      policy_loss: A key of :data:`POLICY_LOSSES`.
      clip_low / clip_high: Ratio bounds ``[1 - clip_low, 1 + clip_high]``.
      clip_ratio_c: Dual-clip bound on negative-advantage tokens (verl ``clip_ratio_c``); 0 = off, else > 1.
      aggregation: A key of :data:`AGGREGATIONS`.
      budget: The response budget (``seq-mean-token-sum-norm`` divides by it).
      kl_weight: Weight of the k3 KL to reference log-probs (0: none needed).
      entropy_weight: Weight of an entropy bonus (subtracted from the loss).
    """

    policy_loss: str = "clipped"
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float = 0.0
    aggregation: str = "token-mean"
    budget: int = 1
    kl_weight: float = 0.0
    entropy_weight: float = 0.0

    def __post_init__(self):
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"unknown policy loss {self.policy_loss!r}; valid choices: {', '.join(POLICY_LOSSES)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; valid choices: {', '.join(AGGREGATIONS)}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip bounds need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, "
                             f"{self.clip_high}")
        if self.clip_ratio_c and not (self.clip_ratio_c > 1 and self.policy_loss == "clipped"):
            raise ValueError(f"clip_ratio_c (dual clip) must be 0 (off) or > 1 with policy_loss='clipped', got "
                             f"{self.clip_ratio_c} with {self.policy_loss!r}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")


def loss_weights(config: LossConfig, loss_mask):
    """Per-token weights ``[B, T]`` of ``config.aggregation`` over a whole mini-batch."""
    return AGGREGATIONS[config.aggregation](loss_mask, config.budget)


def policy_loss(config: LossConfig, logprobs, old_logprobs, advantages, weights, ref_logprobs=None, entropy=None):
    """The scalar loss ``sum(weights * per-token loss)`` and token sums for metrics.

    ``weights`` come from :func:`loss_weights` (zero off the loss mask). Returns ``(loss, sums)``; ``sums`` holds
    ``tokens``, ``clipped`` (and ``dual_clipped`` with the dual clip on), ``kl`` and ``entropy`` summed over the loss
    tokens (divide by ``tokens`` for means), so that micro-batch results add up.
    """
    per_token, was_clipped, was_dual_clipped = POLICY_LOSSES[config.policy_loss](
        logprobs, old_logprobs, advantages, config.clip_low, config.clip_high, config.clip_ratio_c)
    on_loss = weights > 0
    sums = {"tokens": on_loss.sum().astype(jnp.float32),
            "clipped": jnp.sum(was_clipped & on_loss).astype(jnp.float32)}
    if config.clip_ratio_c:
        sums["dual_clipped"] = jnp.sum(was_dual_clipped & on_loss).astype(jnp.float32)
    if config.kl_weight:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + config.kl_weight * kl
        sums["kl"] = jnp.sum(jnp.where(on_loss, kl, 0.0))
    if entropy is not None:
        if config.entropy_weight:
            per_token = per_token - config.entropy_weight * entropy
        sums["entropy"] = jnp.sum(jnp.where(on_loss, entropy, 0.0))
    # where, not multiply: a masked-out token's loss may be inf (an extreme ratio) and inf * 0 is NaN.
    return jnp.sum(jnp.where(on_loss, weights * per_token, 0.0)), sums


def tied_groups(rewards, group_size: int):
    """``[B]`` bool: the row's group has all-equal rewards (its GRPO advantages are all 0).

    ``rewards`` is ``[B]`` or ``[B, K]``; with K columns (e.g. the sequence reward beside each problem's reward, for
    segment credit) a group is tied only if every column ties across its G samples.
    """
    grouped = rewards.reshape(-1, group_size, *rewards.shape[1:])
    tied = jnp.all(grouped == grouped[:, :1], axis=tuple(range(1, grouped.ndim)))
    return jnp.repeat(tied, group_size)
