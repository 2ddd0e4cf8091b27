"""The paper's N=1 GRPO baseline on JustRL-DeepSeek-1.5B (Qwen2) and DeepMath-103K.

    python -m bcr_jax.main --config configs/justrl_1p5b_grpo.py \
        --config.model.hf_path /path/to/JustRL-DeepSeek-1.5B [--config.data.path deepmath.parquet]

Defaults follow the JustRL recipe BCR builds on: GRPO, no KL, no entropy bonus, clip 0.2 / 0.28 (clip-higher),
lr 1e-6 constant after 10 warm-up steps, weight decay 0.1, grad-norm clip 1.0, 8 samples per prompt at
temperature 1.0. The same response cap as BCR (5,120 tokens) so the two differ only in N. Everything is overridable.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.mode = "train"
    config.workdir = "runs/justrl_1p5b_grpo"
    config.total_steps = 500
    config.checkpoint_every = 25
    config.keep_checkpoints = 3

    config.model.hf_path = ""  # required: the JustRL-DeepSeek-1.5B directory (DeepSeek-R1-Distill-Qwen-1.5B works)
    config.model.dtype = "float32"  # f32 master weights
    config.model.preset = "justrl-deepseek-1.5b"  # architecture only (mode=plan without weights); training needs hf_path
    config.tokenizer.kind = "hf"

    config.data.source = "deepmath-103k"
    config.data.path = ""  # or a local copy of zwhe99/DeepMath-103K (.parquet / .jsonl)
    config.data.problems_per_prompt = 1
    config.data.grouping = "stratified"
    config.data.template = "default"

    config.rollout.prompts_per_step = 64
    config.rollout.samples_per_prompt = 8
    config.rollout.budget = 5120
    config.rollout.temperature = 1.0
    config.rollout.top_p = 1.0
    config.rollout.thinking = "auto"  # the R1-Distill template's <think>\n prefix
    config.rollout.require_think_close = True  # answers are read after </think> (DeepScaleR's rule)
    config.rollout.dtype = "bfloat16"  # a bf16 rollout copy, cast once per step

    config.reward.estimator = "grpo"
    config.reward.reduction = "mean"
    config.reward.credit = "sequence"

    config.loss.policy_loss = "clipped"
    config.loss.clip_low = 0.2
    config.loss.clip_high = 0.28
    config.loss.aggregation = "token-mean"
    config.loss.kl_weight = 0.0
    config.loss.entropy_weight = 0.0

    config.optim.learning_rate = 1e-6
    config.optim.warmup_steps = 10
    config.optim.schedule = "constant"
    config.optim.weight_decay = 0.1
    config.optim.grad_clip = 1.0

    config.train.epochs_per_rollout = 1
    config.train.mini_batch_size = 256  # rows: 2 optimizer steps per rollout of 64 x 8
    config.train.micro_batch_size = 8
    config.train.compute_dtype = "bfloat16"
    config.train.remat = "full"
    return config
