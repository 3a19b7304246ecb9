"""The decode-side prefix cache of base KV (issue 23, item 1) without a server.

* The prefill side's sender (``ZmqKVSender``): with the decode side holding ``P`` tokens
  (SGLang's ``decode_prefix_len``), the pages it sends are exactly
  ``[P / page, ceil(k / page))`` for every prompt length, ``k`` and ``P``, page sizes 1
  and 4, whole-prompt and chunked sends (SGLang's own chunk grid), the last chunk always
  going; a claimed prefix that is unaligned or past ``floor_page(k)`` fails the room.
* The decode tree (``PrefillModuleRadixCache`` on a decode server) caps every request's
  match and insert at ``k`` (invariant 1), adapters and base alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pfs_sglang.transfer.zmq_backend import (
    ZmqKVSender,
    decode_prefix_refusal,
    pages_past_decode_prefix,
)


class FakeManager:
    def __init__(self, page_size: int, claimed: int = 0, room: int = 7):
        self.kv_args = SimpleNamespace(page_size=page_size)
        self.kv_shard_size = 1
        self.enable_all_cp_ranks_for_transfer = False
        self.is_dummy_cp_rank = False
        self.req_to_decode_prefix_len = {room: claimed} if claimed else {}
        self.failures: list[tuple[int, str]] = []

    def conclude_failure(self, *, bootstrap_room: int, failure_reason: str, targets=None):
        self.failures.append((bootstrap_room, failure_reason))


def sender_for(page_size: int, k: int, claimed: int = 0) -> ZmqKVSender:
    sender = object.__new__(ZmqKVSender)  # Mooncake's constructor registers with a live manager
    sender.kv_mgr = FakeManager(page_size, claimed)
    sender.bootstrap_room = 7
    sender.curr_idx = 0
    sender.prefill_module_len = k
    return sender


def pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def chunk_ends(prompt_len: int, start: int, chunk: int | None, page_size: int) -> list[tuple[int, bool]]:
    """The ``end_idx`` of each ``_send_kv_chunk`` call of SGLang's prefill (non-last ones page-floored)."""
    ends = []
    if chunk is not None:
        for end in range(chunk, prompt_len, chunk):
            ends.append((end - end % page_size, False))
    ends.append((prompt_len, True))
    return ends


def sent_pages(prompt_len: int, k: int, decode_prefix: int, page_size: int, chunk: int | None):
    """Run the sender as SGLang's prefill drives it; the absolute pages sent, and how many
    calls went through (the last one concluding the transfer)."""
    sender = sender_for(page_size, k, decode_prefix)
    start = sender.pop_decode_prefix_len()  # finalize_bootstrap: start_send_idx = P
    assert not sender.kv_mgr.failures
    sender.num_kv_indices = pages(prompt_len - start, page_size)  # finalize_bootstrap's init
    row = np.arange(1000, 1000 + prompt_len)  # the request's slots: page p of the prompt is slot page 250 + p
    sent, last_seen = [], 0
    for end, last in chunk_ends(prompt_len, start, chunk, page_size):
        if end < start:
            continue
        page_indices = row[start:end][::page_size] // page_size  # kv_to_page_indices
        if not (len(page_indices) > 0 or last):  # should_send_kv_chunk
            start = end
            continue
        kv, index_slice, is_last, skip = sender._prepare_send_indices(page_indices)
        start = end
        if skip:
            continue
        assert len(kv) == index_slice.stop - index_slice.start
        first_page = decode_prefix // page_size
        assert list(range(first_page + index_slice.start, first_page + index_slice.stop)) == \
            [int(p) - 1000 // page_size for p in kv]  # the slice names exactly the pages sent
        sent += [first_page + i for i in range(index_slice.start, index_slice.stop)]
        last_seen += is_last
    return sent, last_seen


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("chunk", [None, 4, 8])
def test_sender_sends_the_pages_of_prompt_k_past_the_decode_prefix(page_size, chunk):
    for prompt_len in range(1, 14):
        last = max(prompt_len - 1, 0)
        for k in sorted({last, *range(0, last, 3)}):  # k = len - 1, and smaller (input logprobs)
            for decode_prefix in range(0, k // page_size * page_size + 1, page_size):
                sent, lasts = sent_pages(prompt_len, k, decode_prefix, page_size, chunk)
                case = dict(len=prompt_len, k=k, P=decode_prefix, page=page_size, chunk=chunk)
                assert sent == list(range(decode_prefix // page_size, pages(k, page_size))), case
                assert lasts == 1, case  # the last chunk always goes, once


def test_the_page_count_is_relative_to_the_decode_prefix():
    # SGLang counts a sender's pages from page P / page: with P = 8, k = 11 on 4-token pages the
    # decode side lacks page 2 only (tokens 8..11), not ceil(11 / 4) = 3 pages.
    assert pages_past_decode_prefix(11, 8, 4) == 1
    assert pages_past_decode_prefix(11, 0, 4) == 3
    assert pages_past_decode_prefix(12, 12, 1) == 0  # a full hit: no KV page moves


@pytest.mark.parametrize("page_size, k, claimed, reason", [
    (4, 11, 12, "past the 8 page-aligned tokens of prompt[:k]"),
    (4, 11, 6, "not a whole number of 4-token pages"),
    (1, 5, 6, "past the 5 page-aligned tokens"),
])
def test_a_claimed_prefix_past_floor_page_k_or_unaligned_fails_the_room(page_size, k, claimed, reason):
    sender = sender_for(page_size, k, claimed)
    assert sender.pop_decode_prefix_len() == 0
    [(room, message)] = sender.kv_mgr.failures
    assert room == 7 and reason in message
    assert decode_prefix_refusal(claimed, k, page_size) == message


def test_a_claimed_prefix_within_floor_page_k_is_accepted():
    for page_size, k, claimed in ((4, 11, 8), (4, 12, 12), (1, 5, 5), (4, 3, 0)):
        sender = sender_for(page_size, k, claimed)
        assert sender.pop_decode_prefix_len() == claimed
        assert sender.decode_prefix_len == claimed and not sender.kv_mgr.failures


def decode_request(prompt_len: int, lora_id: str | None = None, logprob_start: int | None = None):
    return SimpleNamespace(origin_input_ids=list(range(prompt_len)), lora_id=lora_id, extra_key=None,
                           return_logprob=logprob_start is not None,
                           logprob_start_len=-1 if logprob_start is None else logprob_start)


@pytest.fixture
def decode_tree(monkeypatch):
    """A decode server's ``pfs`` tree whose SGLang side only records what it is asked."""
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    from pfs_sglang.cache.prefill_module_cache import PrefillModuleRadixCache

    calls = []
    monkeypatch.setattr(UnifiedRadixCache, "match_prefix", lambda self, params: calls.append(params.key))
    monkeypatch.setattr(UnifiedRadixCache, "checkpoint", lambda self, req, *, up_to, **kw: calls.append(up_to))
    tree = object.__new__(PrefillModuleRadixCache)  # SGLang's constructor builds pools
    tree.prefill_digest, tree.caps_every_request = "d1", True
    return tree, calls


@pytest.mark.parametrize("lora_id", [None, "alpha"])
def test_a_decode_tree_caps_every_match_and_insert_at_k(decode_tree, lora_id):
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    tree, calls = decode_tree
    for req, k in ((decode_request(10, lora_id), 9), (decode_request(10, lora_id, logprob_start=4), 4)):
        req.extra_key = None
        setattr(req, "pfs_namespaced", False)
        tree.match_prefix(MatchPrefixParams(key=RadixKey(list(range(10)), None), req=req))
        tree.match_prefix(MatchPrefixParams(key=RadixKey(list(range(10)), None, limit=3), req=req))
        tree.checkpoint(req, up_to=10 + 5)  # prompt and output: only prompt[:k] may go in
        first, limited, inserted = calls[-3:]
        assert (first.limit, limited.limit, inserted) == (k, 3, k)
        assert first.extra_key == "pfs:d1"  # the prefill module's namespace, the adapter's id left out


def test_a_prefill_tree_is_not_capped(decode_tree):
    tree, calls = decode_tree
    tree.caps_every_request = False
    tree.checkpoint(decode_request(10, "alpha"), up_to=10)
    assert calls[-1] == 10


def test_a_decode_server_with_another_decode_tree_does_not_start(decode_tree):
    from pfs_sglang.cache.prefill_module_cache import check_decode_tree

    tree, _ = decode_tree
    args = SimpleNamespace(disaggregation_mode="decode", disaggregation_decode_enable_radix_cache=True,
                           radix_cache_backend=None)
    check_decode_tree(SimpleNamespace(server_args=args, tree_cache=tree))  # the capped pfs tree
    with pytest.raises(RuntimeError, match="needs --radix-cache-backend pfs .*invariant 1"):
        check_decode_tree(SimpleNamespace(server_args=args, tree_cache=object()))
    tree.caps_every_request = False
    with pytest.raises(RuntimeError, match="needs --radix-cache-backend pfs"):
        check_decode_tree(SimpleNamespace(server_args=args, tree_cache=tree))
    off = SimpleNamespace(disaggregation_mode="decode", disaggregation_decode_enable_radix_cache=False)
    check_decode_tree(SimpleNamespace(server_args=off, tree_cache=object()))  # no tree: nothing to hold
