"""Base config: every field the entry point reads, documented where it is defined.

Experiments import `get_config()` from here and override fields; the command line overrides anything with
`--config.section.field=value`. The default samples from the tiny random Qwen3 preset, so
`python -m bcr_jax.main --config configs/base.py` runs anywhere in seconds.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    config = config_dict.ConfigDict()
    config.mode = "sample"  # toy | sample | sft | train | export | eval | solve | plan (see bcr_jax.main.MODES)
    config.workdir = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events, exports
    config.seed = 0  # data order, rollout sampling and dropout-free training are all derived from it
    config.total_steps = 100  # training steps (one rollout + its optimizer passes each)
    config.checkpoint_every = 50  # save every k steps (and at the last step)
    config.keep_checkpoints = 3  # keep the last m checkpoints
    config.resume = True  # continue from the latest checkpoint in workdir if there is one

    config.model = config_dict.ConfigDict()
    config.model.hf_path = ""  # HF checkpoint directory (config.json + safetensors + tokenizer); wins over preset
    config.model.preset = "tiny-qwen3"  # bcr_jax.models.PRESETS name, random weights (when hf_path is empty)
    config.model.dtype = "float32"  # dtype the weights are loaded in (training: the master weights' dtype)
    config.model.init_seed = 0  # random-weight seed for presets
    config.model.vocab_size = 0  # presets only: another vocabulary size (e.g. a CharTokenizer's); 0 = the preset's

    config.tokenizer = config_dict.ConfigDict()
    config.tokenizer.kind = "auto"  # auto (the checkpoint's, none for a preset) | hf | chars
    config.tokenizer.characters = ""  # chars: the alphabet
    config.tokenizer.words = ()  # chars: whole-word tokens matched before single characters

    config.mesh = config_dict.ConfigDict()
    config.mesh.data = -1  # -1: all devices not used by the other axes
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    # ---- training (mode=train)
    config.data = config_dict.ConfigDict()
    config.data.source = "deepmath-103k"  # a bcr_jax.data.SOURCES name, synthetic:<generator>, or local (data.path)
    config.data.path = ""  # local .jsonl / .json / .parquet copy of the source (instead of the hub)
    config.data.limit = 0  # read at most this many problems (0 = all)
    config.data.num_problems = 4096  # synthetic sources: how many problems to generate
    config.data.problems_per_prompt = 3  # N: problems packed into one prompt (1 = plain GRPO)
    config.data.grouping = "stratified"  # stratified (similar mean difficulty per group) | random
    config.data.template = "default"  # bcr.TEMPLATES: default (instructions) | compact (sections only)
    config.data.on_error = "raise"  # malformed rows: raise | skip
    config.data.check_golds = 1000  # parse this many (sampled) golds at start and warn about incomplete ones; 0 = off

    config.rollout = config_dict.ConfigDict()
    config.rollout.prompts_per_step = 64  # P prompts per step
    config.rollout.samples_per_prompt = 8  # G samples per prompt (the GRPO group)
    config.rollout.budget = 5120  # the shared response budget = max_new_tokens
    config.rollout.temperature = 1.0
    config.rollout.top_p = 1.0
    config.rollout.top_k = 0  # 0 = off
    config.rollout.thinking = "auto"  # chat template thinking prefix: auto | force | off
    config.rollout.require_think_close = False  # read answers only after the last </think>
    config.rollout.decode_blocks = 4  # KV cache grows in this many blocks (see sampling.generate)
    config.rollout.dtype = ""  # "" = the compute dtype; bfloat16 casts a rollout copy once per step
    # DAPO's dynamic sampling (verl algorithm.filter_groups, metric seq_final_reward): groups whose advantages are all 0
    # are dropped and rounds of P fresh groups sampled until P remain; extra rounds at most max_resample_rounds (verl
    # max_num_gen_batches - 1), then tied groups fill the step outside the loss (logged: rollout/kept_groups)
    config.rollout.dynamic_sampling = False
    config.rollout.max_resample_rounds = 9

    config.reward = config_dict.ConfigDict()
    config.reward.estimator = "grpo"  # rl.ADVANTAGE_ESTIMATORS: grpo | dr_grpo
    config.reward.reduction = "mean"  # per-instance accuracy combined as the mean or the sum over N
    config.reward.format_weight = 0.0  # reward per well-formed answer (the paper: 0)
    config.reward.credit = "sequence"  # sequence (the paper) | segment (each problem's tokens get its advantage)
    config.reward.length_penalty = 0.0  # lambda of the explicit baseline: reward - lambda * |y| / budget
    # DAPO's soft overlong punishment (verl reward_model.overlong_buffer.len / .penalty_factor): tokens of the budget's
    # last stretch; reward += min(0, -factor * (|y| - (budget - buffer)) / buffer), -factor at the budget. 0 = off
    config.reward.overlong_buffer = 0
    config.reward.overlong_penalty_factor = 1.0

    config.loss = config_dict.ConfigDict()
    config.loss.policy_loss = "clipped"  # rl.POLICY_LOSSES
    config.loss.clip_low = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher)
    config.loss.clip_high = 0.28
    config.loss.clip_ratio_c = 0.0  # dual clip (verl clip_ratio_c, 3.0 there): A < 0 tokens' loss <= -c A; 0 = off
    # rl.AGGREGATIONS (verl loss_agg_mode): token-mean | seq-mean-token-sum | seq-mean-token-mean
    # | seq-mean-token-sum-norm (Dr. GRPO, / budget). Rows without loss tokens count as rows in every seq-mean
    config.loss.aggregation = "token-mean"
    config.loss.mask_truncated = False  # drop responses cut off by the budget from the loss
    config.loss.drop_tied_groups = False  # drop groups whose rewards all tie (zero advantage anyway)
    config.loss.kl_weight = 0.0  # k3 KL to the frozen initial params (0: no reference params allocated)
    config.loss.entropy_weight = 0.0  # entropy bonus

    config.optim = config_dict.ConfigDict()
    config.optim.learning_rate = 1e-6
    config.optim.warmup_steps = 10  # linear warm-up (optimizer steps)
    config.optim.schedule = "constant"  # after warm-up: constant | cosine | linear (decay to 0 at the end)
    config.optim.weight_decay = 0.1
    config.optim.grad_clip = 1.0  # global-norm clipping (0 = off)
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8

    config.train = config_dict.ConfigDict()
    config.train.epochs_per_rollout = 1  # mu: optimizer passes over each rollout
    config.train.mini_batch_size = 0  # rows per optimizer step (0 = the whole rollout, P * G)
    config.train.micro_batch_size = 0  # rows per forward/backward, gradients accumulated (0 = the mini-batch)
    config.train.compute_dtype = "float32"  # activations and matmuls (bfloat16 with f32 master weights)
    config.train.remat = "none"  # models.REMAT_POLICIES: none | full | dots_saveable | offload_dots_with_no_batch_dims
    # Whole-sequence attention: auto (cuDNN on GPU in bf16, splash on TPU, blocked elsewhere; plain up to one block)
    # | plain (memory quadratic in the row width) | blocked (linear, any backend) | cudnn | splash
    config.train.attention = "auto"
    config.train.attention_block = 512  # query/key block of the blocked and splash paths
    config.train.logprob_chunk = 512  # positions per lm_head chunk in the log-probs (0 = all: a [rows, T, vocab] buffer)
    config.train.scan_layers = True  # update step: lax.scan over layers (bounded memory with remat, fast compiles)
    config.train.log_every = 1  # console line every k steps (metrics are written every step)
    config.train.count_text = ""  # if set, metric rollout/count_per_problem: its occurrences per problem in responses

    config.grading = config_dict.ConfigDict()
    config.grading.num_workers = 0  # grading processes (0 = CPU count, at most 16)
    config.grading.timeout_s = 3.0  # per-answer limit

    config.sft = config_dict.ConfigDict()  # mode=sft: a warm start by next-token training (bcr_jax/sft.py)
    config.sft.path = ""  # JSONL of {"prompt": user message, "response": target}
    config.sft.steps = 1000
    config.sft.learning_rate = 3e-3
    config.sft.warmup_steps = 50
    config.sft.decay_fraction = 0.2  # warm-up, stable, then linear decay to 0 over this last fraction (WSD)
    config.sft.weight_decay = 0.1  # AdamW (betas and grad clip from config.optim)
    config.sft.tokens_per_batch = 4096  # rows per batch = this // the batch's padded length
    config.sft.length_multiple = 32  # examples are padded to this times a power of two (a compiled shape per bucket)
    config.sft.log_every = 50

    config.export = config_dict.ConfigDict()
    config.export.step = -1  # mode=export: this checkpoint step (-1 = the latest)

    # ---- sampling (mode=sample)
    config.sample = config_dict.ConfigDict()
    config.sample.prompts = ("What is 2 + 3?", "Name a prime number larger than 10.")
    config.sample.prompt_file = ""  # text file, one prompt per line (wins over `prompts`)
    config.sample.chat_template = True  # wrap prompts in the checkpoint's chat template (hf_path only)
    config.sample.thinking = "auto"  # auto | force | off: the <think>\n prefix of reasoning checkpoints
    config.sample.max_new_tokens = 32
    config.sample.temperature = 0.0  # 0 = greedy
    config.sample.top_p = 1.0
    config.sample.top_k = 0  # 0 = off
    config.sample.num_samples = 1
    config.sample.seed = 0

    # ---- evaluation (mode=eval): the task-scaling law, see bcr_jax/evaluate.py
    config.eval = config_dict.ConfigDict()
    config.eval.checkpoints = ()  # HF directories or training workdirs (workdir@step); () = this config's model
    config.eval.labels = ()  # display names, one per checkpoint (default: directory names); the first is the Δ base
    config.eval.benchmarks = ("math-500",)  # SOURCES names, name=local copy, synthetic:<gen>, .jsonl/.parquet
    config.eval.problem_field = ""  # local files: the problem's field ("" = problem)
    config.eval.answer_field = ""  # local files: the gold answer's field ("" = answer)
    config.eval.limit = 0  # at most this many problems per benchmark (0 = all)
    config.eval.num_problems = 256  # synthetic benchmarks: how many problems
    config.eval.n_values = (1, 2, 3, 4, 5, 8)  # N: problems packed per prompt
    config.eval.orderings = 1  # passes over each benchmark: 0 = its own order, then seeded shuffles
    config.eval.samples = 4  # responses per prompt (accuracy = pass@1 averaged over them)
    # top_k, chat-template thinking prefix and answer parser: rollout.top_k / thinking / require_think_close
    config.eval.temperature = 0.6
    config.eval.top_p = 0.95
    config.eval.budget_rule = "fixed"  # fixed: eval.budget per prompt | per_problem: eval.budget_per_problem x N
    config.eval.budget = 5120  # response tokens per prompt (fixed rule)
    config.eval.budget_per_problem = 1024  # response tokens per problem (per_problem rule)
    config.eval.batch_prompts = 64  # prompts per sampler call (each with eval.samples responses)
    config.eval.seed = 0  # orderings, sampling and synthetic benchmarks
    config.eval.count_phrases = ()  # phrases counted per problem in every cell's responses (metacognitive loops)
    config.eval.rescore = False  # re-grade the cached raw responses of workdir/scaling_law.json, no sampling

    # ---- solving unlabelled problems (mode=solve); sampling knobs and budget rule from config.eval
    config.solve = config_dict.ConfigDict()
    config.solve.path = ""  # .jsonl (problem, optional id) or .txt (one problem per line)
    config.solve.n = 3  # problems per prompt (the last prompt may hold fewer)
    config.solve.output = ""  # "" = workdir/solutions.jsonl
    config.solve.checkpoint = ""  # HF directory or workdir[@step]; "" = this config's model

    # ---- memory plan (mode=plan): bytes per device of this config's training run, see bcr_jax/plan.py
    config.plan = config_dict.ConfigDict()
    config.plan.accelerator = "v5p-8"  # plan.ACCELERATORS: v4-8 | v5e-8 | v5p-8 | h100-80gb | h200 (all in the table)
    config.plan.devices = 0  # devices of that accelerator (0 = its own count: TPU chips, 8 GPUs)
    config.plan.prompt_tokens = 512  # longest packed prompt (bucketed to a power of two, as the sampler does)
    config.plan.compile = True  # compile the update step for the mesh (XLA:CPU if needed); False = analytic only
    config.plan.usable_fraction = 0.9  # share of each device's memory a plan may use (the runtime keeps some)
    config.plan.search = False  # also print, per accelerator, the mesh and micro-batch that fit (analytic)

    # ---- several processes / hosts (bcr_jax/distributed.py; launch/README.md). Every process runs the same command;
    # the mesh spans the devices of all of them. Leave all unset for one process, and under Slurm / Open MPI or with
    # TPU_WORKER_ID set, where jax.distributed.initialize() detects them; on a Cloud TPU VM pod set initialize='on'
    # (launch/tpu_pod.sh does): JAX reads the workers from the TPU metadata server.
    config.distributed = config_dict.ConfigDict()
    config.distributed.initialize = "auto"  # auto (a key below is set, or a TPU/Slurm/MPI job is detected) | on | off
    config.distributed.coordinator_address = ""  # host:port of process 0, the same on every process ("" = detect)
    config.distributed.num_processes = 0  # processes in the job (0 = detect)
    config.distributed.process_id = -1  # this process: 0 .. num_processes - 1 (-1 = detect)
    config.distributed.local_device_ids = ()  # devices this process drives, e.g. (3,) for one GPU per process; () = all
    config.distributed.cpu_collectives = "gloo"  # XLA:CPU cross-process collectives (CPU jobs, tests): gloo | mpi
    config.distributed.initialization_timeout_s = 300  # how long to wait for every process to join
    return config
