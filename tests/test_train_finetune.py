"""pfs_sglang.train end to end on tiny runs: loss falls, outputs load, identity checks pass.

Also: a decode module trained here beats the base on its task, and the embedded demo
decode modules (the replication's) each do their own task over the shared record.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pfs_sglang.identity import DecodeModuleRecord, DecodeModuleRecordError, check_compatible, fingerprint_of
from pfs_sglang.train.collate import collate_split
from pfs_sglang.models import DEMO_DECODE_MODULES
from pfs_sglang.train.corpus import CorpusSizes, write_corpus
from pfs_sglang.train.data import load_examples
from pfs_sglang.train.evaluate import exact_match, load_model
from pfs_sglang.train.objective import cache_conditioned_logits, completion_loss
from pfs_sglang.train.__main__ import FULL_LR, main
from pfs_sglang.train.trainer import LORA_RECIPE, LORA_TARGETS, FinetuneConfig, FinetuneResult, finetune

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=7, sizes=CorpusSizes(16, 2000, 40))


def tiny_config(demo_models, corpus, out_dir, **overrides) -> FinetuneConfig:
    settings = dict(base=demo_models.base, data=corpus.train["extract"], out_dir=out_dir, max_steps=4,
                    batch_size=8, learning_rate=1e-3, logging_steps=1, save_steps=100)
    return FinetuneConfig(**{**settings, **overrides})


def held_out_loss(base_dir, model_dir, data) -> float:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = collate_split(load_examples(data, tokenizer)[:32], tokenizer.pad_token_id)
    with torch.no_grad():
        return completion_loss(cache_conditioned_logits(load_model(base_dir), load_model(model_dir), batch),
                               batch.target_ids).item()


@pytest.mark.slow  # 300 training steps (~12 s of CPU)
def test_loss_falls_and_a_trained_decode_module_beats_the_base(demo_models, corpus, tmp_path):
    out = tmp_path / "extract"
    finetune(tiny_config(demo_models, corpus, out, max_steps=300, batch_size=32, learning_rate=3e-3))
    before = held_out_loss(demo_models.base, demo_models.base, corpus.test["extract"])
    after = held_out_loss(demo_models.base, out, corpus.test["extract"])
    assert after < 0.5 * before
    trained = exact_match(out, corpus.test["extract"], prefill_dir=demo_models.base)
    untuned = exact_match(demo_models.base, corpus.test["extract"])
    assert trained.accuracy >= untuned.accuracy + 0.25, trained.mistakes


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_outputs_load_and_pass_the_identity_check(demo_models, corpus, tmp_path, mode):
    out = tmp_path / mode
    result = finetune(tiny_config(demo_models, corpus, out, mode=mode, max_steps=2))
    assert result.steps == 2
    record = DecodeModuleRecord.load(out)
    assert check_compatible(fingerprint_of(demo_models.base), record).ok
    assert json.loads((out / "prefillshare.json").read_text())["mode"] == mode
    assert (out / ("adapter_config.json" if mode == "lora" else "model.safetensors")).is_file()
    model = load_model(out)
    assert model.config.num_key_value_heads == load_model(demo_models.base).config.num_key_value_heads
    if mode == "lora":
        base_weight = load_model(demo_models.base).model.layers[0].self_attn.q_proj.weight
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base_weight)


def test_own_kv_output_is_not_a_decode_module(demo_models, corpus, tmp_path):
    out = tmp_path / "full_ft"
    finetune(tiny_config(demo_models, corpus, out, objective="own-kv", max_steps=1))
    with pytest.raises(DecodeModuleRecordError, match="not a decode module"):
        DecodeModuleRecord.load(out)


def test_checkpoints_and_resume(demo_models, corpus, tmp_path):
    out = tmp_path / "resumed"
    finetune(tiny_config(demo_models, corpus, out, max_steps=4, save_steps=2))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    resumed = finetune(tiny_config(demo_models, corpus, out, max_steps=6, save_steps=2, resume=True))
    assert resumed.steps == 6
    assert check_compatible(fingerprint_of(demo_models.base), DecodeModuleRecord.load(out)).ok


def test_embedded_demo_decode_modules_do_their_own_tasks(demo_models, corpus):
    for task in DEMO_DECODE_MODULES:
        own = exact_match(demo_models.decode[task], corpus.test[task], prefill_dir=demo_models.base)
        assert own.accuracy >= 0.5, (task, own.mistakes)
        for other in set(DEMO_DECODE_MODULES) - {task}:
            assert exact_match(demo_models.decode[other], corpus.test[task],
                               prefill_dir=demo_models.base).accuracy < 0.2


def test_lora_runs_of_one_seed_are_equal_whatever_ran_before(demo_models, corpus, tmp_path):
    """The adapter's A matrices are drawn from the seed, not from whatever the process drew before."""
    first = tmp_path / "first"
    finetune(tiny_config(demo_models, corpus, first, mode="lora", max_steps=1))
    torch.rand(1000)  # another run, or anything else, drawing from the global generator
    second = tmp_path / "second"
    finetune(tiny_config(demo_models, corpus, second, mode="lora", max_steps=1))
    weights = [load_file(path / "adapter_model.safetensors") for path in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_cli_lora_mode_defaults_to_the_recipe(monkeypatch, tmp_path):
    seen = {}

    def record(config):
        seen["config"] = config
        return FinetuneResult(config.out_dir, 0, 0.0)

    monkeypatch.setattr("pfs_sglang.train.trainer.finetune", record)
    for mode, lr in (("lora", LORA_RECIPE.learning_rate), ("full", FULL_LR)):
        main(["--base", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / mode),
              "--mode", mode])
        config = seen.pop("config")
        assert config.learning_rate == lr
        assert (config.lora_rank, config.lora_alpha, config.lora_targets) == \
            (LORA_RECIPE.rank, LORA_RECIPE.alpha, LORA_TARGETS)


def test_lm_head_is_a_lora_target_when_asked(demo_models, corpus, tmp_path):
    out = tmp_path / "head"
    finetune(tiny_config(demo_models, corpus, out, mode="lora", max_steps=1, lora_targets=LORA_RECIPE.targets))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(LORA_RECIPE.targets) and "lm_head" in adapter["target_modules"]
    assert any("lm_head.lora_B" in name for name in load_file(out / "adapter_model.safetensors"))
