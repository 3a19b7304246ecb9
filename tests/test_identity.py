"""Invariant 4: fingerprints are stable, sensitive to one weight, and mismatches are exact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from pfs_sglang.identity import (
    DecodeModuleRecord,
    DecodeModuleRecordError,
    check_compatible,
    fingerprint_of,
    write_decode_module_record,
)
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
