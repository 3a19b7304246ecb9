"""Training and evaluation data: JSONL rows to tokenized (prompt, completion) examples.

A row is either chat ``{"messages": [{"role", "content"}, ...]}``, whose last message
is the assistant's reply (the completion) and whose earlier messages are rendered with
the base's chat template plus the generation prompt (the prompt), or raw text
``{"prompt": str, "completion": str}``, encoded as is. Either way the completion ends
with the end-of-turn token, as served generation does. Every prompt holds at least two
tokens, because the prefill module computes the KV of all but the last (invariant 2).
A malformed row is an error that names its file and line number.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset row that cannot be used, with its file and line number."""


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with the end-of-turn token
    answer: str  # the completion text, for exact-match evaluation


def _check_message(message: Any, index: int) -> None:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
            or not isinstance(message.get("content"), str):
        raise ValueError(f"message {index} must be an object with string 'role' and 'content'")


def _prompt_and_answer(row: Any, tokenizer) -> tuple[str, str]:
    """Split one parsed row into prompt text and completion text (ValueError if malformed)."""
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError("'messages' must be a list of at least two messages")
        for index, message in enumerate(messages):
            _check_message(message, index)
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's reply (the completion)")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return prompt, messages[-1]["content"]
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"], row["completion"]
    raise ValueError("a row needs 'messages', or string 'prompt' and 'completion'")


def encode_row(row: Any, tokenizer) -> Example:
    prompt, answer = _prompt_and_answer(row, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) < 2:
        raise ValueError("the prompt must hold at least two tokens (the base prefills all but the last)")
    return Example(prompt_ids=prompt_ids, completion_ids=completion_ids, answer=answer)


def load_examples(path: str | Path, tokenizer, max_length: int | None = None) -> list[Example]:
    """Read and tokenize a JSONL file; rows longer than ``max_length`` tokens are dropped."""
    path = Path(path)
    examples, too_long = [], 0
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                example = encode_row(json.loads(line), tokenizer)
            except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
                raise DatasetError(f"{path}:{line_number}: {error}") from error
            if max_length is not None and len(example.prompt_ids) + len(example.completion_ids) > max_length:
                too_long += 1
                continue
            examples.append(example)
    if too_long:
        logger.warning("%s: dropped %d rows longer than %d tokens", path, too_long, max_length)
    if not examples:
        raise DatasetError(f"{path}: no usable rows")
    return examples
