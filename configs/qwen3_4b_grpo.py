"""The N=1 GRPO baseline on Qwen3-4B-Thinking-2507 with an 8,000-token cap (recipe: configs/justrl_1p5b_grpo.py).

    python -m bcr_jax.main --config configs/qwen3_4b_grpo.py --config.model.hf_path /path/to/Qwen3-4B-Thinking-2507
"""

from configs import justrl_1p5b_grpo


def get_config():
    config = justrl_1p5b_grpo.get_config()
    config.workdir = "runs/qwen3_4b_grpo"
    config.model.hf_path = ""  # required: the Qwen3-4B-Thinking-2507 directory
    config.model.preset = "qwen3-4b-thinking-2507"  # architecture only (mode=plan without weights); training needs hf_path
    config.rollout.budget = 8000
    config.train.micro_batch_size = 4
    return config
