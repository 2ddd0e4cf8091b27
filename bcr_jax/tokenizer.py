"""One tokenizer protocol over Hugging Face tokenizers, plus chat prompts with thinking prefixes.

The sampler, the BCR task layer and GRPO only need a handful of things from a tokenizer: plain
encode/decode without special tokens sprinkled in, the set of ids that end a response, a pad id, and
per-token character offsets (the BCR layer maps each packed problem's answer span, in characters, to
the tokens that produced it). `Tokenizer` is that protocol; `HFTokenizer` implements it on top of
`transformers.AutoTokenizer` for a local checkpoint directory (or a hub name on a machine that can
reach the hub).

Chat prompts always come from the checkpoint's own chat template (`add_generation_prompt=True`),
followed by the *thinking-prefix* convention of the reasoning models we train: the response must
start inside a `<think>\\n` block. Whether the template already renders that prefix depends on the
revision of the checkpoint:

* DeepSeek-R1-Distill-Qwen-1.5B (and JustRL-DeepSeek-1.5B, a fine-tune that keeps its tokenizer).
  The original release (Jan 2025) ends the template with
  `{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}`; DeepSeek
  updated the tokenizer_config.json of every R1-Distill checkpoint in Feb 2025 to emit
  `{{'<｜Assistant｜><think>\\n'}}` instead (hub commits such as 6602cade… on the 7B and 3865e12a…
  on the 32B, discussed in deepseek-ai/DeepSeek-R1 issue #352). For one user message `Q` without a
  system prompt the generation prompt is therefore
  `<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜>` (old) or
  `<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>\\n` (new); a system prompt `S` is
  rendered right after the BOS token with no separator: `<｜begin▁of▁sentence｜>S<｜User｜>Q...`.
* Qwen3-4B-Thinking-2507 ends its template with
  `{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}`, i.e.
  `<|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\n<think>\\n` (with a system prompt first
  as `<|im_start|>system\\nS<|im_end|>\\n`). Templates without the suffix end with
  `<|im_start|>assistant\\n`: the hybrid Qwen3 template (Qwen3-4B before the 2507 split), which
  renders `<think>\\n\\n</think>\\n\\n` after it when called with `enable_thinking=False`, and
  copies of the Thinking template with the suffix edited out (a common serving workaround for
  front-ends that expect to see `<think>` in the output).

Policy (`thinking=`):

* `"auto"` (default): append `<think>\\n` iff the vocabulary has a `<think>` token and the rendered
  prompt does not already end with `<think>\\n` (if it ends with `<think>`, only the newline is
  added). Both template revisions above thus give the same prompt; ChatML models without `<think>`
  (SmolLM2) are left alone.
* `"force"`: ensure the prompt ends with `<think>\\n` even if `<think>` is not a single token. A
  prefix that the template already rendered is not doubled.
* `"off"`: never append. Templates that take `enable_thinking` (hybrid Qwen3) get
  `enable_thinking=False`. A prefix the template renders unconditionally (R1-Distill new, Qwen3
  Thinking-2507) is kept: those checkpoints have no non-thinking mode to switch to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

ThinkingMode = Literal["auto", "force", "off"]
THINKING_MODES: tuple[str, ...] = ("auto", "force", "off")

THINK_TOKEN = "<think>"
THINK_PREFIX = "<think>\n"

# Tokens that end an assistant turn in the model families we use, whatever the tokenizer's
# `eos_token` says: ChatML end of turn (Qwen, SmolLM2), end of document (Qwen, SmolLM2), and
# DeepSeek's end of sentence. Only those present in the vocabulary are used.
EXTRA_EOS_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of bcr_jax needs from a tokenizer."""

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """All ids that end a response (first: the tokenizer's own eos token, if it has one)."""
        ...

    @property
    def pad_id(self) -> int:
        """The pad token id, else the first eos id."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS or any other special token added."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        ...


def _as_int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _generation_config_eos_ids(path: str | os.PathLike[str] | None) -> list[int]:
    """`eos_token_id` (int or list) of `path`'s generation_config.json, if there is one."""
    if path is None:
        return []
    local = Path(path).expanduser()
    if local.is_dir():
        config_file = local / "generation_config.json"
        if not config_file.is_file():
            return []
        try:
            config = json.loads(config_file.read_text())
        except ValueError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        return _as_int_list(config.get("eos_token_id"))
    # A hub name: let transformers fetch it (it is optional, so a missing file is not an error).
    from transformers import GenerationConfig

    try:
        return _as_int_list(GenerationConfig.from_pretrained(str(path)).eos_token_id)
    except OSError:
        return []


class HFTokenizer:
    """`Tokenizer` over a Hugging Face (fast) tokenizer.

    Attributes:
      hf: the wrapped `transformers` tokenizer, for anything not covered here.
      path: where it was loaded from (None if built from a tokenizer object).
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        path: str | os.PathLike[str] | None = None,
        extra_eos_ids: Sequence[int] = (),
    ) -> None:
        self.hf = hf_tokenizer
        self.path = None if path is None else str(path)
        self._vocab: dict[str, int] = dict(hf_tokenizer.get_vocab())

        eos: list[int] = []
        if hf_tokenizer.eos_token_id is not None:
            eos.append(int(hf_tokenizer.eos_token_id))
        eos.extend(int(i) for i in extra_eos_ids)
        eos.extend(self._vocab[t] for t in EXTRA_EOS_TOKENS if t in self._vocab)
        self._eos_ids = tuple(dict.fromkeys(eos))  # dedupe, keep order
        if not self._eos_ids:
            raise ValueError(
                f"tokenizer {self.path or type(hf_tokenizer).__name__} has no eos_token and none "
                f"of {EXTRA_EOS_TOKENS} in its vocabulary; set eos_token in tokenizer_config.json"
            )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> HFTokenizer:
        """Loads `path` with `AutoTokenizer.from_pretrained(path, **kwargs)`.

        The eos ids also include `eos_token_id` from `path`'s generation_config.json when present
        (Qwen3 lists both `<|im_end|>` and `<|endoftext|>` there).
        """
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        return cls(hf_tokenizer, path=path, extra_eos_ids=_generation_config_eos_ids(path))

    # --- Tokenizer protocol -------------------------------------------------------------------

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def pad_id(self) -> int:
        pad = self.hf.pad_token_id
        return int(pad) if pad is not None else self._eos_ids[0]

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(
            [int(i) for i in ids],
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    # --- Extras -------------------------------------------------------------------------------

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and, per token, its `(start, end)` character span in `text`.

        Special tokens written out in `text` (e.g. a rendered chat prompt) map to their own span.
        For byte-level BPE a multi-byte character split over several tokens gives each of those
        tokens the span of the whole character.
        """
        if not getattr(self.hf, "is_fast", False):
            raise TypeError(
                f"encode_offsets needs a fast (tokenizers-backed) tokenizer; {self.path} loaded "
                f"as {type(self.hf).__name__}"
            )
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]

    def token_id(self, token: str) -> int | None:
        """Id of `token` if it is a single entry of the vocabulary, else None."""
        return self._vocab.get(token)

    @property
    def has_think_token(self) -> bool:
        return THINK_TOKEN in self._vocab

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None) or None

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path or type(self.hf).__name__}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike[str], **kwargs: Any) -> HFTokenizer:
    """`HFTokenizer` for a checkpoint directory (or hub name); kwargs go to AutoTokenizer."""
    return HFTokenizer.from_pretrained(path, **kwargs)


def _as_hf_tokenizer(tokenizer: HFTokenizer | Any) -> HFTokenizer:
    return tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer)


def render_chat_prompt(
    tokenizer: HFTokenizer | Any,
    user_message: str,
    *,
    system: str | None = None,
    thinking: ThinkingMode | str = "auto",
) -> str:
    """The generation prompt for one user turn: chat template + thinking prefix (module docstring).

    Args:
      tokenizer: an `HFTokenizer` (or a bare transformers tokenizer) with a chat template.
      user_message: the user turn.
      system: optional system message (rendered as the template renders system messages; templates
        with a default system prompt, like SmolLM2's, use theirs when this is None).
      thinking: "auto", "force" or "off".
    """
    if thinking not in THINKING_MODES:
        raise ValueError(f"thinking must be one of {THINKING_MODES}, got {thinking!r}")
    if hasattr(tokenizer, "render_chat"):  # a tokenizer with its own template (CharTokenizer)
        return tokenizer.render_chat(user_message, system=system, thinking=thinking)
    tok = _as_hf_tokenizer(tokenizer)
    template = tok.chat_template
    if not template:
        raise ValueError(
            f"tokenizer {tok.path or tok.hf.name_or_path!r} has no chat template "
            "(chat_template in tokenizer_config.json or chat_template.jinja)"
        )

    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user_message})
    template_kwargs: dict[str, Any] = {}
    if thinking == "off" and "enable_thinking" in template:
        # Hybrid Qwen3 templates: render their own empty think block instead of a thinking turn.
        template_kwargs["enable_thinking"] = False
    text = tok.hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")

    if thinking == "off" or (thinking == "auto" and not tok.has_think_token):
        return text
    if text.endswith(THINK_PREFIX):
        return text
    if text.endswith(THINK_TOKEN):
        return text + "\n"
    return text + THINK_PREFIX


def build_chat_prompt(
    tokenizer: HFTokenizer | Any,
    user_message: str,
    *,
    system: str | None = None,
    thinking: ThinkingMode | str = "auto",
) -> list[int]:
    """Token ids of `render_chat_prompt(...)`.

    The rendered text already contains the template's BOS/role tokens, so it is encoded without
    adding special tokens (as `apply_chat_template(tokenize=True)` does).
    """
    tok = tokenizer if hasattr(tokenizer, "render_chat") else _as_hf_tokenizer(tokenizer)
    return tok.encode(render_chat_prompt(tok, user_message, system=system, thinking=thinking))


class CharTokenizer:
    """A character-level `Tokenizer` with optional whole-word tokens, for toy worlds and tests (no files needed).

    Ids: 0 = `<pad>`, 1 = `<eos>`, then `words` in the given order, then `characters`. Encoding is greedy: at each
    position the longest word that matches wins, else the single character; a character outside the alphabet is
    an error naming it. The chat "template" is the user message followed by `generation_prompt`.
    """

    PAD, EOS = "<pad>", "<eos>"

    def __init__(self, characters: str, words: Sequence[str] = (), *, generation_prompt: str = "\n"):
        if len(set(characters)) != len(characters):
            raise ValueError("CharTokenizer: characters contain duplicates")
        words = tuple(words)
        if len(set(words)) != len(words) or any(not w for w in words):
            raise ValueError("CharTokenizer: words must be distinct and non-empty")
        self.characters, self.words, self.generation_prompt = characters, words, generation_prompt
        self._pieces = (self.PAD, self.EOS, *words, *characters)
        self._ids = {piece: i for i, piece in enumerate(self._pieces) if i >= 2}
        self._words_longest_first = sorted(words, key=len, reverse=True)
        for char in generation_prompt:
            if char not in self._ids:
                raise ValueError(f"CharTokenizer: generation_prompt character {char!r} is not in the alphabet")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (1,)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets, position = [], [], 0
        while position < len(text):
            piece = next((w for w in self._words_longest_first if text.startswith(w, position)), text[position])
            if piece not in self._ids:
                raise ValueError(f"CharTokenizer: character {piece!r} at position {position} is not in the alphabet")
            ids.append(self._ids[piece])
            offsets.append((position, position + len(piece)))
            position += len(piece)
        return ids, offsets

    def encode(self, text: str) -> list[int]:
        return self.encode_offsets(text)[0]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        pieces = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._pieces):
                pieces.append("" if skip_special_tokens else "<unk>")  # a model whose vocab exceeds ours
            elif i < 2:
                pieces.append("" if skip_special_tokens else self._pieces[i])
            else:
                pieces.append(self._pieces[i])
        return "".join(pieces)

    def render_chat(self, user_message: str, *, system: str | None = None, thinking: str = "auto") -> str:
        del thinking  # no thinking mode
        return ("" if system is None else system + "\n") + user_message + self.generation_prompt

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, words={len(self.words)})"
