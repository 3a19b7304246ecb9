"""Extend attention over a cached prefix computes the new tokens' rows only (torch_native backend).

SGLang's ``torch_native`` attention backend (the one CPU servers use) runs an EXTEND
batch request by request, and for a request whose prompt starts with ``p`` cached
tokens it still computes causal attention for all ``p + e`` query rows, filling the
``p`` prefix rows with uninitialised memory and throwing their output away. An extend of
one token over a 1023-token prefix therefore costs a full 1024 x 1024 attention per
layer (33 ms on the demo models on the 2-core box, five decode steps' worth).
PrefillShare meets that case on every request: the prefill module extends the part of
``prompt[:-1]`` its tree does not hold, and the decode module extends ``prompt[-1]``
over the base's KV (invariant 2); stock SGLang meets it on every prefix-cache hit.

``extend_attention_over_new_tokens`` (AROUND
``TorchNativeAttnBackend._run_sdpa_forward_extend``) gives each request only its ``e``
new query rows, with the causal mask aligned to the end of the keys: query ``i`` sees
keys ``0 .. p + i``, exactly the keys it sees in SGLang's full computation, so every
output row is the same attention, computed once. A single new token needs no mask. Calls
it does not cover (encoder-decoder models, sliding windows, non-causal layers) go to
SGLang's own code unchanged. Registered by the pfs_sglang plugin in every SGLang
process; GPU attention backends are not touched.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend"


def _covered(encoder_lens, causal: bool, is_cross_attn: bool, sliding_window_size) -> bool:
    sliding = sliding_window_size is not None and sliding_window_size > -1
    return causal and encoder_lens is None and not is_cross_attn and not sliding


def extend_attention_over_new_tokens(
    original, backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
    extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None, enable_gqa=False, causal=False,
    is_cross_attn=False, sliding_window_size=None,
):
    if not _covered(encoder_lens, causal, is_cross_attn, sliding_window_size):
        return original(backend, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        extend_prefix_lens, extend_seq_lens, encoder_lens, scaling, enable_gqa, causal,
                        is_cross_attn, sliding_window_size)
    heads_first = query.movedim(0, query.dim() - 2)  # [heads, tokens, head_dim]
    start = 0
    for row, (kv_len, prefix_len, new_len) in enumerate(
        zip(seq_lens.tolist(), extend_prefix_lens.tolist(), extend_seq_lens.tolist())
    ):
        end = start + new_len
        tokens = req_to_token[req_pool_indices[row], :kv_len]
        key = k_cache[tokens].movedim(0, query.dim() - 2)
        value = v_cache[tokens].movedim(0, query.dim() - 2)
        per_req_query = heads_first[:, start:end, :]
        if key.dtype != per_req_query.dtype:
            key, value = key.to(per_req_query.dtype), value.to(per_req_query.dtype)
        mask = None
        if prefix_len and new_len > 1:  # query i sees keys 0 .. prefix_len + i
            positions = torch.arange(kv_len, device=query.device)
            mask = positions[None, :] <= (prefix_len + torch.arange(new_len, device=query.device))[:, None]
        attended = scaled_dot_product_attention(
            per_req_query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), attn_mask=mask,
            enable_gqa=enable_gqa, scale=scaling, is_causal=prefix_len == 0 and new_len > 1,
        )
        output[start:end] = attended.squeeze(0).movedim(query.dim() - 2, 0)
        start = end
    return output


def register_prefix_extend_attention() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, extend_attention_over_new_tokens, HookType.AROUND)
