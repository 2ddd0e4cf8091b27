"""BCR on JustRL-DeepSeek-1.5B: N=3 problems per prompt under one shared 5,120-token budget, reward = mean
per-instance accuracy (no length term). Everything else is the GRPO baseline's recipe (configs/justrl_1p5b_grpo.py).

    python -m bcr_jax.main --config configs/justrl_1p5b_bcr.py --config.model.hf_path /path/to/JustRL-DeepSeek-1.5B
"""

from configs import justrl_1p5b_grpo


def get_config():
    config = justrl_1p5b_grpo.get_config()
    config.workdir = "runs/justrl_1p5b_bcr"
    config.data.problems_per_prompt = 3  # grouped with similar average difficulty (stratified)
    config.rollout.budget = 5120  # shared by the three problems
    return config
