"""BCR on Qwen3-4B-Thinking-2507: N=3 problems per prompt under one shared 8,000-token budget.

    python -m bcr_jax.main --config configs/qwen3_4b_bcr.py --config.model.hf_path /path/to/Qwen3-4B-Thinking-2507
"""

from configs import qwen3_4b_grpo


def get_config():
    config = qwen3_4b_grpo.get_config()
    config.workdir = "runs/qwen3_4b_bcr"
    config.data.problems_per_prompt = 3
    config.rollout.budget = 8000
    return config
