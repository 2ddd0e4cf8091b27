"""Base config: every field the entry point reads, documented where it is defined.

Experiments import `get_config()` from here and override fields; the command line overrides anything with
`--config.section.field=value`. The default samples from the tiny random Qwen3 preset, so
`python -m bcr_jax.main --config configs/base.py` runs anywhere in seconds (the toy world replaces it as the
default job once it exists).
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    config = config_dict.ConfigDict()
    config.mode = "sample"  # sample (train / eval arrive with their issues)

    config.model = config_dict.ConfigDict()
    config.model.hf_path = ""  # HF checkpoint directory (config.json + safetensors + tokenizer); wins over preset
    config.model.preset = "tiny-qwen3"  # bcr_jax.models.PRESETS name, random weights (when hf_path is empty)
    config.model.dtype = "float32"  # float32 | bfloat16
    config.model.init_seed = 0  # random-weight seed for presets

    config.mesh = config_dict.ConfigDict()
    config.mesh.data = -1  # -1: all devices not used by the other axes
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

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
    return config
