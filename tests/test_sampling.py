"""The sampler against transformers and against the distributions it claims to sample from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from bcr_jax import models, sampling, sharding
from bcr_jax.models import transformer
from hf_models import TINY_HF_CONFIGS, make_tiny_hf


@pytest.fixture(scope="module", params=sorted(TINY_HF_CONFIGS))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = make_tiny_hf(request.param, directory)
    cfg, params = models.load_hf(directory)
    return request.param, directory, model, cfg, params


def _ragged_prompts(vocab, lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, size=n).tolist() for n in lengths]


def _hf_greedy(model, prompt, max_new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_generate(tiny):
    family, _, model, cfg, params = tiny
    prompts = _ragged_prompts(cfg.vocab_size, [5, 17, 2, 11, 23])  # ragged, across two prompt buckets' edges
    out = sampling.generate(cfg, params, prompts, max_new_tokens=20, temperature=0.0)
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == _hf_greedy(model, prompt, 20), family
    assert out.truncated.all() and (out.lengths == 20).all()
    # greedy log-probs are the untempered model's log-softmax at the chosen token
    full = np.concatenate([prompts[0], out.tokens[0]])[None]
    logp = jax.nn.log_softmax(models.forward_logits(cfg, params, jnp.asarray(full))[0], axis=-1)
    expected = np.asarray(logp)[len(prompts[0]) - 1:-1][np.arange(20), out.tokens[0]]
    np.testing.assert_allclose(out.logprobs[0], expected, atol=1e-4)


@pytest.mark.parametrize("decode_block_sizes", [None, (2, 1, 3)], ids=["one-block", "grown-blocks"])
def test_cached_decode_equals_teacher_forcing(tiny, decode_block_sizes):
    """Prefill a left-padded ragged batch, then feed known tokens one at a time through the cache: every step's
    logits must equal the full teacher-forced forward pass over the unpadded sequence — with one cache block of the
    whole length, and with a prompt-sized cache grown by `extend` a block at a time as the tokens arrive."""
    _, _, _, cfg, params = tiny
    rs = np.random.RandomState(3)
    prompt_lengths, continuation, width = [4, 9], 7, 16
    sequences = [rs.randint(0, cfg.vocab_size, size=n + continuation) for n in prompt_lengths]
    prompt_bp = np.zeros((2, width), np.int32)
    mask_bp = np.zeros((2, width), bool)
    for i, n in enumerate(prompt_lengths):
        prompt_bp[i, width - n:], mask_bp[i, width - n:] = sequences[i][:n], True
    @jax.jit
    def step(params, tokens, positions, mask, cache):
        hidden, cache = transformer.forward(cfg, params, tokens, positions_bt=positions, input_mask_bt=mask, cache=cache)
        return transformer.logits_from_hidden(cfg, params, hidden[:, -1:])[:, 0], cache

    cache = transformer.KVCache.init(cfg, 2, width + (continuation if decode_block_sizes is None else 0))
    positions = np.maximum(np.cumsum(mask_bp, 1) - 1, 0)
    logits, cache = step(params, prompt_bp, positions, mask_bp, cache)
    step_logits = [logits]
    pending_blocks = list(decode_block_sizes or ())
    free_slots = continuation if decode_block_sizes is None else 0  # decode slots left in the last block
    for i in range(continuation - 1):
        if free_slots == 0:
            cache = cache.extend(cfg, pending_blocks[0])
            free_slots = pending_blocks.pop(0)
        free_slots -= 1
        tokens = np.array([[seq[n + i]] for seq, n in zip(sequences, prompt_lengths)], np.int32)
        pos = np.array([[n + i] for n in prompt_lengths], np.int32)
        logits, cache = step(params, tokens, pos, np.ones((2, 1), bool), cache)
        step_logits.append(logits)
    cached = np.stack([np.asarray(l) for l in step_logits], axis=1)  # [2, continuation, v]
    for i, (seq, n) in enumerate(zip(sequences, prompt_lengths)):
        forced = np.asarray(models.forward_logits(cfg, params, jnp.asarray(seq[None])))[0]
        np.testing.assert_allclose(cached[i], forced[n - 1:n - 1 + continuation], atol=1e-4)
    if decode_block_sizes is not None:
        assert cache.block_sizes == (width, *decode_block_sizes) and not pending_blocks
        with pytest.raises(ValueError, match="last block"):  # 4 new tokens cannot fit a 3-slot last block
            transformer.forward(cfg, params, np.zeros((2, 4), np.int32), cache=cache)


# ------------------------------------------------------------------------------------------- distributions

def _chi_square_p(counts, probs):
    probs = np.asarray(probs, np.float64)
    expected = probs / probs.sum() * counts.sum()
    keep = expected > 5  # pool rare cells so the chi-square approximation holds
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_token_frequencies_match_softmax(temperature):
    vocab, rows = 12, 40000
    logits = np.random.RandomState(0).normal(0, 1.5, size=vocab).astype(np.float32)
    tokens, logprobs = jax.jit(sampling.choose_tokens)(
        jnp.broadcast_to(logits, (rows, vocab)), jax.random.key(1), jnp.full((rows,), temperature),
        jnp.ones((rows,)), jnp.zeros((rows,), jnp.int32))
    probs = np.exp(logits / temperature - np.logaddexp.reduce(logits / temperature))
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    assert _chi_square_p(counts, probs) > 1e-4
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs)[np.asarray(tokens)], atol=1e-5)
    # and the test has power: the untempered distribution is rejected when the temperature is not 1
    if temperature != 1.0:
        untempered = np.exp(logits - np.logaddexp.reduce(logits))
        assert _chi_square_p(counts, untempered) < 1e-6


def test_generate_samples_the_model_distribution(tiny):
    """One-token continuations of one prompt (prefilled once, repeated for 4000 samples) follow the model's
    softmax at the last prompt position."""
    _, _, _, cfg, params = tiny
    prompt = _ragged_prompts(cfg.vocab_size, [6], seed=5)[0]
    out = sampling.generate(cfg, params, [prompt], max_new_tokens=1, temperature=1.0, num_samples=4000, seed=7)
    logits = np.asarray(models.forward_logits(cfg, params, jnp.asarray([prompt])))[0, -1]
    probs = np.exp(logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64)))
    counts = np.bincount(out.token_array[:, 0], minlength=cfg.vocab_size)
    assert _chi_square_p(counts, probs) > 1e-4


def test_top_k_and_top_p_keep_exactly_the_right_support():
    probs = np.array([0.05, 0.4, 0.02, 0.25, 0.15, 0.08, 0.05], np.float64)
    logits = np.log(probs).astype(np.float32)
    rows = 6000
    # three groups of rows with different knobs in one batch: top-k 3, top-p 0.7, both (k 2, p 0.9)
    top_k = np.repeat([3, 0, 2], rows // 3).astype(np.int32)
    top_p = np.repeat([1.0, 0.7, 0.9], rows // 3).astype(np.float32)
    tokens, logprobs = jax.jit(sampling.choose_tokens)(
        jnp.broadcast_to(logits, (rows, len(probs))), jax.random.key(0), jnp.ones((rows,)), jnp.asarray(top_p),
        jnp.asarray(top_k))
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    # hand-derived supports: top-3 = {1, 3, 4}; top-p 0.7 keeps 0.4 and 0.25 (mass before 0.25 is 0.4 < 0.7; before
    # 0.15 it is 0.65 < 0.7, kept; before the next it is 0.80) = {1, 3, 4}; top-2 = {1, 3}.
    expected_supports = [{1, 3, 4}, {1, 3, 4}, {1, 3}]
    for group, support in enumerate(expected_supports):
        chosen = tokens[group * rows // 3:(group + 1) * rows // 3]
        assert set(np.unique(chosen)) == support
        renormalised = probs[sorted(support)] / probs[sorted(support)].sum()
        counts = np.array([(chosen == t).sum() for t in sorted(support)])
        assert _chi_square_p(counts, renormalised) > 1e-4
        lp = logprobs[group * rows // 3:(group + 1) * rows // 3]
        np.testing.assert_allclose(lp, np.log(probs[chosen] / probs[sorted(support)].sum()), atol=1e-5)


# ---------------------------------------------------------------------------------------- EOS and truncation

def test_any_eos_id_stops_its_row_and_pads_it(tiny):
    _, _, _, cfg, params = tiny
    prompts = _ragged_prompts(cfg.vocab_size, [4, 7, 5], seed=11)
    free = sampling.generate(cfg, params, prompts, max_new_tokens=12)
    # choose two eos ids: row 0's 4th token and row 1's 7th token (first occurrences), none of row 2's tokens
    eos_a, eos_b = free.tokens[0][3], free.tokens[1][6]
    stop_at = [free.tokens[r].index(e) for r, e in [(0, eos_a), (1, eos_b)]]
    expected_len = [min(stop_at[0], free.tokens[0].index(eos_b) if eos_b in free.tokens[0] else 99) + 1,
                    min(stop_at[1], free.tokens[1].index(eos_a) if eos_a in free.tokens[1] else 99) + 1]
    pad = 127
    out = sampling.generate(cfg, params, prompts, max_new_tokens=12, eos_ids=(eos_a, eos_b), pad_id=pad)
    for row in range(2):
        n = expected_len[row]
        assert out.lengths[row] == n and out.tokens[row] == free.tokens[row][:n]
        assert out.tokens[row][-1] in (eos_a, eos_b) and not out.truncated[row]
        assert (out.token_array[row, n:] == pad).all() and (out.logprob_array[row, n:] == 0).all()
    if eos_a not in free.tokens[2] and eos_b not in free.tokens[2]:
        assert out.truncated[2] and out.lengths[2] == 12 and out.tokens[2] == free.tokens[2]


# ------------------------------------------------------------------------------------- samples, mesh, compiles

def test_num_samples_share_one_prefill_and_differ_when_sampling(tiny):
    _, _, _, cfg, params = tiny
    prompts = _ragged_prompts(cfg.vocab_size, [3, 8], seed=2)
    single = sampling.generate(cfg, params, prompts, max_new_tokens=8)
    greedy = sampling.generate(cfg, params, prompts, max_new_tokens=8, num_samples=3)
    assert greedy.tokens == [single.tokens[0]] * 3 + [single.tokens[1]] * 3  # prompt-major rows
    sampled = sampling.generate(cfg, params, prompts, max_new_tokens=8, num_samples=3, temperature=1.0, seed=4)
    assert len({tuple(t) for t in sampled.tokens[:3]}) > 1


def test_sharded_generation_equals_unsharded(tiny):
    _, directory, _, cfg, params = tiny
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    _, sharded_params = models.load_hf(directory, mesh=mesh)
    prompts = _ragged_prompts(cfg.vocab_size, [5, 9, 3], seed=8)
    for knobs in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=3)):
        ref = sampling.generate(cfg, params, prompts, max_new_tokens=10, num_samples=2, **knobs)
        out = sampling.generate(cfg, sharded_params, prompts, max_new_tokens=10, num_samples=2, mesh=mesh, **knobs)
        assert out.tokens == ref.tokens
        np.testing.assert_allclose(out.logprob_array, ref.logprob_array, atol=1e-4)


def test_compilations_stay_bounded_and_knobs_never_recompile():
    cfg = models.get_preset("tiny-llama")
    params = models.init_params(cfg, jax.random.key(0))
    before = sampling.TRACE_COUNTS.copy()
    rs = np.random.RandomState(0)
    buckets = set()
    for call in range(10):  # 10 calls of varied batch sizes and prompt lengths → at most 3 x 2 buckets
        num_prompts = rs.randint(1, 5)
        lengths = rs.randint(1, 30, size=num_prompts)
        prompts = [rs.randint(0, cfg.vocab_size, size=n).tolist() for n in lengths]
        buckets.add((sampling.bucket(num_prompts), sampling.bucket(int(lengths.max()), minimum=16)))
        sampling.generate(cfg, params, prompts, max_new_tokens=4, temperature=float(rs.uniform(0, 2)),
                          top_p=float(rs.uniform(0.1, 1)), top_k=int(rs.randint(0, 5)), seed=call)
    traced = {k: sampling.TRACE_COUNTS[k] - before[k] for k in ("prefill", "decode")}
    assert traced["prefill"] == traced["decode"] == len(buckets) <= 6, (traced, buckets)


def test_decode_blocks_for_splits_the_fed_back_tokens():
    # max_new_tokens - 1 tokens are fed back through the cache; blocks are equal, a multiple of 16 (128 from 1,024)
    assert sampling.decode_blocks_for(128, 4) == (32, 32, 32, 32)
    assert sampling.decode_blocks_for(4, 4) == (16,)
    assert sampling.decode_blocks_for(1, 4) == ()
    assert sampling.decode_blocks_for(3000, 4) == (752,) * 4  # ceil(2999 / 4) = 750 -> 752
    assert sampling.decode_blocks_for(5120, 4) == (1280,) * 4
    assert sampling.decode_blocks_for(5000, 4) == (1280,) * 4  # ceil(4999 / 4) = 1250 -> 1280
    assert sampling.decode_blocks_for(100, 1) == (112,)


def test_decode_blocks_change_nothing_but_cost(tiny):
    """Growing the cache in blocks is exact: the same tokens and log-probs as one full-budget cache, greedy and
    sampled (the random stream runs on across segment boundaries)."""
    family, _, _, cfg, params = tiny
    prompts = _ragged_prompts(cfg.vocab_size, [3, 12, 7], seed=5)
    for knobs in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=11)):
        reference = sampling.generate(cfg, params, prompts, max_new_tokens=37, decode_blocks=1, **knobs)
        for blocks in (2, 5):
            out = sampling.generate(cfg, params, prompts, max_new_tokens=37, decode_blocks=blocks, **knobs)
            np.testing.assert_array_equal(out.token_array, reference.token_array, err_msg=f"{family} {knobs}")
            np.testing.assert_allclose(out.logprob_array, reference.logprob_array, atol=1e-5)


def test_blocks_after_every_row_ended_are_never_run():
    cfg = models.get_preset("tiny-qwen2")
    params = models.init_params(cfg, jax.random.key(2), std=0.5)
    prompts = _ragged_prompts(cfg.vocab_size, [6, 9], seed=1)
    free_run = sampling.generate(cfg, params, prompts, max_new_tokens=5, temperature=0.0)
    stop_ids = sorted({row[2] for row in free_run.tokens})  # every row ends at its 3rd token at the latest
    before = sampling.TRACE_COUNTS.copy()
    out = sampling.generate(cfg, params, prompts, max_new_tokens=61, temperature=0.0, eos_ids=stop_ids,
                            decode_blocks=4)  # blocks of 16: the first holds every step that runs
    assert sampling.TRACE_COUNTS["decode"] - before["decode"] == 1
    assert (out.lengths <= 3).all() and not out.truncated.any()
    for row, free in zip(out.tokens, free_run.tokens):
        assert row == free[:len(row)] and row[-1] in stop_ids
