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
    if aggregation == "seq-mean-token-sum":
        return m / m.shape[0]
    if aggregation == "seq-mean-token-mean":  # an empty row counts as a row (verl divides by all rows)
        lengths = m.sum(axis=1)
        return np.where(lengths[:, None] > 0, m / np.maximum(lengths, 1)[:, None] / m.shape[0], 0)
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


# ---- verl's formulas (verl/trainer/ppo/core_algos.py: agg_loss, compute_policy_loss_vanilla), re-derived in numpy ----

def verl_policy_loss_matrix(log_prob, old_log_prob, advantages, clip_low, clip_high, clip_ratio_c):
    """Per-token loss as verl writes it: max of the two PPO terms, then (A < 0) min with -A c; log-ratio clamped."""
    ratio = np.exp(np.clip(log_prob - old_log_prob, -20.0, 20.0))
    loss1 = -advantages * ratio
    loss2 = -advantages * np.clip(ratio, 1 - clip_low, 1 + clip_high)
    clipped1 = np.maximum(loss1, loss2)
    if not clip_ratio_c:
        return clipped1
    return np.where(advantages < 0, np.minimum(-advantages * clip_ratio_c, clipped1), clipped1)


def verl_policy_grad_matrix(log_prob, old_log_prob, advantages, clip_low, clip_high, clip_ratio_c):
    """d(per-token loss) / d log_prob, by hand: -A r where the chosen term still depends on the ratio, else 0."""
    delta = log_prob - old_log_prob
    ratio = np.exp(np.clip(delta, -20.0, 20.0))
    loss1 = -advantages * ratio
    loss2 = -advantages * np.clip(ratio, 1 - clip_low, 1 + clip_high)
    inside_clip = (ratio > 1 - clip_low) & (ratio < 1 + clip_high)
    live = ((loss1 >= loss2) | inside_clip) & (np.abs(delta) < 20.0)
    if clip_ratio_c:
        live &= ~((advantages < 0) & (-advantages * clip_ratio_c < np.maximum(loss1, loss2)))
    return np.where(live, -advantages * ratio, 0.0)


def verl_agg_loss(loss_mat, mask, mode, budget):
    """verl's agg_loss over a whole mini-batch: global_batch_size = its B rows (empty ones included), for
    seq-mean-token-sum-norm loss_scale_factor = budget * B."""
    m = mask.astype(np.float64)
    rows = m.shape[0]
    has_tokens = m.sum(-1) > 0
    if mode == "token-mean":
        return np.sum(loss_mat * m) / m.sum()
    if mode == "seq-mean-token-sum":
        return np.sum((loss_mat * m).sum(-1)[has_tokens]) / rows
    if mode == "seq-mean-token-mean":
        per_row = (loss_mat * m).sum(-1) / (m.sum(-1) + 1e-8)
        return np.sum(per_row[has_tokens]) / rows
    if mode == "seq-mean-token-sum-norm":
        return np.sum(loss_mat * m) / (budget * rows)
    raise AssertionError(mode)


def _extreme_inputs(seed):
    """Log-ratios spread over [-8, 8] (ratios up to ~3000x outside the clip range) plus some past verl's +-20 clamp;
    advantages of both signs; two rows without loss tokens."""
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, (B, T))
    delta = rng.uniform(-8.0, 8.0, (B, T))
    delta[rng.random((B, T)) < 0.1] = rng.choice([-25.0, 24.0])
    delta[rng.random((B, T)) < 0.15] = rng.uniform(-0.1, 0.1)  # some ratios inside the clip range
    advantages = np.repeat(rng.choice([-1.0, 1.0], (B, 1)) * rng.uniform(0.3, 2.0, (B, 1)), T, axis=1)
    mask = rng.random((B, T)) < 0.75
    mask[1] = mask[4] = False
    return (old + delta).astype(np.float32), old.astype(np.float32), advantages.astype(np.float32), mask


@pytest.mark.parametrize("clip_ratio_c", [0.0, 3.0])
@pytest.mark.parametrize("aggregation", sorted(rl.AGGREGATIONS))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_equal_verl_reference(aggregation, clip_ratio_c, seed):
    lp, old, adv, mask = _extreme_inputs(seed)
    ratio = np.exp(np.clip(lp.astype(np.float64) - old, -20, 20))
    kinks = [0.8, 1.28, clip_ratio_c] if clip_ratio_c else [0.8, 1.28]
    assert all(np.min(np.abs(ratio - k)) > 1e-3 for k in kinks)  # the reference gradient is defined everywhere
    assert np.mean((ratio[mask] > 2) | (ratio[mask] < 0.5)) > 0.6 and np.any(np.abs(lp - old)[mask] > 20)
    config = rl.LossConfig(aggregation=aggregation, budget=BUDGET, clip_ratio_c=clip_ratio_c)
    assert lp.dtype == np.float32 and config.policy_loss == "clipped"

    weights = rl.loss_weights(config, jnp.asarray(mask))
    fn = lambda x: rl.policy_loss(config, x, jnp.asarray(old), jnp.asarray(adv), weights)
    (loss, sums), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(lp))
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.float32

    args = (lp.astype(np.float64), old.astype(np.float64), adv.astype(np.float64), 0.2, 0.28, clip_ratio_c)
    loss_mat = verl_policy_loss_matrix(*args)
    expected = verl_agg_loss(loss_mat, mask, aggregation, BUDGET)
    scale = verl_agg_loss(np.abs(loss_mat), mask, aggregation, BUDGET)  # f32 rounding grows with the terms' size
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6 * scale)
    # agg_loss is linear in the loss matrix: its derivative in entry (b, t) is agg_loss of the unit matrix e_bt.
    unit = np.eye(B * T).reshape(B * T, B, T)
    d_agg = np.array([verl_agg_loss(u, mask, aggregation, BUDGET) for u in unit]).reshape(B, T)
    expected_grad = d_agg * verl_policy_grad_matrix(*args)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-6 * np.abs(expected_grad).max())
    assert np.any(expected_grad != 0) and np.all(np.asarray(grad)[~mask] == 0)
    if clip_ratio_c:  # verl's pg_clipfrac_lower, as a count
        capped = (adv < 0) & (-adv * clip_ratio_c < np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.28)))
        assert float(sums["dual_clipped"]) == (capped & mask).sum() > 0


def test_dual_clip_caps_an_exploded_negative_advantage_token_by_hand():
    # One token, A = -2, ratio e^3 = 20.09: PPO's loss is -A r = 40.17; the dual clip at c = 3 caps it at -A c = 6.
    lp, old, adv, weights = (jnp.array([[x]], jnp.float32) for x in (3.0, 0.0, -2.0, 1.0))
    plain, _ = rl.policy_loss(rl.LossConfig(), lp, old, adv, weights)
    dual, sums = rl.policy_loss(rl.LossConfig(clip_ratio_c=3.0), lp, old, adv, weights)
    np.testing.assert_allclose(float(plain), 2 * np.exp(3.0), rtol=1e-6)
    np.testing.assert_allclose(float(dual), 6.0, rtol=1e-6)
    assert float(sums["dual_clipped"]) == 1
    # A positive advantage, or a ratio under c, is untouched by the dual clip.
    for a, x in ((2.0, 3.0), (-2.0, 1.0)):
        args = (jnp.array([[x]]), old, jnp.array([[a]]), weights)
        np.testing.assert_allclose(float(rl.policy_loss(rl.LossConfig(clip_ratio_c=3.0), *args)[0]),
                                   float(rl.policy_loss(rl.LossConfig(), *args)[0]), rtol=1e-6)


EMPTY_CASES = ("empty_rows", "truncated_rows_masked")


@pytest.mark.parametrize("case", EMPTY_CASES)
@pytest.mark.parametrize("aggregation", sorted(rl.AGGREGATIONS))
def test_numerator_and_denominator_agree(aggregation, case):
    """Every per-token loss is 1 on the loss tokens (ratio 1, A = -1) and huge on the excluded ones: the loss is then
    (what the numerator counts) / (what the denominator counts), both counted here from the documented convention."""
    from bcr_jax import train

    rows, width, budget = 8, 10, 10
    lengths = np.array([3, 10, 0, 7, 10, 5, 10, 2])  # row 2: an empty response; rows 1, 4, 6 hit the budget
    response_mask = np.arange(width)[None, :] < lengths[:, None]
    truncated = lengths == budget
    if case == "empty_rows":
        excluded = np.repeat([True, False, False, False], 2)  # a dropped group (rows 0-1) beside the empty row 2
    else:
        excluded = truncated
    mask = train.loss_mask(response_mask, excluded)
    assert mask.sum() < response_mask.sum()
    old = np.zeros((rows, width), np.float32)
    lp = np.where(response_mask & ~mask, 15.0, 0.0).astype(np.float32)  # excluded tokens: ratio e^15
    adv = -np.ones((rows, width), np.float32)
    config = rl.LossConfig(aggregation=aggregation, budget=budget)
    weights = rl.loss_weights(config, jnp.asarray(mask))
    loss, grad = jax.value_and_grad(lambda x: rl.policy_loss(config, x, jnp.asarray(old), jnp.asarray(adv),
                                                             weights)[0])(jnp.asarray(lp))
    tokens = mask.sum()
    rows_with_tokens = (mask.sum(axis=1) > 0).sum()
    numerator, denominator = {
        "token-mean": (tokens, tokens),  # not response_mask.sum(): TRL#6369
        "seq-mean-token-sum": (tokens, rows),
        "seq-mean-token-mean": (rows_with_tokens, rows),  # empty rows count as rows, as in verl
        "seq-mean-token-sum-norm": (tokens, budget * rows),
    }[aggregation]
    np.testing.assert_allclose(float(loss), numerator / denominator, rtol=1e-6)
    assert np.all(np.asarray(grad)[~mask] == 0) and np.all(np.asarray(weights)[~mask] == 0)
    # d loss / d logp of a loss token is its weight (A = -1, ratio 1): they add up to the loss again.
    np.testing.assert_allclose(float(np.asarray(grad).sum()), numerator / denominator, rtol=1e-5)


def test_overlong_penalty_by_hand():
    # budget 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10 (DAPO's soft overlong punishment).
    lengths = jnp.array([0, 6, 7, 8, 10])
    np.testing.assert_allclose(np.asarray(rl.overlong_penalty(lengths, 10, 4)), [0, 0, -0.25, -0.5, -1.0])
    np.testing.assert_allclose(np.asarray(rl.overlong_penalty(lengths, 10, 4, 0.5)), [0, 0, -0.125, -0.25, -0.5])
    # In the reward: accuracy 1, 1, 0, 1 with lengths 5, 9, 10, 6 -> 1, 0.25, -1, 1 (Dr. GRPO: minus the group mean).
    correct = jnp.array([[1.0], [1.0], [0.0], [1.0]])
    config = rl.RewardConfig(estimator="dr_grpo", overlong_buffer=4)
    out = rl.compute_advantages(config, 2, correct, correct > 0, jnp.ones((4, 1), bool), jnp.ones((4, 3), bool),
                                response_lengths=jnp.array([5, 9, 10, 6]), budget=10)
    np.testing.assert_allclose(np.asarray(out.sequence_rewards), [1.0, 0.25, -1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.sequence_advantages), [0.375, -0.375, -1.0, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="overlong buffer"):
        rl.overlong_penalty(lengths, 10, 11)


def test_tied_groups_with_several_columns():
    # Two groups of 2: equal sequence rewards in both; the second group's problems differ per sample.
    sequence = jnp.array([[0.5], [0.5], [0.5], [0.5]])
    per_problem = jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert np.asarray(rl.tied_groups(sequence, 2)).tolist() == [True] * 4
    both = jnp.concatenate([sequence, per_problem], axis=1)
    assert np.asarray(rl.tied_groups(both, 2)).tolist() == [True, True, False, False]


def test_dual_clip_config_is_checked():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        rl.LossConfig(clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        rl.LossConfig(clip_ratio_c=3.0, policy_loss="unclipped")
    with pytest.raises(ValueError, match="overlong"):
        rl.RewardConfig(overlong_buffer=-1)
