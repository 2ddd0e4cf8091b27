"""The decoder against transformers: logits, HF round trips, key sets, errors, presets, sharding, bf16, RoPE."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from bcr_jax import models, sharding
from bcr_jax.models import layers
from hf_models import TINY_HF_CONFIGS, make_tiny_hf, torch_logits

FAMILIES = sorted(TINY_HF_CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = make_tiny_hf(request.param, directory)
    cfg, params = models.load_hf(directory)
    return request.param, directory, model, cfg, params


def _tokens(vocab, batch=3, length=19, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


def test_logits_match_transformers_and_survive_export(tiny, tmp_path):
    family, _, model, cfg, params = tiny
    tokens = _tokens(cfg.vocab_size)
    reference = torch_logits(model, tokens)
    ours = np.asarray(models.forward_logits(cfg, params, jnp.asarray(tokens)))
    assert np.abs(ours - reference).max() < 1e-4, family
    assert np.abs(reference).max() > 1.0  # a meaningful comparison, not two near-zero tensors

    models.save_hf(cfg, params, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert np.abs(torch_logits(reloaded, tokens) - reference).max() < 1e-4


def test_padding_is_invisible_to_real_tokens(tiny):
    """Left padding (what the sampler uses) must not change the logits of the real tokens."""
    _, _, model, cfg, params = tiny
    tokens = _tokens(cfg.vocab_size, batch=2, length=12, seed=1)
    pad = 5
    padded = np.concatenate([np.zeros((2, pad), np.int32), tokens], axis=1)
    mask = np.concatenate([np.zeros((2, pad), bool), np.ones((2, 12), bool)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = models.forward_logits(cfg, params, jnp.asarray(padded), positions_bt=jnp.asarray(positions),
                                 input_mask_bt=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours)[:, pad:], torch_logits(model, tokens), atol=1e-4)


def test_scan_layers_equals_python_loop(tiny):
    _, _, _, cfg, params = tiny
    tokens = jnp.asarray(_tokens(cfg.vocab_size))
    looped = models.forward_logits(cfg, params, tokens)
    scanned = models.forward_logits(cfg.replace(scan_layers=True), params, tokens)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), atol=1e-5)


def test_param_names_round_trip(tiny, tmp_path):
    family, directory, model, cfg, params = tiny
    hf_saved = set(load_file(directory / "model.safetensors"))
    assert set(models.hf_keys(cfg)) == hf_saved
    models.save_hf(cfg, params, tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == hf_saved
    cfg2, params2 = models.load_hf(tmp_path)
    assert cfg2 == cfg
    paths = lambda tree: {sharding.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert paths(params2) == paths(params) == paths(models.param_shapes(cfg))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_export_with_index(tmp_path):
    cfg = models.get_preset("tiny-qwen2")
    params = models.init_params(cfg, jax.random.key(0))
    models.save_hf(cfg, params, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(models.hf_keys(cfg))
    _, params2 = models.load_hf(tmp_path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------- error messages

@pytest.fixture
def llama_dir(tmp_path):
    make_tiny_hf("llama", tmp_path)
    return tmp_path


def _edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        models.load_hf(llama_dir)


def test_unexpected_tensor_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.__setitem__("model.layers.0.mystery.weight", np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.mystery\.weight"):
        models.load_hf(llama_dir)


def test_wrong_shape_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.__setitem__("model.norm.weight", np.ones(63, np.float32)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight: shape \(63,\), expected \(64,\)"):
        models.load_hf(llama_dir)


def test_unsupported_model_type_is_named(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type='gpt2' is not supported"):
        models.load_hf(llama_dir)


def test_missing_config_field_is_named(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    del config["hidden_size"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing required field 'hidden_size'"):
        models.load_hf(llama_dir)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(models.config_to_hf(models.get_preset("tiny-llama"))))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match=r"pickled checkpoints are refused"):
        models.load_hf(tmp_path)


def test_save_refuses_incomplete_params(tmp_path):
    cfg = models.get_preset("tiny-qwen2")
    params = models.init_params(cfg, jax.random.key(0))
    del params["lm_head"]
    with pytest.raises(ValueError, match=r"lm_head/kernel"):
        models.save_hf(cfg, params, tmp_path)
    assert not (tmp_path / "config.json").exists()


# ----------------------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("name", ["deepseek-r1-distill-qwen-1.5b", "qwen3-4b-thinking-2507", "smollm2-135m"])
def test_full_size_param_counts_equal_transformers(name):
    cfg = models.get_preset(name)
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    ours = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    hf = models.config_to_hf(cfg)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        reference = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    assert ours == reference
    published = {"deepseek-r1-distill-qwen-1.5b": 1.78e9, "qwen3-4b-thinking-2507": 4.02e9, "smollm2-135m": 1.35e8}
    assert abs(ours / published[name] - 1) < 0.02  # and the model cards' sizes (untied 1.5B counts its lm_head)


def test_config_round_trips_through_hf_dict():
    for name, cfg in models.PRESETS.items():
        assert models.config_from_hf(models.config_to_hf(cfg), dtype=cfg.dtype) == cfg, name


# ---------------------------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_forward_equals_single_device(tiny, mesh_shape):
    assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"
    family, directory, _, cfg, params = tiny
    mesh = sharding.make_mesh(**mesh_shape)
    cfg_sharded, params_sharded = models.load_hf(directory, mesh=mesh)  # straight into the target sharding
    q_kernel = params_sharded["layers"]["attn"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len({s.device for s in q_kernel.addressable_shards}) == 8
    assert q_kernel.addressable_shards[0].data.shape[1] == cfg.hidden_size // mesh_shape["fsdp"]

    tokens = _tokens(cfg.vocab_size, batch=8, length=17)
    forward = jax.jit(models.forward_logits, static_argnums=0,
                      in_shardings=(sharding.param_shardings(params_sharded, mesh), sharding.batch_sharding(mesh, 2)),
                      out_shardings=sharding.batch_sharding(mesh, 3))
    sharded = forward(cfg_sharded, params_sharded, jnp.asarray(tokens))
    assert sharded.sharding.spec[0] == ("data", "fsdp")
    single = models.forward_logits(cfg, params, jnp.asarray(tokens))
    # fsdp splits the d-contraction into partial sums + all-reduce: same math, another float32 summation order. The
    # rounding difference scales with the activations, so the bound is 1e-5 of the logit scale (logits reach |5|;
    # observed max differences are 2-3e-6 of it).
    single = np.asarray(single)
    assert np.abs(np.asarray(sharded) - single).max() <= 1e-5 * np.abs(single).max()


def test_every_param_matches_a_rule_and_unknown_params_raise():
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    for cfg in (models.get_preset("qwen3-4b-thinking-2507"), models.get_preset("deepseek-r1-distill-qwen-1.5b")):
        specs = sharding.param_partition_specs(models.param_shapes(cfg), mesh)
        # The real checkpoints divide evenly: nothing falls back to replication on an fsdp=4 x tensor=2 mesh.
        assert specs["layers"]["mlp"]["gate_proj"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    with pytest.raises(ValueError, match=r"param 'extra/kernel' .* matches no partition rule"):
        sharding.param_partition_specs({"extra": {"kernel": jnp.zeros((4, 4))}}, mesh)


# ------------------------------------------------------------------------------------------------------- bf16

def test_bf16_forward_tracks_float32(tiny):
    """bf16 params/activations: 8 mantissa bits → ~0.4% relative error per rounding; a few dozen roundings through
    2 layers give logit errors of ~1-3% of the logit scale. We bound the max error by 5% of max |logit| and require
    the argmax to agree on >= 90% of positions (ties within the error band may flip)."""
    family, directory, _, cfg, params = tiny
    cfg16, params16 = models.load_hf(directory, dtype="bfloat16")
    assert params16["embed"]["embedding"].dtype == jnp.bfloat16
    tokens = jnp.asarray(_tokens(cfg.vocab_size, batch=4, length=32))
    ref = np.asarray(models.forward_logits(cfg, params, tokens))
    low = np.asarray(models.forward_logits(cfg16, params16, tokens))
    assert low.dtype == np.float32  # logits always come out in float32
    assert np.abs(low - ref).max() < 0.05 * np.abs(ref).max(), family
    assert (low.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# ------------------------------------------------------------------------------------------------------- RoPE

ROPE_CASES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_scaling_matches_transformers(case, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = make_tiny_hf("llama", tmp_path, max_position_embeddings=1024,
                         rope_scaling={**ROPE_CASES[case], "rope_theta": 100000.0})
    cfg, params = models.load_hf(tmp_path)
    inv_freq, attention_scale = layers.rope_frequencies(cfg)
    ref_inv_freq, ref_scale = ROPE_INIT_FUNCTIONS[case](model.config, "cpu")
    np.testing.assert_allclose(inv_freq, ref_inv_freq.numpy(), rtol=1e-6)
    assert attention_scale == pytest.approx(ref_scale)
    tokens = _tokens(cfg.vocab_size, batch=2, length=40)
    np.testing.assert_allclose(np.asarray(models.forward_logits(cfg, params, jnp.asarray(tokens))),
                               torch_logits(model, tokens), atol=1e-4)


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("width_in, width_out", [(8, 24), (24, 8)])  # the narrow operand on either side
def test_dense_gradients_equal_the_plain_einsum(transpose_w, width_in, width_out):
    """layers.dense's hand-written backward (laid out for XLA:CPU) against autodiff of the plain einsum."""

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, width_in))
    w = jax.random.normal(kw, (width_out, width_in) if transpose_w else (width_in, width_out))
    cotangent = jax.random.normal(kg, (3, 5, width_out))
    spec = "bti,oi->bto" if transpose_w else "bti,io->bto"
    ours = jax.vjp(lambda a, b: layers.dense(a, b, transpose_w), x, w)
    plain = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(ours[1](cotangent), plain[1](cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
