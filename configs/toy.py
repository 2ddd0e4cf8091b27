"""The toy replication, the README's main job: BCR's task-scaling law and N=1 free lunch on a laptop CPU.

    python -m bcr_jax.main --config configs/toy.py                      # the full run (under 30 min on 2 cores)
    python -m bcr_jax.main --config configs/toy.py --config.quick=True  # the same pipeline, small (minutes)

Warm start (shipped, or rebuilt by mode=sft) → GRPO at N=1, BCR at N=3, the explicit length penalty → evaluation
on held-out problems at N = 1, 2, 4, 8 (temperature 1 and greedy). See bcr_jax/toy/pipeline.py; results land in
the workdir and, for the full run, in results/.
"""

from ml_collections import config_dict

from configs import base


def get_config():
    config = base.get_config()
    config.mode = "toy"
    config.workdir = "runs/toy"
    config.quick = False  # True: fewer RL steps and held-out problems (CI, a first look), in <workdir>_quick
    config.seed = 0
    config.mesh.data = -1  # every device on the data axis (one on a plain CPU; the model is too small to shard)

    config.model.preset = "mini-llama"  # only used when the warm start is rebuilt
    config.model.dtype = "float32"

    # RL recipe shared by the three runs (the trainer's config fields; the pipeline sets N, budget and reward).
    config.rollout.temperature = 1.0
    config.rollout.decode_blocks = 1
    config.loss.clip_low, config.loss.clip_high = 0.2, 0.28
    config.loss.aggregation = "token-mean"
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 5
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0
    config.train.log_every = 5
    config.grading.num_workers = 1  # single-digit answers: the parent's integer fast path decides almost all

    # The warm start's SFT (used by rebuild_warm_start=True, or if the shipped one is missing).
    config.sft.learning_rate = 3e-3
    config.sft.warmup_steps = 50
    config.sft.decay_fraction = 0.2
    config.sft.tokens_per_batch = 4096
    config.sft.weight_decay = 0.1
    config.sft.log_every = 50

    toy = config.toy = config_dict.ConfigDict()
    toy.runs = ("grpo", "bcr", "length_penalty")  # add "bcr_segment" for per-problem segment credit
    toy.train_problems = 20000
    toy.train_seed = 0
    toy.eval_problems = 96  # held out: generated from eval_seed, never used for tuning
    toy.eval_seed = 1000
    toy.rl_steps = 60  # the same rollout budget for every run: steps x prompts x samples
    toy.prompts_per_step = 16
    toy.samples_per_prompt = 8
    toy.grpo_budget = 128  # fits the verbose N=1 traces (99th percentile: 95 tokens)
    toy.bcr_budget = 100  # shared by 3 problems: ~25th percentile of verbose N=3 traces, above every concise one (<= 90)
    toy.length_penalty = 1.0  # the paper's explicit baseline: reward - |y| / budget
    toy.n_values = (1, 2, 4, 8)
    toy.eval_budget = 256  # one fixed budget per prompt at every N (the paper's setting)
    toy.eval_samples = 4  # responses per prompt at temperature 1 (greedy: 1)
    toy.rebuild_warm_start = False
    toy.model_preset = "mini-llama"
    toy.sft_steps = 2500
    toy.sft_examples = 30000
    toy.sft_n_mix = ((1, 0.4), (2, 0.2), (3, 0.4))  # (N, weight) of the SFT prompts
    toy.results_dir = "results"  # the full run's figures are copied here ("" = workdir only)

    toy.quick_rl_steps = 4
    toy.quick_prompts_per_step = 8
    toy.quick_eval_problems = 24
    toy.quick_sft_steps = 60
    return config
