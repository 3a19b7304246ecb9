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
