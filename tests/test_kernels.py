"""pfs_kernels: the CPU import stand-ins are installed only where needed and raise if called."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="stand-ins are inactive with CUDA")
def test_stand_in_installed_on_cpu_and_raises_when_called():
    script = textwrap.dedent("""
        import sys
        from pfs_kernels import install_import_stand_ins
        from pfs_kernels.stand_ins import StandInCalledError
        assert install_import_stand_ins() == ["vllm", "vllm._custom_ops"]
        from vllm._custom_ops import rotary_embedding
        try:
            rotary_embedding(None)
        except StandInCalledError as error:
            assert "import stand-in" in str(error)
        else:
            raise AssertionError("stand-in did not raise")
        assert install_import_stand_ins() == []  # idempotent: the module now imports
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_real_module_wins(tmp_path):
    fake_real = tmp_path / "vllm"
    fake_real.mkdir()
    (fake_real / "__init__.py").write_text("")
    (fake_real / "_custom_ops.py").write_text("REAL = True\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from pfs_kernels import install_import_stand_ins
        assert install_import_stand_ins() == []
        import vllm._custom_ops
        assert vllm._custom_ops.REAL
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.slow  # a fresh process that imports SGLang and builds its rotary embedding (~12 s of CPU)
def test_sglang_rotary_embedding_builds_and_runs_natively_on_cpu():
    """The only SGLang import the stand-in serves: RotaryEmbedding, whose CPU forward is native."""
    script = textwrap.dedent("""
        import torch
        from pfs_sglang.plugin import load
        load()
        from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
        rope = RotaryEmbedding(16, 16, 2048, 10000, True, torch.float32)
        positions = torch.arange(5)
        q, k = torch.randn(5, 4 * 16), torch.randn(5, 2 * 16)
        q_out, k_out = rope.forward_native(positions, q.clone(), k.clone())
        q_ref, k_ref = rope(positions, q.clone(), k.clone())
        torch.testing.assert_close(q_out, q_ref)
        torch.testing.assert_close(k_out, k_ref)
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize("enable_gqa", [False, True], ids=["mha", "gqa"])
def test_prefix_extend_attention_equals_sglangs_full_computation(enable_gqa):
    """Every new token's attention over a cached prefix equals SGLang's redundant full-length computation."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from pfs_kernels.prefix_extend_attention import extend_attention_over_new_tokens

    torch.manual_seed(0)
    heads, kv_heads, head_dim, slots = 4, 2 if enable_gqa else 4, 16, 4096
    k_cache, v_cache = torch.randn(slots, kv_heads, head_dim), torch.randn(slots, kv_heads, head_dim)
    # (prefix, new) per request: no prefix, one token over a long prefix, several over a prefix, one alone
    shapes = [(0, 7), (1023, 1), (40, 9), (0, 1), (5, 1)]
    req_to_token = torch.zeros(len(shapes), 1100, dtype=torch.int64)
    for row, (prefix, new) in enumerate(shapes):
        req_to_token[row, : prefix + new] = torch.randperm(slots - 1)[: prefix + new] + 1  # scattered slots
    seq_lens = torch.tensor([p + n for p, n in shapes])
    prefix_lens, new_lens = torch.tensor([p for p, _ in shapes]), torch.tensor([n for _, n in shapes])
    query = torch.randn(int(new_lens.sum()), heads, head_dim)
    args = (query, req_to_token, torch.arange(len(shapes)), seq_lens, prefix_lens, new_lens)

    def run(call):
        output = torch.full_like(query, float("nan"))
        q, r2t, rows, lens, prefixes, news = args
        return call(q, output, k_cache, v_cache, r2t, rows, lens, prefixes, news,
                    scaling=head_dim ** -0.5, enable_gqa=enable_gqa, causal=True)

    sglang_full = run(lambda *a, **k: TorchNativeAttnBackend._run_sdpa_forward_extend(None, *a, **k))
    new_rows_only = run(lambda *a, **k: extend_attention_over_new_tokens(
        TorchNativeAttnBackend._run_sdpa_forward_extend, None, *a, **k))
    assert not new_rows_only.isnan().any()
    torch.testing.assert_close(new_rows_only, sglang_full, rtol=1e-5, atol=1e-5)


def test_prefix_extend_attention_leaves_uncovered_calls_to_sglang():
    from pfs_kernels.prefix_extend_attention import extend_attention_over_new_tokens

    calls = []
    for uncovered in ({"causal": False}, {"causal": True, "sliding_window_size": 8},
                      {"causal": True, "encoder_lens": torch.tensor([3])}, {"causal": True, "is_cross_attn": True}):
        extend_attention_over_new_tokens(lambda *a: calls.append(a), "backend", *range(9), **uncovered)
    assert len(calls) == 4 and all(call[0] == "backend" for call in calls)
