"""Flax/JAX ports of the Qwen2, Qwen3 and Llama decoders (one implementation, three flag sets)."""

from bcr_jax.models.config import ATTENTION_IMPLEMENTATIONS, ModelConfig, config_from_hf, config_to_hf, read_hf_config
from bcr_jax.models.hf import KEY_MAP, hf_keys, load_hf, save_hf
from bcr_jax.models.presets import PRESETS, get_preset
from bcr_jax.models.transformer import (REMAT_POLICIES, KVCache, Params, forward, forward_logits, init_params,
                                        logits_from_hidden, param_shapes, remat_policy, token_logprobs)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "KEY_MAP", "KVCache", "ModelConfig", "PRESETS", "Params", "config_from_hf",
    "config_to_hf", "forward",
    "forward_logits", "get_preset", "hf_keys", "init_params", "load_hf", "logits_from_hidden", "param_shapes",
    "read_hf_config", "save_hf", "REMAT_POLICIES", "remat_policy", "token_logprobs",
]
