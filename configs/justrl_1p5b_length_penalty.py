"""The explicit length-penalty baseline on JustRL-DeepSeek-1.5B: N=1, reward = accuracy - lambda * |y| / budget.

The paper shows this explicit pressure collapsing training where BCR's implicit one (configs/justrl_1p5b_bcr.py)
stays stable.

    python -m bcr_jax.main --config configs/justrl_1p5b_length_penalty.py --config.model.hf_path ...
"""

from configs import justrl_1p5b_grpo


def get_config():
    config = justrl_1p5b_grpo.get_config()
    config.workdir = "runs/justrl_1p5b_length_penalty"
    config.reward.length_penalty = 1.0  # the paper's -|y| / maxlen: a full-budget response costs a correct answer
    return config
