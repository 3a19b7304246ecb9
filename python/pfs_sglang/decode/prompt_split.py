"""Where a prompt splits between the prefill module and the decode module (invariant 2).

The prefill module provides the KV of ``prompt[:k]``; the decode module extends
``prompt[k:]`` itself. ``k = len(prompt) - 1`` normally, so the decode module samples
the first output token from its own forward over the last prompt token. A request that
asks for input logprobs from position ``logprob_start_len`` (frontend ``select``
scores its choices this way) needs the decode module's logits from there on, so
``k = min(len - 1, logprob_start_len)``.

Both servers call :func:`prefill_module_len` on their own copy of the request (the
router sends both the same body, and their tokenizers are the same by invariant 4), so
the prefill side sends exactly the KV the decode side expects.
"""

from __future__ import annotations


def prefill_module_len(req) -> int:
    """``k``: how many leading prompt tokens get their KV from the prefill module."""
    prompt_len = len(req.origin_input_ids)
    last = max(prompt_len - 1, 0)
    start = req.logprob_start_len
    if req.return_logprob and start is not None and 0 <= start < last:
        return start
    return last
