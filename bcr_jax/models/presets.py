"""Configs of the full-size checkpoints (published `config.json` values) and tiny test configs of each family."""

from __future__ import annotations

from bcr_jax.models.config import ModelConfig

# DeepSeek-R1-Distill-Qwen-1.5B; JustRL-DeepSeek-1.5B is an RL fine-tune of it with the same architecture.
_R1_DISTILL_1_5B = ModelConfig(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
    num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6,
    qkv_bias=True, qk_norm=False, tie_embeddings=False, max_position_embeddings=131072,
    hf_extra=(("bos_token_id", 151646), ("eos_token_id", 151643), ("max_window_layers", 21)),
)

PRESETS: dict[str, ModelConfig] = {
    "deepseek-r1-distill-qwen-1.5b": _R1_DISTILL_1_5B,
    "justrl-deepseek-1.5b": _R1_DISTILL_1_5B,
    "qwen3-4b-thinking-2507": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5000000.0, rms_norm_eps=1e-6,
        qkv_bias=False, qk_norm=True, tie_embeddings=True, max_position_embeddings=262144,
        hf_extra=(("bos_token_id", 151643), ("eos_token_id", 151645)),
    ),
    "smollm2-135m": ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        qkv_bias=False, qk_norm=False, tie_embeddings=True, max_position_embeddings=8192,
        hf_extra=(("bos_token_id", 1), ("eos_token_id", 2)),
    ),
    # Tiny configs for tests: GQA everywhere, an odd head_dim where the family allows it.
    "tiny-qwen2": ModelConfig(
        model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, qkv_bias=True, tie_embeddings=False,
    ),
    "tiny-qwen3": ModelConfig(
        model_type="qwen3", vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=18, rope_theta=1000000.0, qk_norm=True, tie_embeddings=True,
    ),
    "tiny-llama": ModelConfig(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=1, head_dim=16, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True,
    ),
    # A 0.64M-parameter decoder that trains in minutes on a CPU (the toy replication's warm start); vocab_size is
    # the toy tokenizer's.
    "mini-llama": ModelConfig(
        model_type="llama", vocab_size=22, hidden_size=128, intermediate_size=384, num_layers=3,
        num_heads=4, num_kv_heads=4, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=True,
        max_position_embeddings=2048,
    ),
    # The toy world's warm start since the rewrite format (d 192, 4 layers, 6 heads; 1.78M parameters).
    "toy-llama": ModelConfig(
        model_type="llama", vocab_size=21, hidden_size=192, intermediate_size=512, num_layers=4,
        num_heads=6, num_kv_heads=6, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=True,
        max_position_embeddings=1024,
    ),
    # The sampling benchmark's model (issue: hidden 256, 4 layers, 8 heads / 4 kv heads, head_dim 32, vocab 1000).
    "bench-qwen3": ModelConfig(
        model_type="qwen3", vocab_size=1000, hidden_size=256, intermediate_size=1024, num_layers=4,
        num_heads=8, num_kv_heads=4, head_dim=32, rope_theta=1000000.0, qk_norm=True, tie_embeddings=True,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
