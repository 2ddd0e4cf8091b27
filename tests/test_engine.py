"""The continuous-batching slot engine (`sampling.generate(..., max_rows_in_flight=s)`) against the static sampler
and transformers, and its independence from the schedule (slot count, refill order)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bcr_jax import engine, models, sampling, sharding
from test_sampling import _hf_greedy, _ragged_prompts, tiny  # noqa: F401  (tiny: the per-family fixture)


def test_greedy_equals_static_sampler_and_transformers(tiny):
    family, _, model, cfg, params = tiny
    prompts = _ragged_prompts(cfg.vocab_size, [5, 17, 2, 11, 23])
    static = sampling.generate(cfg, params, prompts, max_new_tokens=20, num_samples=2)
    # 3 slots for 10 rows: most rows start in a refilled slot, next to rows at other lengths
    out = sampling.generate(cfg, params, prompts, max_new_tokens=20, num_samples=2, max_rows_in_flight=3)
    np.testing.assert_array_equal(out.token_array, static.token_array, err_msg=family)
    np.testing.assert_allclose(out.logprob_array, static.logprob_array, atol=1e-4)
    for i, prompt in enumerate(prompts):
        assert out.tokens[2 * i] == _hf_greedy(model, prompt, 20), family
    assert out.truncated.all() and (out.lengths == 20).all()


def test_sampled_tokens_do_not_depend_on_the_slot_count():
    """Float32 tiny model, sampled with top-p and EOS ids so rows end at different lengths and slots are refilled in
    different orders: every (prompt, sample) row gets the same tokens with 1 slot, 3 slots and all rows at once."""
    cfg = models.get_preset("tiny-llama")
    params = models.init_params(cfg, jax.random.key(1), std=0.3)
    prompts = _ragged_prompts(cfg.vocab_size, [4, 9, 30, 2, 13], seed=6)
    knobs = dict(max_new_tokens=24, num_samples=3, temperature=[1.0, 0.7, 1.3, 1.0, 0.0], top_p=[1.0, 0.9, 1.0, 0.8, 1.0],
                 eos_ids=[5, 17, 40, 41, 77, 90], seed=9)
    outs = {s: sampling.generate(cfg, params, prompts, max_rows_in_flight=s, **knobs) for s in (1, 3, 15)}
    for s in (3, 15):
        np.testing.assert_array_equal(outs[s].token_array, outs[1].token_array, err_msg=f"slots={s}")
        np.testing.assert_allclose(outs[s].logprob_array, outs[1].logprob_array, atol=1e-4)  # batch-size float noise
        np.testing.assert_array_equal(outs[s].truncated, outs[1].truncated)
    out = outs[1]
    assert 0 < out.truncated.sum() < 15 and len(set(out.lengths.tolist())) >= 4  # ragged: refills happened
    assert len({tuple(t) for t in out.tokens[:3]}) > 1  # a prompt's samples differ
    for tokens, truncated in zip(out.tokens, out.truncated):  # an ended row stops at its EOS
        assert truncated == (tokens[-1] not in knobs["eos_ids"]) and not set(tokens[:-1]) & set(knobs["eos_ids"])
    # the greedy prompt's three samples are equal, and equal the static sampler's greedy row
    static = sampling.generate(cfg, params, [prompts[4]], max_new_tokens=24, eos_ids=knobs["eos_ids"])
    assert out.tokens[12] == out.tokens[13] == out.tokens[14] == static.tokens[0]


def test_sharded_engine_equals_unsharded(tiny):
    _, directory, _, cfg, params = tiny
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    _, sharded_params = models.load_hf(directory, mesh=mesh)
    prompts = _ragged_prompts(cfg.vocab_size, [5, 9, 3], seed=8)
    knobs = dict(max_new_tokens=10, num_samples=3, temperature=1.0, top_p=0.9, seed=3, eos_ids=[11, 12, 13])
    ref = sampling.generate(cfg, params, prompts, max_rows_in_flight=4, **knobs)
    out = sampling.generate(cfg, sharded_params, prompts, mesh=mesh, max_rows_in_flight=4, **knobs)
    assert out.tokens == ref.tokens
    np.testing.assert_allclose(out.logprob_array, ref.logprob_array, atol=1e-4)


def test_engine_compilations_stay_bounded_and_memory_follows_slots():
    """Calls of varied prompt counts (8 to 32 rows), lengths and knobs at 4 slots compile one init / prefill / insert /
    decode per prompt bucket: rollout memory is that of those programs, whatever prompts x samples is."""
    cfg = models.get_preset("tiny-llama")
    params = models.init_params(cfg, jax.random.key(0))
    before = sampling.TRACE_COUNTS.copy()
    rs = np.random.RandomState(0)
    prompt_buckets = set()
    for call in range(8):
        num_prompts = int(rs.randint(2, 9))  # >= 2 prompts x 4 samples: always more rows than the 4 slots
        lengths = rs.randint(1, 16 if call % 2 else 30, size=num_prompts)  # the 16 and the 32 prompt bucket
        prompts = [rs.randint(0, cfg.vocab_size, size=n).tolist() for n in lengths]
        prompt_buckets.add(sampling.bucket(int(lengths.max()), minimum=16))
        sampling.generate(cfg, params, prompts, max_new_tokens=6, num_samples=4, max_rows_in_flight=4,
                          temperature=float(rs.uniform(0, 2)), top_p=float(rs.uniform(0.1, 1)), seed=call,
                          eos_ids=[int(rs.randint(cfg.vocab_size))])
    traced = {k: sampling.TRACE_COUNTS[k] - before[k] for k in ("engine_init", "engine_insert", "engine_decode")}
    assert set(traced.values()) == {len(prompt_buckets)} and len(prompt_buckets) == 2, (traced, prompt_buckets)
    assert sampling.TRACE_COUNTS["engine_prefill"] - before["engine_prefill"] == len(prompt_buckets)  # 1 x 4 = 4 slots

    # Rows from 8 to 32 ran through the same programs above, so the same compiled memory; it grows with the slots.
    def decode_bytes(slots):
        init, _, _, decode = engine._programs(cfg, 6, slots, 16, 1)
        state = jax.eval_shape(init, jax.random.key_data(jax.random.key(0)), np.zeros(8, np.int32), np.int32(0))
        analysis = decode.lower(params, state, np.int32(1)).compile().memory_analysis()
        return analysis.argument_size_in_bytes - params_bytes  # the state: the cache and the per-row buffers

    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert 1.9 * decode_bytes(4) < decode_bytes(8) <= 2 * decode_bytes(4)


def test_per_prompt_budgets_truncate_rows_in_both_samplers():
    cfg = models.get_preset("tiny-qwen2")
    params = models.init_params(cfg, jax.random.key(3), std=0.3)
    prompts = _ragged_prompts(cfg.vocab_size, [3, 8, 5], seed=4)
    free = sampling.generate(cfg, params, prompts, max_new_tokens=12)
    for slots in (0, 2):  # the static sampler, the slot engine
        out = sampling.generate(cfg, params, prompts, max_new_tokens=12, budgets=[12, 1, 5], max_rows_in_flight=slots)
        assert out.lengths.tolist() == [12, 1, 5] and out.truncated.all()
        assert out.tokens == [row[:n] for row, n in zip(free.tokens, (12, 1, 5))]
