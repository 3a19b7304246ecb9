"""CPU stand-ins for the compiled kernels SGLang imports, so stock SGLang serves on a CPU box.

Route chosen: SGLang's *generic* path (no ``SGLANG_USE_CPU_ENGINE``) with
``--device cpu --attention-backend torch_native``. On that path every layer runs its
PyTorch-native forward; the only compiled module it needs is ``vllm._custom_ops``,
imported by ``RotaryEmbedding.__init__`` for a CUDA-only fallback kernel. The other
route (``SGLANG_USE_CPU_ENGINE=1``) would need a CPU ``sgl_kernel`` shadowing the
installed CUDA wheel and dozens of fused CPU ops; the generic path needs one import.

``install_import_stand_ins()`` is called by the pfs_sglang plugin in every SGLang
process. It does nothing when CUDA is available or when the real module imports.
``install_unpinned_host_memory()`` (also from the plugin, also CPU-only) lets SGLang's
multi-LoRA start: its requests for pinned host memory become plain host memory.
``register_prefix_extend_attention()`` (from the plugin, every device) makes the
``torch_native`` attention backend compute an extend's new tokens only, not its cached
prefix again.
"""

from pfs_kernels.prefix_extend_attention import register_prefix_extend_attention
from pfs_kernels.stand_ins import install_import_stand_ins
from pfs_kernels.unpinned_host_memory import install_unpinned_host_memory

__all__ = ["install_import_stand_ins", "install_unpinned_host_memory", "register_prefix_extend_attention"]
