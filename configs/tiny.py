"""A seconds-per-step GRPO run on CPU: a random tiny Qwen3 with a character tokenizer on single-digit sums.

    python -m bcr_jax.main --config configs/tiny.py --config.workdir runs/tiny

Every answer is one digit and the tokenizer has one token per boxed digit (`\\boxed{7}`), so even the random initial
policy writes a well-formed, correct answer now and then: every step carries a learning signal. Used by the
trainer's tests (the learning test, exact resume) and by outside checks, by name.
"""

from configs import base

DIGITS = "0123456789"


def get_config():
    config = base.get_config()
    config.mode = "train"
    config.workdir = "runs/tiny"
    config.total_steps = 60
    config.checkpoint_every = 10

    config.model.preset = "tiny-qwen3"
    config.tokenizer.kind = "chars"
    config.tokenizer.characters = DIGITS + "+-\n"
    config.tokenizer.words = tuple("\\boxed{" + d + "}" for d in DIGITS) + ("### Problem ",)
    # The model's vocabulary is exactly the tokenizer's (<pad>, <eos>, words, characters): no id the text can't show.
    config.model.vocab_size = 2 + len(config.tokenizer.words) + len(config.tokenizer.characters)

    config.data.source = "synthetic:digit-sums"
    config.data.num_problems = 512
    config.data.problems_per_prompt = 1
    config.data.template = "compact"

    config.rollout.prompts_per_step = 16
    config.rollout.samples_per_prompt = 8
    config.rollout.budget = 2  # one boxed digit and an EOS: a random policy is right ~5% of the time
    config.rollout.decode_blocks = 1

    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.0
    config.grading.num_workers = 1
    return config
