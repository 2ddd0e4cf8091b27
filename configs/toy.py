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

    config.model.preset = "toy-llama"  # only used when the warm start is rebuilt
    config.model.dtype = "float32"

    # RL recipe shared by every run (the trainer's config fields; the pipeline sets N and the reward).
    config.rollout.temperature = 1.0
    config.rollout.decode_blocks = 1
    config.loss.clip_low, config.loss.clip_high = 0.2, 0.28
    config.loss.aggregation = "token-mean"
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0
    config.train.log_every = 5
    config.grading.num_workers = 1  # single-digit answers: the parent's integer fast path decides almost all

    # The warm start's SFT (used by rebuild_warm_start=True, or if the shipped one is missing).
    config.sft.learning_rate = 2.5e-3
    config.sft.warmup_steps = 100
    config.sft.decay_fraction = 0.25
    config.sft.tokens_per_batch = 8192
    config.sft.weight_decay = 0.1
    config.sft.log_every = 100

    toy = config.toy = config_dict.ConfigDict()
    # The world (bcr_jax/toy/world.py): per rewrite line a first check with this probability, each repeat with the
    # second; above / below 1/2 so that greedy decoding writes one check per line and never loops.
    toy.first_check_prob = 0.8
    toy.repeat_check_prob = 0.3
    toy.runs = ("grpo", "bcr", "length_penalty", "length_penalty_high")  # + "bcr_segment": per-problem credit
    toy.train_problems = 20000
    toy.train_seed = 0
    toy.eval_problems = 192  # held out: generated from eval_seed, never used for tuning
    toy.eval_seed = 1000  # another seed reuses the finished runs and only evaluates (in <workdir>/eval_seed<seed>)
    toy.dev_seed = 2000  # problems the warm start is checked on (stop_after=warm_start), never the held-out ones
    toy.dev_problems = 400
    toy.dev_budget = 640  # the warm-start check's budget: above every verbose N=8 trace, so it measures reading
    toy.stop_after = ""  # "warm_start": build / measure the warm start, then stop
    toy.rl_steps = 60  # the same rollout budget for every run: steps x prompts x samples
    toy.prompts_per_step = 8
    toy.samples_per_prompt = 8
    # One response budget for every run: fits the verbose N=1 traces (99th percentile 101 tokens); shared by BCR's
    # three problems it is above every concise N=3 trace (at most 3 x 36 + EOS = 109) and below 78% of verbose ones.
    toy.budget = 120
    # The explicit baseline, reward - lambda |y| / budget. At lambda <= 1 no correct answer ranks below an empty
    # response; at 3, every correct answer longer than a third of the budget (most verbose ones) does.
    toy.length_penalty = 0.5
    toy.length_penalty_high = 3.0
    toy.n_values = (1, 2, 4, 8)
    # One fixed budget per prompt at every N (the paper's setting): every concise N=8 trace fits (at most 8 x 36 +
    # EOS = 289 tokens) and nearly every verbose N<=4 one, while most verbose N=8 traces (25th percentile 349) do not.
    toy.eval_budget = 320
    toy.eval_samples = 4  # responses per prompt at temperature 1 (greedy: 1)
    toy.rebuild_warm_start = False
    toy.warm_start = ""  # an HF directory to start from instead of the shipped bcr_jax/toy/warm_start
    toy.model_preset = "toy-llama"
    toy.sft_steps = 3000
    toy.sft_examples = 60000
    # (N, weight) of the SFT prompts: every N up to 8, so every position of an N=8 prompt is read in training.
    toy.sft_n_mix = ((1, 0.20), (2, 0.15), (3, 0.15), (4, 0.12), (5, 0.10), (6, 0.10), (7, 0.09), (8, 0.09))
    toy.sft_concise_share = 0.1  # traces without checks, at every N: the style RL may move to stays in-distribution
    toy.results_dir = "results"  # the full run's figures are copied here ("" = workdir only)

    toy.quick_rl_steps = 4
    toy.quick_prompts_per_step = 4
    toy.quick_eval_problems = 24
    toy.quick_sft_steps = 60
    return config
