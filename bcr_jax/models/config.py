"""`ModelConfig`: the one description of a Qwen2 / Qwen3 / Llama decoder, and its `config.json` mapping.

The three families differ by three flags, so a single frozen (hashable, hence usable as a static `jit` argument)
dataclass describes them all:

| family | `qkv_bias` | `qk_norm` | `tie_embeddings`         |
|--------|------------|-----------|--------------------------|
| qwen2  | True       | False     | per checkpoint (1.5B: no)|
| qwen3  | False      | True      | per checkpoint (4B: yes) |
| llama  | False      | False     | per checkpoint           |

`config_from_hf` / `config_to_hf` translate Hugging Face `config.json` dicts; anything we do not model but must
preserve on export (token ids, `max_window_layers`, ...) rides along in `hf_extra`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# Kept verbatim on export when present: they matter to tokenizers/generation, not to the math.
_PRESERVED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_window_layers", "pretraining_tp")

_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Full-sequence attention (training, prefill): see layers.causal_attention.
ATTENTION_IMPLEMENTATIONS = ("plain", "blocked", "cudnn", "splash", "auto")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder checkpoint. Frozen and hashable: pass it as a static argument to `jax.jit`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # (key, value) pairs of the HF rope_scaling dict (minus rope_theta); () means plain RoPE. A tuple keeps us hashable.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    dtype: str = "float32"  # dtype of params and activations; softmax, norms and logits always run in float32.
    scan_layers: bool = False  # lax.scan over the stacked layers (fast compiles) or a Python loop (fast decode on CPU/GPU).
    remat: str = "none"  # rematerialisation of each decoder layer in the backward pass: see transformer.REMAT_POLICIES
    # Whole-sequence attention (training, prefill): plain | blocked | cudnn | splash | auto (layers.causal_attention).
    attention: str = "plain"
    attention_block: int = 512  # query/key block of the blocked and splash paths (memory per block ~ block^2)
    logprob_chunk: int = 0  # token_logprobs: positions per lm_head chunk, logits never whole (0 = all at once)
    # The training mesh (a jax.sharding.Mesh, hashable): hidden states are pinned to rows over its ("data", "fsdp")
    # axes. Without it XLA may split FSDP activations along d like the weights and repeat every row on every device.
    mesh: Any = None
    hf_extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; expected one of {tuple(_DTYPES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not supported; expected one of {ATTENTION_IMPLEMENTATIONS}")
        if self.attention_block < 1:
            raise ValueError(f"attention_block={self.attention_block} must be positive")
        if self.logprob_chunk < 0:
            raise ValueError(f"logprob_chunk={self.logprob_chunk} must be >= 0 (0 = unchunked)")
        rope_type = dict(self.rope_scaling).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _freeze(value):
    """Lists inside config dicts become tuples so the config stays hashable."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value):
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32", source: str = "config.json") -> ModelConfig:
    """Translates a Hugging Face `config.json` dict. Raises ValueError naming the offending field."""

    def need(key):
        if key not in hf:
            raise ValueError(f"{source}: missing required field {key!r}")
        return hf[key]

    model_type = need("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; only 'silu'")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")
    if hf.get("mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    # Qwen2 always has q/k/v biases (no flag); for Llama/Qwen3 `attention_bias` would also add an o_proj bias.
    if model_type != "qwen2" and hf.get("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=true is not supported for model_type={model_type!r}")

    # transformers>=5 writes `rope_parameters` (rope_theta inside); older files have rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not rope:
        rope = dict(hf.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:  # legacy spelling
        rope["rope_type"] = rope.pop("type")
    if rope.get("rope_type", "default") == "default":
        rope = {}

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    return ModelConfig(
        model_type=model_type,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        rope_theta=float(rope_theta),
        rope_scaling=_freeze(rope),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        dtype=dtype,
        hf_extra=_freeze({k: hf[k] for k in _PRESERVED_KEYS if k in hf}),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict transformers needs to rebuild this model (legacy rope keys: read by every version)."""
    hf = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {k: _thaw(v) for k, v in cfg.rope_scaling} or None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": cfg.dtype,
        "use_sliding_window": False,
    }
    if cfg.model_type != "qwen2":
        hf["attention_bias"] = False
    hf.update({k: _thaw(v) for k, v in cfg.hf_extra})
    return hf


def read_hf_config(path, *, dtype: str = "float32") -> ModelConfig:
    """Reads `<path>/config.json`."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json in the checkpoint directory")
    return config_from_hf(json.loads(file.read_text()), dtype=dtype, source=str(file))
