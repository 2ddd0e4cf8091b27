"""The paper's task-scaling-law table on real checkpoints: base model vs its BCR-trained run, five math benchmarks,
N = 1, 2, 3, 4, 5, 8 problems per prompt under one fixed response budget.

    # JustRL-DeepSeek-1.5B family (5,120-token budget, as in training)
    python -m bcr_jax.main --config configs/eval_paper.py \
        --config.eval.checkpoints="('/path/to/JustRL-DeepSeek-1.5B', 'runs/justrl_1p5b_bcr')" \
        --config.eval.labels="('JustRL-1.5B', 'BCR')" --config.workdir runs/eval_justrl_1p5b

    # Qwen3-4B-Thinking-2507 family (8,000-token budget)
    python -m bcr_jax.main --config configs/eval_paper.py --config.eval.budget 8000 \
        --config.eval.checkpoints="('/path/to/Qwen3-4B-Thinking-2507', 'runs/qwen3_4b_bcr@500')" \
        --config.eval.labels="('Qwen3-4B', 'BCR')" --config.workdir runs/eval_qwen3_4b

A checkpoint is an HF directory or a training run's workdir (its latest step, or `workdir@step`); the first one is
the base the Δ columns compare against. Benchmarks come from the hub; on a machine without it, point each at a
local copy: `--config.eval.benchmarks="('math-500=/data/math500.jsonl', 'aime-2025=/data/aime25.parquet', ...)"`.
An interrupted run resumes where it stopped (finished cells are cached in the workdir); a grading change is
applied to the kept responses with `--config.eval.rescore=True`. Results: workdir/scaling_law.{md,csv,json,png}.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.mode = "eval"
    config.workdir = "runs/eval_paper"

    config.model.dtype = "bfloat16"  # inference only
    config.tokenizer.kind = "auto"  # each checkpoint's own tokenizer and chat template
    config.data.template = "default"  # the training prompt: instructions + ### Problem k sections
    config.rollout.thinking = "auto"  # the <think>\n prefix of R1-Distill / Qwen3-Thinking templates
    config.rollout.require_think_close = True  # answers read after </think>, as in training
    config.rollout.decode_blocks = 4

    config.eval.checkpoints = ()  # required: (base HF directory, BCR run workdir[@step] or HF directory, ...)
    config.eval.labels = ()
    config.eval.benchmarks = ("math-500", "aime-2025", "amc-2023", "minerva-math", "olympiadbench")
    config.eval.n_values = (1, 2, 3, 4, 5, 8)
    config.eval.count_phrases = ("wait", "let me double-check", "hmm", "alternatively")  # reflection loops
    config.eval.orderings = 2  # every problem at two positions (file order, one shuffle)
    config.eval.samples = 4  # x 2 orderings: 8 graded answers per problem and N
    config.eval.temperature = 0.6  # the DeepSeek-R1 / Qwen3-Thinking recommended evaluation sampling
    config.eval.top_p = 0.95
    config.eval.budget_rule = "fixed"  # one shared budget per prompt, whatever N (the paper's implicit budget)
    config.eval.budget = 5120  # JustRL-1.5B; 8000 for Qwen3-4B-Thinking
    config.eval.batch_prompts = 64
    config.grading.num_workers = 0  # all CPUs
    return config
