"""Tests for bcr_jax.tokenizer: the Tokenizer protocol, eos/pad ids, offsets and chat prompts.

The tiny R1-Distill / Qwen3 tokenizers come from conftest (ids documented there: every ASCII
character's id is its code point, "42" = 256, " =" = 257, then the family's added tokens). Expected
prompts below are written out by hand from the real templates' generation prompts.
"""

import json
import shutil

import pytest

from bcr_jax.tokenizer import (
    HFTokenizer,
    Tokenizer,
    build_chat_prompt,
    load_tokenizer,
    render_chat_prompt,
)

R1_BOS, R1_EOS, R1_USER, R1_ASSISTANT, R1_THINK, R1_END_THINK = 259, 258, 260, 261, 262, 263
Q3_ENDOFTEXT, Q3_IM_START, Q3_IM_END, Q3_THINK, Q3_END_THINK = 258, 259, 260, 261, 262
NL = 10


def ascii_ids(text: str) -> list[int]:
    """Ids of `text` in the tiny tokenizers when no merge applies (byte value == id)."""
    assert "42" not in text and " =" not in text, "a merge would apply"
    return list(text.encode("ascii"))


# --- R1-Distill family ------------------------------------------------------------------------

R1_PROMPT_NO_THINK = "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"
R1_PROMPT_THINK = R1_PROMPT_NO_THINK + "<think>\n"
R1_IDS_NO_THINK = [R1_BOS, R1_USER, ord("H"), ord("i"), R1_ASSISTANT]
R1_IDS_THINK = R1_IDS_NO_THINK + [R1_THINK, NL]


@pytest.mark.parametrize(
    "which, thinking, expected_text, expected_ids",
    [
        # Current template: the generation prompt already opens <think>; never doubled or removed.
        ("new", "auto", R1_PROMPT_THINK, R1_IDS_THINK),
        ("new", "force", R1_PROMPT_THINK, R1_IDS_THINK),
        ("new", "off", R1_PROMPT_THINK, R1_IDS_THINK),
        # Original template: "auto" and "force" add the prefix, "off" does not.
        ("old", "auto", R1_PROMPT_THINK, R1_IDS_THINK),
        ("old", "force", R1_PROMPT_THINK, R1_IDS_THINK),
        ("old", "off", R1_PROMPT_NO_THINK, R1_IDS_NO_THINK),
    ],
)
def test_r1_distill_generation_prompt(
    r1_tokenizer_dir, r1_old_tokenizer_dir, which, thinking, expected_text, expected_ids
):
    tok = load_tokenizer(r1_tokenizer_dir if which == "new" else r1_old_tokenizer_dir)
    assert render_chat_prompt(tok, "Hi", thinking=thinking) == expected_text
    ids = build_chat_prompt(tok, "Hi", thinking=thinking)
    assert ids == expected_ids
    # The template renders BOS itself; encoding must not add a second one (the R1 tokenizer
    # prepends BOS when asked to add special tokens).
    assert ids.count(R1_BOS) == 1


def test_r1_distill_system_prompt_follows_bos(r1_tokenizer_dir):
    tok = load_tokenizer(r1_tokenizer_dir)
    assert (
        render_chat_prompt(tok, "Hi", system="Be brief.")
        == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜><think>\n"
    )
    assert build_chat_prompt(tok, "Hi", system="Be brief.") == (
        [R1_BOS]
        + ascii_ids("Be brief.")
        + [R1_USER]
        + ascii_ids("Hi")
        + [R1_ASSISTANT, R1_THINK, NL]
    )


def test_build_chat_prompt_matches_apply_chat_template_tokenization(
    r1_tokenizer_dir, qwen3_tokenizer_dir
):
    # Independent reference: transformers' own tokenize=True path of the same template.
    for d in (r1_tokenizer_dir, qwen3_tokenizer_dir):
        tok = load_tokenizer(d)
        messages = [{"role": "user", "content": "What is 6*7 = 42?"}]
        ref = tok.hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert build_chat_prompt(tok, "What is 6*7 = 42?") == list(ref)


# --- Qwen3 family -----------------------------------------------------------------------------

Q3_PROMPT_BASE = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
Q3_IDS_BASE = (
    [Q3_IM_START] + ascii_ids("user\nHi") + [Q3_IM_END, NL, Q3_IM_START] + ascii_ids("assistant\n")
)


@pytest.mark.parametrize(
    "which, thinking, expected_text, expected_ids",
    [
        # Qwen3-4B-Thinking-2507: <think>\n is part of the template's generation prompt.
        ("new", "auto", Q3_PROMPT_BASE + "<think>\n", Q3_IDS_BASE + [Q3_THINK, NL]),
        ("new", "force", Q3_PROMPT_BASE + "<think>\n", Q3_IDS_BASE + [Q3_THINK, NL]),
        ("new", "off", Q3_PROMPT_BASE + "<think>\n", Q3_IDS_BASE + [Q3_THINK, NL]),
        # Hybrid template without the suffix: added by auto/force; "off" passes
        # enable_thinking=False, which renders the template's own empty think block.
        ("old", "auto", Q3_PROMPT_BASE + "<think>\n", Q3_IDS_BASE + [Q3_THINK, NL]),
        ("old", "force", Q3_PROMPT_BASE + "<think>\n", Q3_IDS_BASE + [Q3_THINK, NL]),
        (
            "old",
            "off",
            Q3_PROMPT_BASE + "<think>\n\n</think>\n\n",
            Q3_IDS_BASE + [Q3_THINK, NL, NL, Q3_END_THINK, NL, NL],
        ),
    ],
)
def test_qwen3_generation_prompt(
    qwen3_tokenizer_dir, qwen3_old_tokenizer_dir, which, thinking, expected_text, expected_ids
):
    tok = load_tokenizer(qwen3_tokenizer_dir if which == "new" else qwen3_old_tokenizer_dir)
    assert render_chat_prompt(tok, "Hi", thinking=thinking) == expected_text
    assert build_chat_prompt(tok, "Hi", thinking=thinking) == expected_ids


def test_qwen3_system_prompt(qwen3_tokenizer_dir):
    tok = load_tokenizer(qwen3_tokenizer_dir)
    assert render_chat_prompt(tok, "Hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + Q3_PROMPT_BASE + "<think>\n"
    )


def test_template_ending_in_bare_think_gets_only_the_newline(r1_old_tokenizer_dir):
    tok = load_tokenizer(r1_old_tokenizer_dir)
    tok.hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<｜User｜>' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>' }}{% endif %}"
    )
    assert render_chat_prompt(tok, "Hi") == R1_PROMPT_THINK
    assert render_chat_prompt(tok, "Hi", thinking="force") == R1_PROMPT_THINK
    assert render_chat_prompt(tok, "Hi", thinking="off") == R1_PROMPT_NO_THINK + "<think>"


def test_invalid_thinking_mode_and_missing_template(r1_tokenizer_dir):
    tok = load_tokenizer(r1_tokenizer_dir)
    with pytest.raises(ValueError, match="thinking must be one of"):
        render_chat_prompt(tok, "Hi", thinking="on")
    tok.hf.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_chat_prompt(tok, "Hi")


def test_accepts_bare_transformers_tokenizer(qwen3_old_tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen3_old_tokenizer_dir))
    assert render_chat_prompt(hf, "Hi") == Q3_PROMPT_BASE + "<think>\n"


# --- eos / pad / vocab --------------------------------------------------------------------------


def test_eos_pad_and_vocab(r1_tokenizer_dir, qwen3_tokenizer_dir):
    r1 = load_tokenizer(r1_tokenizer_dir)
    assert r1.eos_ids == (R1_EOS,)
    assert r1.pad_id == R1_EOS
    assert r1.vocab_size == 264
    assert isinstance(r1, Tokenizer)

    q3 = load_tokenizer(qwen3_tokenizer_dir)
    # eos_token first, then the rest of generation_config.json's list.
    assert q3.eos_ids == (Q3_IM_END, Q3_ENDOFTEXT)
    assert q3.pad_id == Q3_ENDOFTEXT
    assert q3.vocab_size == 263


def test_eos_ids_read_generation_config(qwen3_tokenizer_dir, tmp_path):
    d = tmp_path / "q3"
    shutil.copytree(qwen3_tokenizer_dir, d)
    # An id that only generation_config.json names (</think>, as a made-up stop token).
    (d / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [Q3_IM_END, Q3_END_THINK]})
    )
    assert load_tokenizer(d).eos_ids == (Q3_IM_END, Q3_END_THINK, Q3_ENDOFTEXT)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": Q3_END_THINK}))
    assert load_tokenizer(d).eos_ids == (Q3_IM_END, Q3_END_THINK, Q3_ENDOFTEXT)
    # Without generation_config.json, the named end-of-turn tokens in the vocabulary still count.
    (d / "generation_config.json").unlink()
    assert load_tokenizer(d).eos_ids == (Q3_IM_END, Q3_ENDOFTEXT)
    (d / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json"):
        load_tokenizer(d)


def test_pad_id_falls_back_to_eos(qwen3_tokenizer_dir):
    hf = load_tokenizer(qwen3_tokenizer_dir).hf
    hf.pad_token = None
    assert HFTokenizer(hf).pad_id == Q3_IM_END


# --- encode / decode / offsets ----------------------------------------------------------------


def test_encode_adds_no_special_tokens_and_applies_merges(r1_tokenizer_dir):
    tok = load_tokenizer(r1_tokenizer_dir)
    assert tok.hf.encode("Hi") == [R1_BOS, ord("H"), ord("i")]  # what we must not do
    assert tok.encode("Hi") == [ord("H"), ord("i")]
    # "6", "*", "7", " =", " ", "42": the two merges apply, the pre-tokenizer splits " 42".
    assert tok.encode("6*7 = 42") == [ord("6"), ord("*"), ord("7"), 257, ord(" "), 256]


def test_decode_and_special_tokens(qwen3_tokenizer_dir):
    tok = load_tokenizer(qwen3_tokenizer_dir)
    text = "<think>\nso 6*7 = 42\n</think>\n\nThe answer is 42.<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == Q3_THINK and ids[-1] == Q3_IM_END
    assert tok.decode(ids) == text
    # <think>/</think> are not special tokens in the real Qwen3/R1 vocabularies; <|im_end|> is.
    assert tok.decode(ids, skip_special_tokens=True) == text.removesuffix("<|im_end|>")
    unicode_text = "∑ é 東京"
    assert tok.decode(tok.encode(unicode_text)) == unicode_text


def test_encode_offsets(r1_tokenizer_dir):
    tok = load_tokenizer(r1_tokenizer_dir)
    ids, offsets = tok.encode_offsets("6*7 = 42")
    assert ids == tok.encode("6*7 = 42")
    assert offsets == [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6), (6, 8)]

    prompt = render_chat_prompt(tok, "What is 6*7 = 42?")
    ids, offsets = tok.encode_offsets(prompt)
    assert ids == build_chat_prompt(tok, "What is 6*7 = 42?")
    # ASCII + added tokens: the spans tile the text and each span is exactly its token's text.
    assert offsets[0][0] == 0 and offsets[-1][1] == len(prompt)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert [prompt[s:e] for s, e in offsets] == [tok.decode([i]) for i in ids]
    assert prompt[slice(*offsets[ids.index(256)])] == "42"

    # A two-byte character is two byte-level tokens that both point at that character.
    ids, offsets = tok.encode_offsets("x=é")
    assert ids == [ord("x"), ord("="), 0xC3, 0xA9]
    assert offsets == [(0, 1), (1, 2), (2, 3), (2, 3)]


# --- the real SmolLM2 tokenizer (ChatML, no <think> token) ------------------------------------

SMOLLM2_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
)


def test_smollm2_tokenizer(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 49152
    assert not tok.has_think_token
    # <|im_end|> (eos_token, id 2) then <|endoftext|> (id 0); pad is <|im_end|>.
    assert tok.token_id("<|im_end|>") == 2 and tok.token_id("<|endoftext|>") == 0
    assert tok.eos_ids == (2, 0)
    assert tok.pad_id == 2

    # No <think> in the vocabulary: "auto" leaves the ChatML prompt (with its default system) alone.
    assert render_chat_prompt(tok, "What is 2 + 3?") == SMOLLM2_PROMPT
    assert render_chat_prompt(tok, "What is 2 + 3?", thinking="off") == SMOLLM2_PROMPT
    assert (
        render_chat_prompt(tok, "What is 2 + 3?", thinking="force") == SMOLLM2_PROMPT + "<think>\n"
    )
    assert render_chat_prompt(tok, "What is 2 + 3?", system="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )

    ids = build_chat_prompt(tok, "What is 2 + 3?")
    ref = tok.hf.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert ids == list(ref)
    assert ids[0] == tok.token_id("<|im_start|>") and ids.count(tok.token_id("<|im_end|>")) == 2
    assert tok.decode(ids) == SMOLLM2_PROMPT

    # Real merges: offsets still tile the text and reproduce each token's text.
    offset_ids, offsets = tok.encode_offsets(SMOLLM2_PROMPT)
    assert offset_ids == ids
    assert offsets[0][0] == 0 and offsets[-1][1] == len(SMOLLM2_PROMPT)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert [SMOLLM2_PROMPT[s:e] for s, e in offsets] == [tok.decode([i]) for i in ids]
