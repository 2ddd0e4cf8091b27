"""Training at the paper's lengths: blocked attention and chunked log-probs equal the plain path, memory that grows
linearly in the row width, and the memory plan (mode=plan) against XLA's compiled figures."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bcr_jax import models, plan, rl, sharding, train
from bcr_jax.models import layers
from config_files import load_config

# Compile-only programs (memory analysis, never run): LLVM's expensive passes change nothing we read.
_FAST_COMPILE = plan._ANALYSIS_ONLY


def _ragged_valid(b, t):
    """Right padding, left padding, a hole, and a full row."""
    valid = np.ones((b, t), bool)
    valid[0, t - 9:] = False
    valid[1, :6] = False
    valid[2, 10:13] = False
    return jnp.asarray(valid)


@pytest.mark.parametrize("implementation", ["blocked", "splash", "fused-xla"])
def test_causal_attention_equals_plain_values_and_gradients(implementation):
    """GQA (3 query heads per kv head), a length no block divides, ragged padding (left, right, a hole); f32. Splash
    runs in the Pallas interpreter here (the TPU kernel itself); "fused-xla" is the cuDNN path's call (padding moved
    to the right, sequence lengths) with XLA's implementation, since there is no GPU here."""
    b, t, n, k, h = 4, 45, 6, 2, 16
    rng = np.random.RandomState(0)
    q, key, value = (jnp.asarray(rng.randn(b, t, heads, h), jnp.float32) for heads in (n, k, k))
    valid = _ragged_valid(b, t)
    weights = jnp.asarray(rng.randn(b, t, n, h), jnp.float32) * valid[:, :, None, None]  # padding queries: no loss

    def loss(impl, q, key, value):
        if impl == "fused-xla":
            out = layers.fused_attention(q, key, value, valid, implementation="xla")
        else:
            out = layers.causal_attention(q, key, value, valid, implementation=impl, block_size=8, interpret=True)
        return jnp.sum(out * weights), out

    grad = lambda impl: jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2), has_aux=True))
    (_, out_plain), grads_plain = grad("plain")(q, key, value)
    (_, out_new), grads_new = grad(implementation)(q, key, value)
    real = np.asarray(valid)[:, :, None, None]
    np.testing.assert_allclose(np.asarray(out_new) * real, np.asarray(out_plain) * real, atol=2e-6)
    for new, reference in zip(grads_new, grads_plain):
        np.testing.assert_allclose(np.asarray(new), np.asarray(reference), atol=1e-5)
    assert float(jnp.abs(grads_plain[1]).max()) > 0.1  # keys do get a gradient: a meaningful comparison


def test_attention_choice_and_errors():
    assert layers.resolve_attention("auto", 512, 512, jnp.float32) == "plain"  # one block: nothing to save
    assert layers.resolve_attention("auto", 4096, 512, jnp.float32) == "blocked"  # CPU
    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="attention='cudnn' needs a GPU"):
        layers.causal_attention(x, x, x, jnp.ones((1, 8), bool), implementation="cudnn")
    with pytest.raises(ValueError, match="attention='bogus'"):
        models.get_preset("tiny-qwen3", attention="bogus")
    with pytest.raises(ValueError, match="logprob_chunk=-1"):
        models.get_preset("tiny-qwen3", logprob_chunk=-1)
    with pytest.raises(ValueError, match="remat='bogus'"):
        models.remat_policy("bogus")


@pytest.mark.parametrize("family,memory", [
    ("tiny-qwen2", dict(attention="blocked", attention_block=8, logprob_chunk=7,
                        remat="offload_dots_with_no_batch_dims", scan_layers=True)),
    ("tiny-qwen3", dict(attention="blocked", attention_block=16, logprob_chunk=16, remat="full", scan_layers=True)),
])
def test_memory_efficient_logprobs_equal_plain(family, memory):
    """token_logprobs and its entropy, values and gradients: blocked attention + chunked head (+ remat, offload to
    pinned host) against the plain path, f32, ragged right padding; Qwen2 (q/k/v bias, untied) and Qwen3 (q/k norm,
    tied) flags."""
    cfg = models.get_preset(family)
    params = models.init_params(cfg, jax.random.key(0), std=0.2)
    b, t = 3, 45
    rng = np.random.RandomState(1)
    tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (b, t)), jnp.int32)
    mask = np.ones((b, t), bool)
    mask[0, 30:] = False
    mask[2, 41:] = False
    mask = jnp.asarray(mask)
    scored = mask.at[:, 0].set(False)

    def loss(cfg, params):
        logprobs, entropy = models.token_logprobs(cfg, params, tokens, mask, temperature=0.7)
        return jnp.sum(jnp.where(scored, logprobs + 0.3 * entropy, 0.0)), (logprobs, entropy)

    run = lambda cfg: jax.jit(jax.value_and_grad(functools_partial(loss, cfg), has_aux=True))(params)
    (_, (lp_plain, ent_plain)), g_plain = run(cfg)
    (_, (lp_new, ent_new)), g_new = run(cfg.replace(**memory))
    keep = np.asarray(scored)
    np.testing.assert_allclose(np.asarray(lp_new)[keep], np.asarray(lp_plain)[keep], atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent_new)[keep], np.asarray(ent_plain)[keep], atol=2e-5)
    for path, new in jax.tree_util.tree_leaves_with_path(g_new):
        reference = np.asarray(_at(g_plain, path))
        scale = max(1.0, float(np.abs(reference).max()))
        np.testing.assert_allclose(np.asarray(new), reference, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def functools_partial(fn, cfg):
    return lambda params: fn(cfg, params)


def _at(tree, path):
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", None))]
    return tree


def test_prefill_into_fresh_cache_uses_blocked_attention():
    """The sampler's prefill (left padding, fresh cache) with blocked attention gives the plain path's hidden states
    and cache."""
    cfg = models.get_preset("tiny-qwen3")
    params = models.init_params(cfg, jax.random.key(2), std=0.2)
    b, p = 2, 24
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (b, p)), jnp.int32)
    mask = jnp.asarray(np.arange(p)[None, :] >= np.array([[5], [0]]))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)

    def prefill(cfg):
        cache = models.KVCache.init(cfg, b, p)
        return models.forward(cfg, params, tokens, positions_bt=positions, input_mask_bt=mask, cache=cache,
                              fresh_cache=True)

    hidden_plain, cache_plain = prefill(cfg)
    hidden_blocked, cache_blocked = prefill(cfg.replace(attention="blocked", attention_block=8))
    real = np.asarray(mask)[:, :, None]
    np.testing.assert_allclose(np.asarray(hidden_blocked) * real, np.asarray(hidden_plain) * real, atol=1e-5)
    slots = np.asarray(mask)[:, None, None, :]  # padding slots hold a padding query's (meaningless) keys
    np.testing.assert_allclose(np.asarray(cache_blocked.k[0][1]) * slots, np.asarray(cache_plain.k[0][1]) * slots,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------------ memory

_SCALING_MODEL = models.ModelConfig(
    model_type="qwen3", vocab_size=32768, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
    num_kv_heads=2, head_dim=16, qk_norm=True, tie_embeddings=True, scan_layers=True, remat="full")


def _update_step_temp_bytes(cfg: models.ModelConfig, seq_len: int, rows: int) -> int:
    """Temporary bytes of the trainer's update step (one micro-batch), compiled for CPU from abstract inputs."""
    optimizer = optax.sgd(1e-3)
    step = train.make_update_step(cfg, optimizer, rl.LossConfig())
    shapes = models.param_shapes(cfg)
    state = train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes,
                             opt_state=jax.eval_shape(optimizer.init, shapes),
                             rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                             skipped_updates=jax.ShapeDtypeStruct((), jnp.int32))
    batch = train.UpdateBatch(*(jax.ShapeDtypeStruct((1, rows, seq_len), dtype) for dtype in (
        jnp.int32, jnp.bool_, jnp.float32, jnp.float32, jnp.float32, jnp.float32)))
    compiled = jax.jit(step).lower(state, batch).compile(_FAST_COMPILE)
    return compiled.memory_analysis().temp_size_in_bytes


def test_update_step_memory_grows_linearly_in_the_row_width():
    rows, lengths = 2, (1024, 2048, 4096, 8192)
    efficient = _SCALING_MODEL.replace(attention="blocked", attention_block=256, logprob_chunk=256)
    plain = {t: _update_step_temp_bytes(_SCALING_MODEL, t, rows) for t in lengths}
    blocked = {t: _update_step_temp_bytes(efficient, t, rows) for t in lengths}
    print("T, plain MiB, blocked+chunked MiB:", [(t, plain[t] / 2**20, blocked[t] / 2**20) for t in lengths])
    # temp = c0 + c1 T + c2 T^2 through the four points: the T^2 term's share of the bytes at T = 8k.
    quadratic_share = {name: np.polyfit(lengths, [temps[t] for t in lengths], 2)[0] * 8192**2 / temps[8192]
                       for name, temps in (("plain", plain), ("blocked", blocked))}
    print("T^2 share of the 8k temporaries:", quadratic_share)
    assert quadratic_share["plain"] > 0.4  # the [b, n, t, t] scores
    assert abs(quadratic_share["blocked"]) < 0.05  # linear
    assert blocked[8192] / blocked[1024] <= 8.0  # at most proportional to T (the constant part makes it less)
    assert plain[8192] / plain[1024] > 12.0
    # No buffer of rows x T x vocab floats (2 GiB here) in the chunked step: the logits never exist whole.
    btv_bytes = rows * 8192 * _SCALING_MODEL.vocab_size * 4
    assert blocked[8192] < btv_bytes / 4, (blocked[8192], btv_bytes)
    assert plain[8192] > btv_bytes  # the plain step does hold them (and the T x T scores)


# ------------------------------------------------------------------------------------------------ mode=plan

def _plan_config(path, **overrides):
    config = load_config(path)
    config.mode = "plan"
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


@pytest.mark.parametrize("path,preset,budget", [
    ("justrl_1p5b_bcr", "justrl-deepseek-1.5b", 5120),
    ("qwen3_4b_bcr", "qwen3-4b-thinking-2507", 8000),
])
def test_plan_paper_configs(path, preset, budget, capsys):
    """mode=plan for the BCR configs from their presets (no weights): a table over every accelerator and, last, one
    JSON line whose state figures are the exact shard sizes."""
    from bcr_jax import main

    config = _plan_config(path, **{"model.preset": preset, "plan.compile": False, "mesh.data": 1,
                                   "mesh.fsdp": -1, "plan.accelerator": "v5p-8"})
    main.MODES["plan"](config)
    out = capsys.readouterr().out
    for name in plan.ACCELERATORS:
        assert name in out
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("params_bytes", "optimizer_bytes", "kv_cache_bytes", "activation_bytes", "total_bytes_per_device"):
        assert result[key] > 0, key
    cfg = models.get_preset(preset)
    param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models.param_shapes(cfg)))
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert abs(result["params_bytes"] - 4 * param_count / 4) / (param_count) < 0.01  # f32, split over 4 chips
    assert result["optimizer_bytes"] == pytest.approx(2 * result["params_bytes"], rel=1e-6)  # AdamW mu + nu
    # KV cache: 512 rollout rows over 4 chips, each (512-token prompt bucket + budget) slots of bf16 keys and values.
    slots = result["kv_slots"]
    assert slots >= 512 + budget - 1
    expected_kv = 128 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * slots * 2
    assert result["kv_cache_bytes"] == expected_kv
    assert result["seq_len"] == 512 + budget
    assert result["total_bytes_per_device"] == max(result["update_bytes"], result["rollout_bytes"])


def test_plan_within_ten_percent_of_the_compiled_step():
    """A small model where both can be taken: the plan's analytic figures against the update step the trainer
    compiles on a 4-device FSDP mesh, and the plan's own compile against that step built from real arrays."""
    config = _plan_config("justrl_1p5b_bcr", **{
        "model.preset": "bench-qwen3", "model.vocab_size": 16384, "mesh.data": 1, "mesh.fsdp": 4,
        "rollout.prompts_per_step": 8, "rollout.budget": 1536, "train.mini_batch_size": 16,
        "train.micro_batch_size": 8, "train.compute_dtype": "float32", "plan.accelerator": "v5p-8"})
    result = plan.plan(config, "v5p-8", compile=True)
    assert result.source == "compiled:cpu"
    compiled = result.compiled
    analytic_total = (result.params_bytes + result.optimizer_bytes + result.gradient_bytes
                      + result.analytic_activation_bytes + result.batch_bytes)
    print("compiled peak MiB", compiled["peak_bytes"] / 2**20, "analytic MiB", analytic_total / 2**20)
    assert abs(analytic_total - compiled["peak_bytes"]) / compiled["peak_bytes"] < 0.10
    # The arguments are exactly the state and batch shards the plan counts.
    assert compiled["argument_size_in_bytes"] == pytest.approx(
        result.params_bytes + result.optimizer_bytes + result.batch_bytes, rel=0.01)

    # The trainer's program from real arrays on a real mesh: the same figures.
    mesh = sharding.make_mesh(1, 4, 1, devices=jax.devices()[:4])
    cfg = models.get_preset("bench-qwen3", vocab_size=16384)
    compute_cfg = plan.compute_model_config(config, cfg).replace(mesh=mesh)
    optimizer = train.make_optimizer(config, 10)
    state = train.init_state(optimizer, sharding.shard_params(models.init_params(cfg, jax.random.key(0)), mesh), 0,
                             mesh)
    shardings = train.state_shardings(optimizer, models.param_shapes(cfg), mesh)
    step = train.jit_update_step(train.make_update_step(compute_cfg, optimizer, plan.loss_config(config)),
                                 shardings, mesh, 8)
    shape = (2, 8, result.seq_len)
    batch = train.UpdateBatch(jnp.zeros(shape, jnp.int32), jnp.ones(shape, bool), *(jnp.zeros(shape) for _ in range(4)))
    measured = step.lower(state, batch).compile(_FAST_COMPILE).memory_analysis()
    measured_peak = (measured.argument_size_in_bytes + measured.output_size_in_bytes - measured.alias_size_in_bytes
                     + measured.temp_size_in_bytes)
    assert compiled["peak_bytes"] == pytest.approx(measured_peak, rel=0.01)
