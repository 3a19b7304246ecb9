"""Foundation: stock SGLang serves the demo models on CPU, and greedy output is exact.

Invariant 5 at its simplest: with no disaggregation, SGLang's greedy tokens for a
model equal transformers' greedy generation of the same model (float32, CPU).
"""

from __future__ import annotations

import pytest
import requests

from pfs_sglang.oracle import load_tokenizer, prefillshare_greedy

PROMPTS = ["the record of city", "What is the total price of order 42?", "a"]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def served_model(demo_models, stock_base):
    """The base only (the session's stock server): the decode modules share its
    architecture, and the PD oracle tests check them end to end."""
    return demo_models.base, stock_base


def test_generate_greedy_equals_transformers(served_model):
    path, url = served_model
    tokenizer = load_tokenizer(str(path))
    for prompt in PROMPTS:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        reply = requests.post(f"{url}/generate", json={
            "input_ids": prompt_ids,
            "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "ignore_eos": True},
        }, timeout=60)
        reply.raise_for_status()
        reference = prefillshare_greedy(path, path, prompt_ids, MAX_NEW_TOKENS)
        assert reply.json()["output_ids"] == reference.output_ids, prompt


def test_chat_completion_greedy_equals_transformers(served_model):
    path, url = served_model
    tokenizer = load_tokenizer(str(path))
    messages = [{"role": "user", "content": "list the records of city 7"}]
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    reply = requests.post(f"{url}/v1/chat/completions", json={
        "model": "default", "messages": messages, "max_tokens": MAX_NEW_TOKENS,
        "temperature": 0, "ignore_eos": True,
    }, timeout=60)
    reply.raise_for_status()
    body = reply.json()
    reference = prefillshare_greedy(path, path, prompt_ids, MAX_NEW_TOKENS)
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == len(reference.output_ids)
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(reference.output_ids)
