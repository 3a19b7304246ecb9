"""What the launcher refuses before any server starts, each with its reason: speculative
decoding, a decode radix cache other than the ``pfs`` tree (and the decode cache on paths
not tested with it), hybrid SWA / Mamba / linear-attention
architectures, pools that disagree on page size, KV dtype or chat template, placement
flags smuggled into pass-through arguments, and decode modules that would tokenize a
request differently from the prefill module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import psutil
import pytest

from pfs_sglang.launch import Deployment, LaunchError
from pfs_sglang.launch.cli import build_parser, topology_from_args
from pfs_sglang.launch.guards import _hybrid_reason
from pfs_sglang.launch.processes import ManagedProcess, free_port
from pfs_sglang.models.demo import write_perturbed_decode_module


@pytest.fixture(autouse=True)
def no_server_may_start(monkeypatch):
    def refuse(self):
        raise AssertionError(f"{self.name} was started")

    monkeypatch.setattr(ManagedProcess, "start", refuse)


def launch(demo_models, tmp_path, *flags: str, decode: dict | None = None) -> Deployment:
    """The launcher's own path (flags -> topology -> Deployment.start) up to the first server."""
    decode = decode or {"extract": demo_models.decode["extract"], "compute": demo_models.decode["compute"]}
    argv = ["--base-model", str(demo_models.base), "--port", str(free_port()), "--log-dir", str(tmp_path / "logs"),
            *(f"--decode-model={name}={path}" for name, path in decode.items()), *flags]
    deployment = Deployment(topology_from_args(build_parser().parse_args(argv)))
    deployment.start()
    return deployment


def refused(demo_models, tmp_path, *flags: str, decode: dict | None = None) -> str:
    with pytest.raises(LaunchError) as error:
        launch(demo_models, tmp_path, *flags, decode=decode)
    assert not list((tmp_path / "logs").glob("*.log"))
    return str(error.value)


@pytest.mark.parametrize("flags, reason", [
    (["--decode-args", "--speculative-algorithm EAGLE --speculative-num-steps 3"],
     "decode model 'extract': speculative decoding (--speculative-algorithm EAGLE, --speculative-num-steps 3)"),
    (["--prefill-args=--speculative-algo=NEXTN"], "prefill servers: speculative decoding (--speculative-algorithm"),
    (["--decode-args", "compute=--speculative-draft-model-path /m/draft"],
     "decode model 'compute': speculative decoding (--speculative-draft-model-path /m/draft)"),
    (["--no-decode-cache", "--decode-args", "compute=--disaggregation-decode-enable-radix-cache"],
     "decode model 'compute': --disaggregation-decode-enable-radix-cache needs --radix-cache-backend pfs (got None)"),
    (["--decode-args", "compute=--radix-cache-backend lru"],
     "decode model 'compute': --disaggregation-decode-enable-radix-cache needs --radix-cache-backend pfs "
     "(got 'lru')"),
    (["--decode-args=--enable-hierarchical-cache"],
     "decode model 'extract': the decode prefix cache is not supported with --enable-hierarchical-cache"),
    (["--decode-args", "compute=--disaggregation-decode-retraction-backup host_pool"],
     "decode model 'compute': the decode prefix cache is not supported with "
     "--disaggregation-decode-retraction-backup host_pool"),
    (["--decode-args=--enable-dp-attention --dp-size 2"],
     "the decode prefix cache is not supported with --enable-dp-attention"),
    (["--decode-args", "extract=--disaggregation-decode-enable-offload-kvcache"],
     "the decode prefix cache is not supported with --disaggregation-decode-enable-offload-kvcache"),
    (["--prefill-args", "--page-size 16"],
     "decode model 'extract': --page-size differs between pools: prefill servers use 16, this decode pool None"),
    (["--prefill-args", "--page-size 16", "--decode-args", "extract=--page-size=16"],
     "decode model 'compute': --page-size differs between pools: prefill servers use 16, this decode pool None"),
    (["--decode-args", "compute=--kv-cache-dtype fp8_e5m2"],
     "decode model 'compute': --kv-cache-dtype differs between pools: prefill servers use 'auto', "
     "this decode pool 'fp8_e5m2'"),
    (["--decode-args", "--chat-template chatml"], "decode model 'extract': --chat-template differs between pools"),
    (["--gpus", "0-3", "--decode-args", "extract=--tp-size 2"],
     "decode model 'extract': --tp-size in the pass-through arguments conflicts with the launcher's placement"),
    (["--gpus", "0-3", "--decode-mem-fraction", "0.5", "--decode-args", "--mem-fraction-static 0.8"],
     "--mem-fraction-static in the pass-through arguments conflicts"),
])
def test_refused_at_launch_with_the_reason(demo_models, tmp_path, flags, reason):
    assert reason in refused(demo_models, tmp_path, *flags)


def test_what_agrees_is_accepted(demo_models, tmp_path, capsys):
    from pfs_sglang.launch.cli import main

    code = main(["--base-model", str(demo_models.base), "--decode-model", f"extract={demo_models.decode['extract']}",
                 "--log-dir", str(tmp_path / "logs"), "--prefill-args", "--page-size 16 --kv-cache-dtype auto",
                 "--decode-args=--page-size=16", "--gpus", "0,1", "--decode-args", "--mem-fraction-static 0.8",
                 "--dry-run"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("flags", [
    [],  # the launcher's own decode cache
    ["--decode-args=--disaggregation-decode-enable-radix-cache"],  # said twice
    ["--no-decode-cache", "--decode-args=--disaggregation-decode-enable-radix-cache --radix-cache-backend pfs"],
    ["--no-decode-cache", "--decode-args=--enable-hierarchical-cache"],  # without the tree: no decode-cache guard
])
def test_the_decode_cache_is_accepted_with_the_pfs_tree(demo_models, tmp_path, capsys, flags):
    from pfs_sglang.launch.cli import main

    code = main(["--base-model", str(demo_models.base), "--decode-model", f"extract={demo_models.decode['extract']}",
                 "--log-dir", str(tmp_path / "logs"), *flags, "--dry-run"])
    assert code == 0, capsys.readouterr().err


def with_config(model_dir, tmp_path, name, **changes):
    out = shutil.copytree(model_dir, tmp_path / name)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes, reason", [
    ({"model_type": "qwen3_next"}, "model_type 'qwen3_next'"),
    ({"layer_types": ["sliding_attention", "full_attention"] * 2}, "layer_types holds sliding_attention layers"),
    ({"layer_types": ["linear_attention", "full_attention"] * 2}, "layer_types holds linear_attention layers"),
    ({"sliding_window": 128}, "sliding_window 128"),
    ({"ssm_state_size": 16}, "config has ssm_state_size"),
    ({"text_config": {"model_type": "falcon_h1"}}, "model_type 'falcon_h1'"),
])
def test_hybrid_architectures_are_refused(demo_models, tmp_path, changes, reason):
    base = with_config(demo_models.base, tmp_path, "hybrid_base", **changes)
    message = refused(demo_models, tmp_path, "--base-model", str(base))
    assert message.startswith(f"base model {base}: hybrid SWA / Mamba / linear-attention models are not supported")
    assert reason in message
    decode = with_config(demo_models.decode["compute"], tmp_path, "hybrid_compute", **changes)
    assert f"decode model 'compute' {decode}: hybrid SWA" in refused(demo_models, tmp_path, decode={"compute": decode})


def test_full_attention_configs_pass_the_architecture_guard():
    assert _hybrid_reason({"model_type": "llama", "max_position_embeddings": 8192}) is None
    assert _hybrid_reason({"model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False,
                           "max_position_embeddings": 32768}) is None
    assert _hybrid_reason({"model_type": "qwen3", "sliding_window": None, "layer_types": ["full_attention"] * 4}) is None


def rewrite_json(path, update):
    data = json.loads(path.read_text())
    update(data)
    path.write_text(json.dumps(data))


def test_decode_module_that_tokenizes_differently_is_refused(demo_models, tmp_path):
    template = write_perturbed_decode_module(demo_models.base, tmp_path / "template", seed=21)
    (template / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    message = refused(demo_models, tmp_path, decode={"template": template})
    assert "decode model 'template' refused" in message
    assert "chat_template differs: prefill module has 'sha256:" in message
    assert "(the two servers would tokenize requests differently)" in message

    eos = write_perturbed_decode_module(demo_models.base, tmp_path / "eos", seed=22)
    rewrite_json(eos / "generation_config.json", lambda data: data.update(eos_token_id=[2, 3]))
    assert "stop_token_ids differs" in refused(demo_models, tmp_path, decode={"eos": eos})

    bos = write_perturbed_decode_module(demo_models.base, tmp_path / "bos", seed=23)
    rewrite_json(bos / "tokenizer_config.json", lambda data: data.update(add_bos_token=True))
    assert "special_tokens differs" in refused(demo_models, tmp_path, decode={"bos": bos})

    added = write_perturbed_decode_module(demo_models.base, tmp_path / "added", seed=24)
    rewrite_json(added / "tokenizer.json", lambda data: data["added_tokens"][3].update(special=False))
    assert "tokenizer differs" in refused(demo_models, tmp_path, decode={"added": added})


@pytest.mark.slow  # a fresh process that imports SGLang: seconds of CPU, so make test runs it, not make test-fast
def test_cli_refusal_exits_1_and_starts_nothing(demo_models, tmp_path):
    log_dir = tmp_path / "logs"
    result = subprocess.run([sys.executable, "-m", "pfs_sglang.launch_server", "--base-model", str(demo_models.base),
                             "--decode-model", f"extract={demo_models.decode['extract']}", "--port", str(free_port()),
                             "--log-dir", str(log_dir), "--decode-args", "--speculative-algorithm EAGLE"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "launch failed: decode model 'extract': speculative decoding (--speculative-algorithm EAGLE)" in result.stderr
    assert not list(log_dir.glob("*.log"))
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(log_dir) in " ".join(p.info["cmdline"] or [])]
