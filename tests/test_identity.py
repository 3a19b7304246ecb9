"""Invariant 4: fingerprints are stable, sensitive to one weight, and mismatches are exact;
decode modules that would tokenize differently are refused; servers take the launcher's
fingerprint instead of hashing the weights again; trained outputs carry the base's
chat template and generation config."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from pfs_sglang.identity import (
    FINGERPRINT_FILE_ENV,
    DecodeModuleRecord,
    DecodeModuleRecordError,
    check_compatible,
    fingerprint_of,
    server_fingerprint,
    token_sequence_of,
    write_decode_module_record,
    write_fingerprint_handoff,
)
from pfs_sglang.identity import fingerprint as fingerprint_module
from pfs_sglang.identity.token_sequence import chat_template_source
from pfs_sglang.models.demo import write_base_model, write_demo_models, write_perturbed_decode_module


def test_fingerprint_stable_across_runs_and_processes(demo_models):
    first = fingerprint_of(demo_models.base)
    assert fingerprint_of(demo_models.base) == first
    printed = subprocess.run(
        [sys.executable, "-m", "pfs_sglang.identity", "fingerprint", str(demo_models.base)],
        check=True, capture_output=True, text=True,
    ).stdout
    assert json.loads(printed)["digest"] == first.digest


def test_demo_models_are_deterministic(demo_models, tmp_path):
    rewritten = write_demo_models(tmp_path / "demo")
    assert fingerprint_of(rewritten.base) == fingerprint_of(demo_models.base)
    for name, path in rewritten.decode.items():
        assert fingerprint_of(path) == fingerprint_of(demo_models.decode[name])
    assert fingerprint_of(write_base_model(tmp_path / "a", seed=3)) == fingerprint_of(write_base_model(tmp_path / "b", seed=3))


def test_fingerprint_changes_when_one_weight_changes(demo_models, tmp_path):
    copy = shutil.copytree(demo_models.base, tmp_path / "base")
    weights = load_file(copy / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] += 1e-6
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    before, after = fingerprint_of(demo_models.base), fingerprint_of(copy)
    assert after.weights_hash != before.weights_hash
    assert after.digest != before.digest
    assert {k: v for k, v in after.to_dict().items() if k not in ("weights_hash", "digest")} == \
        {k: v for k, v in before.to_dict().items() if k not in ("weights_hash", "digest")}


def test_decode_modules_are_compatible_with_their_base(demo_models):
    base = fingerprint_of(demo_models.base)
    for path in demo_models.decode.values():
        assert check_compatible(base, DecodeModuleRecord.load(path)).ok


def test_foreign_base_is_refused_with_weights_reason(demo_models, tmp_path):
    retrained_base = write_perturbed_decode_module(demo_models.base, tmp_path / "retrained", seed=7)
    result = check_compatible(fingerprint_of(retrained_base), DecodeModuleRecord.load(demo_models.decode["extract"]))
    assert not result.ok
    assert "weights_hash differs: prefill module has" in result.reason
    assert "decode module was trained against" in result.reason


def test_kv_shape_mismatch_names_the_field(demo_models, tmp_path):
    decode = shutil.copytree(demo_models.decode["compute"], tmp_path / "compute")
    config = json.loads((decode / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (decode / "config.json").write_text(json.dumps(config))
    result = check_compatible(fingerprint_of(demo_models.base), DecodeModuleRecord.load(decode))
    assert result.reason == f"decode module {decode}: num_kv_heads differs: prefill module has 2, decode module has 4"


def test_tokenizer_mismatch_names_the_field(demo_models, tmp_path):
    decode = shutil.copytree(demo_models.decode["compute"], tmp_path / "compute")
    tokenizer = json.loads((decode / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzzz"] = tokenizer["model"]["vocab"].pop(next(iter(tokenizer["model"]["vocab"])))
    (decode / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = check_compatible(fingerprint_of(demo_models.base), DecodeModuleRecord.load(decode))
    assert "tokenizer_hash differs" in result.reason


def test_missing_or_edited_record_is_an_error(demo_models, tmp_path):
    with pytest.raises(DecodeModuleRecordError, match="has no prefillshare.json"):
        DecodeModuleRecord.load(demo_models.base)
    decode = shutil.copytree(demo_models.decode["transform"], tmp_path / "transform")
    record = json.loads((decode / "prefillshare.json").read_text())
    record["prefill_fingerprint"]["num_layers"] = 3
    (decode / "prefillshare.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not match its fields"):
        DecodeModuleRecord.load(decode)


def test_cli_check_exit_codes(demo_models, tmp_path):
    other = write_perturbed_decode_module(demo_models.base, tmp_path / "other", seed=9)
    retrained_base = write_perturbed_decode_module(demo_models.base, tmp_path / "retrained", seed=5)
    write_decode_module_record(other, fingerprint_of(retrained_base))
    ok = subprocess.run([sys.executable, "-m", "pfs_sglang.identity", "check",
                         str(demo_models.base), str(demo_models.decode["extract"])], capture_output=True, text=True)
    bad = subprocess.run([sys.executable, "-m", "pfs_sglang.identity", "check",
                          str(demo_models.base), str(other)], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout.strip()) == (0, "compatible")
    assert bad.returncode == 1 and "weights_hash differs" in bad.stdout


def test_token_sequence_matches_for_the_demo_models(demo_models):
    base, tokens = fingerprint_of(demo_models.base), token_sequence_of(demo_models.base)
    assert tokens["chat_template"].startswith("sha256:") and "<|end|>" in tokens["special_tokens"]
    for path in demo_models.decode.values():
        record = DecodeModuleRecord.load(path)
        assert record.token_sequence == tokens
        assert check_compatible(base, record, tokens).ok


def test_chat_template_file_wins_and_a_different_one_is_refused(demo_models, tmp_path):
    decode = shutil.copytree(demo_models.decode["compute"], tmp_path / "compute")
    base_fp, base_tokens = fingerprint_of(demo_models.base), token_sequence_of(demo_models.base)
    template, source = chat_template_source(decode)
    assert source == "tokenizer_config.json"
    (decode / "chat_template.jinja").write_text(template)  # the same template, from transformers' newer file
    assert chat_template_source(decode)[1] == "chat_template.jinja"
    assert check_compatible(base_fp, DecodeModuleRecord.load(decode), base_tokens).ok
    (decode / "chat_template.jinja").write_text(template.replace("<|assistant|>", "<|bot|>"))
    result = check_compatible(base_fp, DecodeModuleRecord.load(decode), base_tokens)
    assert not result.ok and f"decode module {decode}: chat_template differs: prefill module has 'sha256:" in result.reason
    assert check_compatible(base_fp, DecodeModuleRecord.load(decode)).ok  # the KV hand-off's check: KV only


def test_trained_with_another_template_is_refused(demo_models, tmp_path):
    decode = shutil.copytree(demo_models.decode["extract"], tmp_path / "extract")
    recorded = {**token_sequence_of(demo_models.base), "chat_template": "sha256:0000000000000000"}
    write_decode_module_record(decode, fingerprint_of(demo_models.base), {"prefill_token_sequence": recorded})
    result = check_compatible(fingerprint_of(demo_models.base), DecodeModuleRecord.load(decode),
                              token_sequence_of(demo_models.base))
    assert "chat_template differs" in result.reason and "decode module was trained with 'sha256:0000" in result.reason


def test_cli_check_refuses_a_different_generation_config(demo_models, tmp_path):
    decode = shutil.copytree(demo_models.decode["extract"], tmp_path / "extract")
    config = json.loads((decode / "generation_config.json").read_text())
    config["eos_token_id"] = 3
    (decode / "generation_config.json").write_text(json.dumps(config))
    bad = subprocess.run([sys.executable, "-m", "pfs_sglang.identity", "check", str(demo_models.base), str(decode)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "stop_token_ids differs" in bad.stdout


def count_weight_hashes(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = fingerprint_module.weights_hash

    def counting(model_dir):
        calls.append(str(model_dir))
        return original(model_dir)

    monkeypatch.setattr(fingerprint_module, "weights_hash", counting)
    return calls


def test_servers_take_the_launchers_fingerprint_when_the_files_are_unchanged(demo_models, tmp_path, monkeypatch,
                                                                              caplog):
    base = shutil.copytree(demo_models.base, tmp_path / "base")
    expected = fingerprint_of(base)
    record = write_fingerprint_handoff(base, expected, tmp_path / "handoff.json")
    calls = count_weight_hashes(monkeypatch)
    caplog.set_level(logging.INFO, logger="pfs_sglang.identity.handoff")
    monkeypatch.delenv(FINGERPRINT_FILE_ENV, raising=False)
    assert server_fingerprint(base) == expected and len(calls) == 1  # started by hand: hashes itself
    monkeypatch.setenv(FINGERPRINT_FILE_ENV, str(record))
    assert server_fingerprint(base) == expected and len(calls) == 1  # from the launcher: no hash
    assert "taken from the launcher's record" in caplog.text
    assert server_fingerprint(demo_models.base) == expected and len(calls) == 2  # another directory
    weights = base / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert server_fingerprint(base) == expected and len(calls) == 3  # touched since: hashed again
    assert "changed size or mtime" in caplog.text


def test_trainer_outputs_carry_the_bases_template_and_generation_config(demo_models, tmp_path):
    from pfs_sglang.train.trainer import FinetuneConfig, finetune

    base = shutil.copytree(demo_models.base, tmp_path / "base")
    template, _ = chat_template_source(base)
    (base / "chat_template.jinja").write_text(template.replace("<|end|>\n", "<|end|>"))
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.7}))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {word}"},
                                                     {"role": "assistant", "content": word}]}) + "\n"
                            for word in ("oslo", "lima", "rome", "kyiv")))
    out = tmp_path / "decode"
    finetune(FinetuneConfig(base=base, data=data, out_dir=out, max_steps=1, batch_size=4, save_steps=100))
    for name in ("chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    record = DecodeModuleRecord.load(out)
    assert record.trained_token_sequence == token_sequence_of(base) == record.token_sequence
    assert check_compatible(fingerprint_of(base), record, token_sequence_of(base)).ok
    assert not check_compatible(fingerprint_of(base), record, token_sequence_of(demo_models.base)).ok
