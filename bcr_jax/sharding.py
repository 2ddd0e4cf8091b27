"""Device mesh, partition rules and placement helpers — the one place where sharding is declared.

Mesh axes:
  data   — pure data parallelism (batch rows; params replicated across it),
  fsdp   — batch rows *and* the params' model-width axis (ZeRO-3 style: weights all-gathered per layer by XLA),
  tensor — Megatron-style: attention heads and MLP width split, so each device holds a slice of every matmul.

Partition rules are `(regex over the param path, PartitionSpec)`; the first match wins and a param that matches no
rule is an error (a new param must be placed on purpose, never silently replicated). A mesh axis that does not divide
the dimension it would shard (e.g. 2 kv heads over tensor=4) is dropped for that param, so tiny test configs run
on any mesh; real checkpoints divide evenly.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both data-parallel axes

# Shapes (see models/transformer.py): l layers, d model, n/k heads, h head dim, f MLP width, v vocab.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed/embedding$", P("tensor", "fsdp")),  # [v, d]
    (r"^layers/attn/[qkv]_proj/kernel$", P(None, "fsdp", "tensor", None)),  # [l, d, n|k, h]
    (r"^layers/attn/[qkv]_proj/bias$", P(None, "tensor", None)),  # [l, n|k, h]
    (r"^layers/attn/o_proj/kernel$", P(None, "tensor", None, "fsdp")),  # [l, n, h, d]
    (r"^layers/attn/[qk]_norm/scale$", P(None, None)),  # [l, h]
    (r"^layers/(input_norm|post_attn_norm)/scale$", P(None, None)),  # [l, d]
    (r"^layers/mlp/(gate_proj|up_proj)/kernel$", P(None, "fsdp", "tensor")),  # [l, d, f]
    (r"^layers/mlp/down_proj/kernel$", P(None, "tensor", "fsdp")),  # [l, f, d]
    (r"^final_norm/scale$", P(None)),  # [d]
    (r"^lm_head/kernel$", P("fsdp", "tensor")),  # [d, v]
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all); one size may be -1 (= the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {sizes}")
        sizes[unknown[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh: axis sizes {sizes} need {math.prod(sizes.values())} devices, have {len(devices)}")
    # mesh_utils lays out axes to follow the physical interconnect on TPU/GPU; plain reshape elsewhere.
    shape = tuple(sizes[a] for a in AXES)
    try:
        device_grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # device sets mesh_utils cannot lay out
        device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, AXES)


def path_name(path) -> str:
    """A pytree key path as 'layers/attn/q_proj/kernel'."""
    parts = []
    for key in path:
        parts.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
    return "/".join(parts)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (replicating that dimension instead)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = tuple(a for a in names if dim % mesh.shape[a] == 0)
        fitted.append(keep if len(keep) > 1 else (keep[0] if keep else None))
    return P(*fitted)


def param_partition_specs(params_or_shapes: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
    """PartitionSpec for every param, from the first matching rule; raises on a param no rule matches."""

    def spec_for(path, leaf):
        name = path_name(path)
        for pattern, spec in rules:
            if re.search(pattern, name):
                if len(spec) != len(leaf.shape):
                    raise ValueError(f"partition rule {pattern!r} has rank {len(spec)} but param {name!r} has shape {leaf.shape}")
                return _fit(spec, leaf.shape, mesh)
        raise ValueError(f"param {name!r} (shape {tuple(leaf.shape)}) matches no partition rule")

    return jax.tree_util.tree_map_with_path(spec_for, params_or_shapes)


def param_shardings(params_or_shapes: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_partition_specs(params_or_shapes, mesh, rules))


def batch_spec(rank: int, batch_size: int | None = None, mesh: Mesh | None = None) -> P:
    """Leading (batch) axis over ("data", "fsdp"); the rest replicated."""
    spec = P(BATCH_AXES, *([None] * (rank - 1)))
    if batch_size is not None and mesh is not None:
        spec = _fit(spec, (batch_size,) + (1,) * (rank - 1), mesh)
    return spec


def batch_sharding(mesh: Mesh, rank: int, batch_size: int | None = None) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(rank, batch_size, mesh))


def kv_cache_spec(cache_shape: tuple[int, ...], mesh: Mesh) -> P:
    """One layer's cache ([b, k, h, s] keys, [b, k, s, h] values): rows over the batch axes, kv heads over tensor
    (like the k/v projections)."""
    return _fit(P(BATCH_AXES, "tensor", None, None), cache_shape, mesh)


def place(tree: Any, shardings: Any) -> Any:
    """device_put a pytree onto matching shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def shard_params(params: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
    return place(params, param_shardings(params, mesh, rules))
