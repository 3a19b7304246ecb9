"""The embedded LoRA decode modules of the demo tasks (``assets/lora-<task>``), without a server.

Each is a PEFT adapter of the embedded demo base, on SGLang's LoRA targets for Llama
only; it loads onto the base, records the base's fingerprint (the launcher's identity
check accepts it against that base and refuses it against another), and answers the
README's question about its task with the greedy oracle of invariant 5: the base
computes the KV of ``prompt[:-1]``, base + adapter continues from ``prompt[-1]``.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pfs_sglang.identity import DecodeModuleRecord, check_compatible, fingerprint_of, token_sequence_of
from pfs_sglang.models.demo import (
    ASSETS,
    DEMO_DECODE_MODULES,
    DEMO_LORA_DECODE_MODULES,
    DemoModels,
    write_demo_lora_adapters,
    write_perturbed_decode_module,
)
from pfs_sglang.oracle import load_tokenizer, prefillshare_greedy

# SGLang's LoRA targets of a Llama decoder layer (no lm_head / embed_tokens adapters).
SGLANG_LLAMA_LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
REPO = Path(__file__).resolve().parents[1]

# The README's records (the OpenAI-client example, make demo's) and questions: task -> (question, answer).
README_QUESTIONS = {
    "name: tom; city: oslo; color: red; qty: 3; price: 7; size: 5": {
        "extract": ("What is the city?", "oslo"),
        "compute": ("What is qty plus price?", "10"),
        "transform": ("Write the name in upper case.", "TOM"),
    },
    "name: ana; city: oslo; color: green; qty: 3; price: 5; size: 2": {
        "extract": ("What is the city?", "oslo"),
        "compute": ("What is qty plus price?", "8"),
        "transform": ("Write the name in upper case.", "ANA"),
    },
}


@pytest.fixture(scope="module")
def lora_demo(tmp_path_factory) -> DemoModels:
    return write_demo_lora_adapters(tmp_path_factory.mktemp("demo_lora"))


def answer(base: Path, decode: Path, record: str, question: str) -> str:
    """Greedy reply (up to 8 tokens) of ``decode`` over the base's KV of the chat prompt."""
    tokenizer = load_tokenizer(str(base))
    messages = [{"role": "user", "content": f"{record}\n{question}"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    output = prefillshare_greedy(base, decode, prompt_ids, max_new_tokens=8, stop_token_ids=(tokenizer.eos_token_id,))
    return tokenizer.decode(output.output_ids, skip_special_tokens=True).strip()


def test_embedded_adapters_are_small_lora_on_sglang_targets_and_packaged():
    assert tuple(DEMO_LORA_DECODE_MODULES) == DEMO_DECODE_MODULES
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = package_data["pfs_sglang.models"]
    for name, dir_name in DEMO_LORA_DECODE_MODULES.items():
        adapter = ASSETS / dir_name
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"]) == (16, 32)
        assert set(config["target_modules"]) <= SGLANG_LLAMA_LORA_TARGETS, config["target_modules"]
        assert not config.get("modules_to_save") and not config.get("trainable_token_indices")
        with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
            keys = list(weights.keys())
        assert keys and all(".lora_A." in key or ".lora_B." in key for key in keys), keys
        assert not any("lm_head" in key or "embed_tokens" in key for key in keys)
        files = [path for path in adapter.rglob("*") if path.is_file()]
        assert sum(path.stat().st_size for path in files) < 1_000_000, name
        for path in files:  # every file ships as package data
            relative = path.relative_to(ASSETS.parent).as_posix()
            assert any(fnmatch.fnmatch(relative, glob) for glob in globs), relative


def test_adapters_load_onto_the_base_and_record_its_fingerprint(lora_demo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_fingerprint = fingerprint_of(lora_demo.base)
    assert base_fingerprint == fingerprint_of(ASSETS / "base")
    foreign = fingerprint_of(write_perturbed_decode_module(lora_demo.base, tmp_path / "foreign", seed=5))
    assert set(lora_demo.decode) == set(DEMO_LORA_DECODE_MODULES)
    for name, adapter in lora_demo.decode.items():
        assert adapter == lora_demo.base.parent / f"lora-{name}"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]) == lora_demo.base
        base = AutoModelForCausalLM.from_pretrained(lora_demo.base, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapter)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)  # trained, not PEFT's zero init
        record = DecodeModuleRecord.load(adapter)
        assert json.loads((adapter / "prefillshare.json").read_text())["mode"] == "lora"
        compatible = check_compatible(base_fingerprint, record, token_sequence_of(lora_demo.base))
        assert compatible, compatible.reason
        refused = check_compatible(foreign, record)
        assert not refused and "weights_hash" in refused.reason


@pytest.mark.parametrize("record", list(README_QUESTIONS))
def test_each_adapter_answers_the_readme_question_over_the_base_kv(lora_demo, record):
    for name, (question, expected) in README_QUESTIONS[record].items():
        assert answer(lora_demo.base, lora_demo.decode[name], record, question) == expected, name
        # The untuned base answers otherwise (so the answer above is the adapter's).
        assert answer(lora_demo.base, lora_demo.base, record, question) != expected, name


def test_adapters_written_beside_the_full_demo_models(tmp_path):
    from pfs_sglang.models.__main__ import main

    main(["demo", str(tmp_path / "demo"), "--lora"])
    root = tmp_path / "demo"
    assert {path.name for path in root.iterdir()} >= {"base", *DEMO_DECODE_MODULES,
                                                       *DEMO_LORA_DECODE_MODULES.values()}
    for dir_name in DEMO_LORA_DECODE_MODULES.values():
        config = json.loads((root / dir_name / "adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]) == (root / "base").resolve()


def test_oracle_reads_an_embedded_adapter_in_place():
    # The embedded adapters name their sibling ``../base``, read from the adapter's dir.
    record = next(iter(README_QUESTIONS))
    question, expected = README_QUESTIONS[record]["compute"]
    assert answer(ASSETS / "base", ASSETS / DEMO_LORA_DECODE_MODULES["compute"], record, question) == expected
