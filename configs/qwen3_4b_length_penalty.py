"""The explicit length-penalty baseline on Qwen3-4B-Thinking-2507: N=1, reward = accuracy - lambda * |y| / 8,000.

    python -m bcr_jax.main --config configs/qwen3_4b_length_penalty.py --config.model.hf_path ...
"""

from configs import qwen3_4b_grpo


def get_config():
    config = qwen3_4b_grpo.get_config()
    config.workdir = "runs/qwen3_4b_length_penalty"
    config.reward.length_penalty = 1.0
    return config
