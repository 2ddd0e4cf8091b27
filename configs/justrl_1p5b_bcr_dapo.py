"""BCR with DAPO's recipe on JustRL-DeepSeek-1.5B: N=3 problems per prompt under one shared 5,120-token budget (as
configs/justrl_1p5b_bcr.py), plus dynamic sampling, soft overlong punishment and verl's dual clip.

    python -m bcr_jax.main --config configs/justrl_1p5b_bcr_dapo.py --config.model.hf_path /path/to/JustRL-DeepSeek-1.5B

DAPO's four techniques, with their verl names: clip-higher (clip 0.2 / 0.28, already the JustRL recipe), token-level
loss (`token-mean`, likewise), dynamic sampling (`algorithm.filter_groups`) and overlong reward shaping
(`reward_model.overlong_buffer`, DAPO: 4,096 of 20,480 tokens, the same 20% of our budget here). With overlong
shaping a group whose answers tie but whose lengths differ inside the buffer is not tied, so dynamic sampling keeps it.
"""

from configs import justrl_1p5b_bcr


def get_config():
    config = justrl_1p5b_bcr.get_config()
    config.workdir = "runs/justrl_1p5b_bcr_dapo"
    config.loss.clip_low = 0.2  # clip-higher (verl clip_ratio_low / clip_ratio_high)
    config.loss.clip_high = 0.28
    config.loss.clip_ratio_c = 3.0  # verl's default dual clip, on in every verl DAPO run
    config.loss.aggregation = "token-mean"  # DAPO's token-level policy-gradient loss
    config.rollout.dynamic_sampling = True
    config.rollout.max_resample_rounds = 9  # DAPO's max_num_gen_batches = 10
    config.reward.overlong_buffer = 1024  # the last 1,024 of the 5,120 shared tokens
    config.reward.overlong_penalty_factor = 1.0
    return config
