"""Policy losses and aggregations against numpy re-implementations, and their gradients against finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcr_jax import rl

B, T, BUDGET = 6, 9, 12


def _inputs(seed, *, with_empty_row=True):
    rng = np.random.default_rng(seed)
    logprobs = rng.normal(-1.5, 0.6, (B, T))
    old_logprobs = logprobs + rng.normal(0, 0.3, (B, T))  # ratios spread on both sides of the clip range
    advantages = np.repeat(rng.normal(0, 1, (B, 1)), T, axis=1)
    mask = rng.random((B, T)) < 0.7
    if with_empty_row:
        mask[2] = False  # a sequence without loss tokens (truncated and masked, or a dropped group)
    ref_logprobs = logprobs + rng.normal(0, 0.2, (B, T))
    entropy = rng.uniform(0.1, 2.0, (B, T))
    return logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy


# ---- numpy references, written from the definitions ------------------------------------------------------------

def np_weights(aggregation, mask):
    m = mask.astype(np.float64)
    if aggregation == "token-mean":
        return m / max(m.sum(), 1)
    if aggregation == "seq-mean-token-mean":
        lengths = m.sum(axis=1)
        rows = max((lengths > 0).sum(), 1)
        return np.where(lengths[:, None] > 0, m / np.maximum(lengths, 1)[:, None] / rows, 0)
    if aggregation == "seq-mean-token-sum-norm":
        return m / (BUDGET * m.shape[0])
    raise AssertionError(aggregation)


def np_loss(kind, aggregation, logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, *, clip_low=0.2,
            clip_high=0.28, kl_weight=0.0, entropy_weight=0.0):
    ratio = np.exp(logprobs - old_logprobs)
    if kind == "clipped":
        per_token = -np.minimum(ratio * advantages, np.clip(ratio, 1 - clip_low, 1 + clip_high) * advantages)
    else:
        per_token = -ratio * advantages
    delta = ref_logprobs - logprobs
    per_token = per_token + kl_weight * (np.exp(delta) - delta - 1) - entropy_weight * entropy
    return float(np.sum(np_weights(aggregation, mask) * per_token))


@pytest.mark.parametrize("aggregation", sorted(rl.AGGREGATIONS))
@pytest.mark.parametrize("kind", sorted(rl.POLICY_LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_equals_numpy(kind, aggregation, seed):
    lp, old, adv, mask, ref, ent = _inputs(seed)
    config = rl.LossConfig(policy_loss=kind, aggregation=aggregation, budget=BUDGET, kl_weight=0.05,
                           entropy_weight=0.01)
    weights = rl.loss_weights(config, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(weights), np_weights(aggregation, mask), rtol=1e-6, atol=1e-9)
    loss, sums = rl.policy_loss(config, *map(jnp.asarray, (lp, old, adv)), weights, ref_logprobs=jnp.asarray(ref),
                                entropy=jnp.asarray(ent))
    expected = np_loss(kind, aggregation, lp, old, adv, mask, ref, ent, kl_weight=0.05, entropy_weight=0.01)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(sums["tokens"]) == mask.sum()
    delta = ref - lp
    np.testing.assert_allclose(float(sums["kl"]), np.sum((np.exp(delta) - delta - 1)[mask]), rtol=1e-5)
    np.testing.assert_allclose(float(sums["entropy"]), ent[mask].sum(), rtol=1e-5)


def test_clip_fraction_counts_tokens_where_the_clipped_term_binds():
    lp, old, adv, mask, ref, ent = _inputs(3, with_empty_row=False)
    ratio = np.exp(lp - old)
    binds = np.where(adv > 0, ratio > 1.28, ratio < 0.8) & mask
    config = rl.LossConfig(budget=BUDGET)
    _, sums = rl.policy_loss(config, *map(jnp.asarray, (lp, old, adv)), rl.loss_weights(config, jnp.asarray(mask)))
    assert 0 < binds.sum() < mask.sum()  # the inputs exercise both sides
    assert float(sums["clipped"]) == binds.sum()


@pytest.mark.parametrize("aggregation", sorted(rl.AGGREGATIONS))
@pytest.mark.parametrize("kind", sorted(rl.POLICY_LOSSES))
def test_gradient_matches_finite_differences(kind, aggregation):
    """d loss / d logprobs by central differences of the numpy reference (float64), away from the clip kinks."""
    lp, old, adv, mask, ref, ent = _inputs(4)
    config = rl.LossConfig(policy_loss=kind, aggregation=aggregation, budget=BUDGET, kl_weight=0.1)
    weights = rl.loss_weights(config, jnp.asarray(mask))
    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(lambda x: rl.policy_loss(
            config, x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(weights, jnp.float64),
            ref_logprobs=jnp.asarray(ref))[0])(jnp.asarray(lp, jnp.float64)))
    eps = 1e-6
    ratio = np.exp(lp - old)
    away_from_kinks = (np.abs(ratio - 0.8) > 1e-3) & (np.abs(ratio - 1.28) > 1e-3)
    checked = 0
    for b, t in zip(*np.nonzero(away_from_kinks)):
        up, down = lp.copy(), lp.copy()
        up[b, t] += eps
        down[b, t] -= eps
        numeric = (np_loss(kind, aggregation, up, old, adv, mask, ref, ent, kl_weight=0.1)
                   - np_loss(kind, aggregation, down, old, adv, mask, ref, ent, kl_weight=0.1)) / (2 * eps)
        np.testing.assert_allclose(grad[b, t], numeric, rtol=1e-4, atol=1e-8)
        checked += 1
    assert checked > B * T // 2
    assert np.all(grad[~mask] == 0)  # tokens off the loss mask get no gradient


def test_masked_tokens_with_infinite_ratio_do_not_poison_the_loss():
    lp, old, adv, mask, *_ = _inputs(5)
    lp[~mask] = 200.0  # exp(200 - old) overflows float32 to inf off the mask
    config = rl.LossConfig(budget=BUDGET)
    loss, _ = rl.policy_loss(config, *map(lambda a: jnp.asarray(a, jnp.float32), (lp, old, adv)),
                             rl.loss_weights(config, jnp.asarray(mask)))
    assert np.isfinite(float(loss))


def test_tied_groups_and_length_penalty():
    rewards = jnp.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert np.asarray(rl.tied_groups(rewards, 2)).tolist() == [True, True, False, False, True, True]
    correct = jnp.array([[1.0], [1.0], [0.0], [1.0]])
    lengths = jnp.array([10, 40, 20, 20])
    config = rl.RewardConfig(estimator="dr_grpo", length_penalty=0.5)
    out = rl.compute_advantages(config, 2, correct, correct > 0, jnp.ones((4, 1), bool), jnp.ones((4, 3), bool),
                                response_lengths=lengths, budget=40)
    # reward = accuracy - 0.5 * |y| / 40, by hand: 0.875, 0.5, -0.25, 0.75
    np.testing.assert_allclose(np.asarray(out.sequence_rewards), [0.875, 0.5, -0.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.sequence_advantages), [0.1875, -0.1875, -0.5, 0.5], rtol=1e-6)


def test_loss_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="aggregation 'tok-mean'"):
        rl.LossConfig(aggregation="tok-mean")
    with pytest.raises(ValueError, match="policy loss 'ppo2'"):
        rl.LossConfig(policy_loss="ppo2")
