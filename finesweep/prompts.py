"""Prompt rendering shared by the trainer and the evaluator, so a model is scored on the prompts it was
trained with. A conversation is a list of {"role", "content"} messages ending with a user turn."""

from __future__ import annotations

from typing import Any

INSTRUCTION_HEADER = "### Instruction:\n"
RESPONSE_HEADER = "### Response:\n"

# TinyLlama-1.1B-Chat-v1.0's chat_template, exactly as its tokenizer_config.json stores it (Zephyr style; see
# ../shared/reference/tinyllama-tokenizer.md). transformers compiles templates with trim_blocks and
# lstrip_blocks, so the newlines between the Jinja tags vanish and each turn renders as
# "<|role|>\n{content}</s>\n"; the generation prompt is "<|assistant|>\n". The tiny test model ships this string.
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


def user_turn(instruction: str, context: str = "") -> list[dict[str, str]]:
    content = instruction.strip()
    if context and context.strip():
        content = f"{content}\n\n{context.strip()}"
    return [{"role": "user", "content": content}]


def render_prompt(tokenizer: Any, prompt_format: str, messages: list[dict[str, str]]) -> str:
    """The text a model sees before its answer."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user message")
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; "
                             "use prompt_format: instruction for base models")
        # Exactly what apply_chat_template renders: the model's own template decides how a prompt ends.
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prompt_format == "instruction":
        history = messages[:-1]
        text = INSTRUCTION_HEADER
        if history:
            turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in history]
            text += "\n".join(turns) + "\nUser: "
        return f"{text}{messages[-1]['content']}\n\n{RESPONSE_HEADER}"
    raise ValueError(f"unknown prompt_format {prompt_format!r}")
