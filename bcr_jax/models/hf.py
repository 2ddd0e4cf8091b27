"""Hugging Face checkpoints in and out: `load_hf` and `save_hf`, driven by one declarative key map.

`KEY_MAP` lists, for every tensor, its HF name, our param path, its shape in the HF file and whether the matrix is
stored transposed ([out, in] in PyTorch). Loading reads that table forwards, exporting backwards; there is no other
conversion code. Loading is tensor by tensor: each param is built with `jax.make_array_from_callback`, so every device
reads only the slices it owns and a large model never sits whole on one device. safetensors only — pickled `.bin`
checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bcr_jax import paths, sharding as sharding_lib
from bcr_jax.models.config import ModelConfig, config_to_hf, read_hf_config
from bcr_jax.models.transformer import Params, param_shapes

ShapeFn = Callable[[ModelConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_key: str  # "{layer}" marks per-layer tensors (stacked along our leading layer axis)
    path: str  # our param path, '/'-separated
    hf_shape: ShapeFn  # shape in the HF file
    transposed: bool = False  # HF stores [out, in]; we store [in, ...]
    present: Callable[[ModelConfig], bool] = lambda cfg: True

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_key


def _vd(c): return (c.vocab_size, c.hidden_size)
def _d(c): return (c.hidden_size,)
def _h(c): return (c.head_dim,)
def _q_out(c): return (c.num_heads * c.head_dim, c.hidden_size)
def _kv_out(c): return (c.num_kv_heads * c.head_dim, c.hidden_size)
def _fd(c): return (c.intermediate_size, c.hidden_size)


_ATTN, _MLP = "model.layers.{layer}.self_attn", "model.layers.{layer}.mlp"
KEY_MAP: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "embed/embedding", _vd),
    TensorRule("model.norm.weight", "final_norm/scale", _d),
    TensorRule("lm_head.weight", "lm_head/kernel", _vd, True, lambda c: not c.tie_embeddings),
    TensorRule("model.layers.{layer}.input_layernorm.weight", "layers/input_norm/scale", _d),
    TensorRule("model.layers.{layer}.post_attention_layernorm.weight", "layers/post_attn_norm/scale", _d),
    TensorRule(f"{_ATTN}.q_proj.weight", "layers/attn/q_proj/kernel", _q_out, True),
    TensorRule(f"{_ATTN}.k_proj.weight", "layers/attn/k_proj/kernel", _kv_out, True),
    TensorRule(f"{_ATTN}.v_proj.weight", "layers/attn/v_proj/kernel", _kv_out, True),
    TensorRule(f"{_ATTN}.o_proj.weight", "layers/attn/o_proj/kernel", lambda c: _q_out(c)[::-1], True),
    TensorRule(f"{_ATTN}.q_proj.bias", "layers/attn/q_proj/bias", lambda c: _q_out(c)[:1], present=lambda c: c.qkv_bias),
    TensorRule(f"{_ATTN}.k_proj.bias", "layers/attn/k_proj/bias", lambda c: _kv_out(c)[:1], present=lambda c: c.qkv_bias),
    TensorRule(f"{_ATTN}.v_proj.bias", "layers/attn/v_proj/bias", lambda c: _kv_out(c)[:1], present=lambda c: c.qkv_bias),
    TensorRule(f"{_ATTN}.q_norm.weight", "layers/attn/q_norm/scale", _h, present=lambda c: c.qk_norm),
    TensorRule(f"{_ATTN}.k_norm.weight", "layers/attn/k_norm/scale", _h, present=lambda c: c.qk_norm),
    TensorRule(f"{_MLP}.gate_proj.weight", "layers/mlp/gate_proj/kernel", _fd, True),
    TensorRule(f"{_MLP}.up_proj.weight", "layers/mlp/up_proj/kernel", _fd, True),
    TensorRule(f"{_MLP}.down_proj.weight", "layers/mlp/down_proj/kernel", lambda c: _fd(c)[::-1], True),
)
# Tensors some checkpoints carry that hold nothing we need (a cached RoPE table; lm_head duplicated when tied).
_IGNORABLE = (re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),)

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _active_rules(cfg: ModelConfig) -> list[TensorRule]:
    return [rule for rule in KEY_MAP if rule.present(cfg)]


def hf_keys(cfg: ModelConfig) -> dict[str, tuple[TensorRule, int | None]]:
    """Every HF tensor name this config has → (rule, layer index or None)."""
    keys = {}
    for rule in _active_rules(cfg):
        for layer in range(cfg.num_layers) if rule.per_layer else [None]:
            keys[rule.hf_key.format(layer=layer)] = (rule, layer)
    return keys


def _get_path(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _to_ours(rule: TensorRule, array: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    return (array.T if rule.transposed else array).reshape(our_shape)


def _to_hf(rule: TensorRule, cfg: ModelConfig, array: np.ndarray) -> np.ndarray:
    hf_shape = rule.hf_shape(cfg)
    if rule.transposed:
        return np.ascontiguousarray(array.reshape(hf_shape[::-1]).T)
    return np.ascontiguousarray(array.reshape(hf_shape))


class _SafetensorsCheckpoint:
    """The tensors of an HF directory (single file or sharded with an index), opened lazily, read one at a time."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index_file = directory / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_file}: no 'weight_map' object")
            self.key_to_file = {key: directory / name for key, name in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
                hint = f" (found {pickled}: pickled checkpoints are refused; convert them to safetensors)" if pickled else ""
                raise FileNotFoundError(f"{directory}: no *.safetensors files{hint}")
            self.key_to_file = {}
            for file in files:
                with safe_open(file, framework="numpy") as f:
                    self.key_to_file.update({key: file for key in f.keys()})
        for file in set(self.key_to_file.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: listed in {index_file.name} but missing")
        self._handles: dict[pathlib.Path, object] = {}

    def _handle(self, file: pathlib.Path):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="numpy")
        return self._handles[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.key_to_file[key]).get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        return self._handle(self.key_to_file[key]).get_tensor(key)


def _check_tensors(cfg: ModelConfig, checkpoint: _SafetensorsCheckpoint) -> dict[str, tuple[TensorRule, int | None]]:
    """Raises one error naming every missing, unexpected or wrongly shaped tensor, before anything is allocated."""
    expected = hf_keys(cfg)
    present = set(checkpoint.key_to_file)
    missing = sorted(set(expected) - present)
    tied_duplicates = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(k for k in present - set(expected) - tied_duplicates if not any(p.match(k) for p in _IGNORABLE))
    wrong_shape = []
    for key in sorted(set(expected) & present):
        rule, _ = expected[key]
        if checkpoint.shape(key) != rule.hf_shape(cfg):
            wrong_shape.append(f"{key}: shape {checkpoint.shape(key)}, expected {rule.hf_shape(cfg)}")
    problems = [f"missing tensor {k}" for k in missing] + [f"unexpected tensor {k}" for k in unexpected] + wrong_shape
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{checkpoint.directory}: checkpoint does not match config.json ({cfg.model_type}):\n  {shown}")
    return expected


def load_hf(path, dtype: str = "float32", *, mesh=None, rules=sharding_lib.PARAM_RULES,
            scan_layers: bool = False) -> tuple[ModelConfig, Params]:
    """HF checkpoint directory → (ModelConfig, params).

    With a `mesh`, every param is created directly in its partition-rule sharding: each device's callback reads
    only the tensors (and slices) it holds. Without one, params land on the default device.
    """
    directory = pathlib.Path(path)
    cfg = read_hf_config(directory, dtype=dtype).replace(scan_layers=scan_layers)
    checkpoint = _SafetensorsCheckpoint(directory)
    _check_tensors(cfg, checkpoint)
    shapes = param_shapes(cfg)
    if mesh is not None:
        shardings = sharding_lib.param_shardings(shapes, mesh, rules)
    else:
        device_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device_sharding, shapes)
    target_dtype = _NP_DTYPES[dtype]

    params: Params = {}
    for rule in _active_rules(cfg):
        spec = _get_path(shapes, rule.path)
        our_shape = spec.shape[1:] if rule.per_layer else spec.shape

        def read_ours(layer, rule=rule, our_shape=our_shape):
            array = checkpoint.read(rule.hf_key.format(layer=layer))
            return _to_ours(rule, array, our_shape).astype(target_dtype)

        def callback(index, rule=rule, read_ours=read_ours):
            if not rule.per_layer:
                return read_ours(None)[index]
            layer_ids = range(cfg.num_layers)[index[0]]
            return np.stack([read_ours(layer)[index[1:]] for layer in layer_ids])

        array = jax.make_array_from_callback(spec.shape, _get_path(shardings, rule.path), callback)
        _set_path(params, rule.path, array)
    return cfg, params


def _host_array(x) -> np.ndarray:
    if not x.is_fully_addressable:  # multi-host: every process gathers, process 0 writes
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_hf(cfg: ModelConfig, params: Params, out_dir, *, max_shard_bytes: int = 4 * 2**30):
    """params → `out_dir/config.json` + safetensors (sharded with an index past `max_shard_bytes`); `out_dir` may be
    local or `gs://` (returned as a `bcr_jax.paths.Path`).

    Tensors are gathered to the host one at a time. Files are written into a local staging directory and then put in
    place one by one (renamed, or uploaded whole), config.json last, so an interrupted save never leaves a
    half-written file or a config.json without its weights.
    """
    out = paths.resolve(out_dir)
    missing = [r.path for r in _active_rules(cfg) if not _has_path(params, r.path)]
    if missing:
        raise ValueError(f"save_hf: params are missing {missing} for this {cfg.model_type} config")
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for key, (rule, layer) in hf_keys(cfg).items():
        leaf = _get_path(params, rule.path)
        tensor = _to_hf(rule, cfg, _host_array(leaf[layer] if rule.per_layer else leaf))
        if shard_bytes and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += tensor.nbytes
    if jax.process_index() != 0:
        return out

    staging = paths.staging_dir(out)
    try:
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, tensors in zip(names, shards):
            save_file(tensors, staging / name, metadata={"format": "pt"})  # transformers requires format=pt
        if len(shards) > 1:
            index = {"metadata": {"total_size": int(sum(t.nbytes for s in shards for t in s.values()))},
                     "weight_map": {key: name for name, s in zip(names, shards) for key in s}}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
        for file in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            paths.put_file(file, out / file.name, move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _has_path(tree, path: str) -> bool:
    try:
        _get_path(tree, path)
        return True
    except (KeyError, TypeError):
        return False
