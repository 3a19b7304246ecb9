"""The hand-off's block list: the same blocks as SGLang's Mooncake manager, built with array operations;
and the ZMQ manager's prefill room statuses (a cleared room concluded, an unknown one has no transfer)."""

from __future__ import annotations

import numpy as np
import pytest
from sglang.srt.disaggregation.mooncake.conn import MooncakeKVManager

from pfs_sglang.transfer.kv_blocks import kv_blocks
from pfs_sglang.transfer.zmq_backend import RecentRooms, ZmqKVManager


def test_blocks_are_runs_consecutive_on_both_sides_buffer_by_buffer():
    blocks = kv_blocks([1000, 5000], [9000, 20000], [10, 30], np.array([1, 2, 3, 7, 8]), np.array([4, 5, 9, 10, 11]))
    # runs: slots 1-2 -> 4-5, 3 -> 9, 7-8 -> 10-11; for the first buffer, then the second
    assert blocks.src.tolist() == [1010, 1030, 1070, 5030, 5090, 5210]
    assert blocks.dst.tolist() == [9040, 9090, 9100, 20120, 20270, 20300]
    assert blocks.lengths.tolist() == [20, 10, 20, 60, 30, 60]
    assert len(kv_blocks([1000], [2000], [8], np.array([], dtype=np.int32), np.array([], dtype=np.int32))) == 0
    with pytest.raises(ValueError, match="3 source slots but 2"):
        kv_blocks([1000], [2000], [8], np.array([1, 2, 3]), np.array([1, 2]))


class _Recording(ZmqKVManager):
    """A manager with just what ``_send_kvcache_generic`` reads; its transfers are recorded, not made."""

    def __init__(self, prefill_start_layer: int = 0) -> None:  # no SGLang set-up: nothing is served
        self.kv_args = type("KVArgs", (), {"prefill_start_layer": prefill_start_layer})()
        self.is_mla_backend = self.is_hybrid_mla_backend = self.enable_custom_mem_pool = False
        self.custom_mem_pool_type = None
        self.max_transfer_batch_indices = 0
        self.state_strides_validated = set()
        self.pp_size = 1
        self.calls: list[tuple[list[int], list[int], list[int]]] = []
        self.arrays: list[bool] = []  # whether each call's blocks came as arrays (ours) or tuples (SGLang's)
        self.engine = self

    def batch_transfer_sync(self, session_id, src, dst, lengths) -> int:  # the engine's interface
        self.calls.append((list(map(int, src)), list(map(int, dst)), list(map(int, lengths))))
        self.arrays.append(isinstance(src, np.ndarray))
        return 0

    def batch_transfer_slots(self, session_id, slots) -> int:  # ours: the blocks its slots name
        blocks = slots.blocks()
        return self.batch_transfer_sync(session_id, blocks.src, blocks.dst, blocks.lengths)

    def _transfer_data(self, session_id, transfer_blocks) -> int:  # where SGLang's own path ends
        return self.batch_transfer_sync(session_id, *zip(*transfer_blocks)) if transfer_blocks else 0


@pytest.mark.parametrize("layout", ["scattered", "consecutive", "mixed"])
@pytest.mark.parametrize("layers, dst_layers", [(3, 3), (2, 4)])  # (2, 4): a prefill pipeline stage of 2 layers
def test_the_zmq_manager_sends_exactly_the_blocks_sglang_builds(layout, layers, dst_layers):
    rng = np.random.default_rng(layers + len(layout))
    tokens = 200
    if layout == "scattered":
        src_slots, dst_slots = rng.choice(5000, tokens, replace=False), rng.choice(5000, tokens, replace=False)
    elif layout == "consecutive":
        src_slots, dst_slots = np.arange(10, 10 + tokens), np.arange(700, 700 + tokens)
    else:
        src_slots = np.concatenate([np.arange(5, 105), rng.choice(np.arange(200, 5000), tokens - 100, replace=False)])
        dst_slots = np.concatenate([np.arange(900, 1000), np.arange(3000, 3000 + tokens - 100)])
    src_slots, dst_slots = src_slots.astype(np.int32), dst_slots.astype(np.int32)
    src_ptrs = [(1 << 32) + (i << 24) for i in range(2 * layers)]
    dst_ptrs = [(1 << 36) + (i << 24) for i in range(2 * dst_layers)]
    item_lens = [256 + 64 * i for i in range(2 * layers)]  # K and V lengths differ: each must be paired right
    arguments = dict(mooncake_session_id="peer", src_data_ptrs=src_ptrs, dst_data_ptrs=dst_ptrs, item_lens=item_lens,
                     prefill_data_indices=src_slots, dst_data_indices=dst_slots, executor=None, src_layer_ids=None,
                     dst_layer_ids=None, force_flat=False, dst_device_data_indices=None, dst_device_data_ptrs=None)
    ours, sglangs = _Recording(prefill_start_layer=dst_layers - layers), _Recording(dst_layers - layers)
    assert ours._send_kvcache_generic(**arguments) == 0
    assert MooncakeKVManager._send_kvcache_generic(sglangs, **arguments) == 0
    assert (ours.arrays, sglangs.arrays) == ([True], [False])
    assert ours.calls == sglangs.calls


@pytest.mark.parametrize("uncovered", ["mla", "device_destination_indices"])
def test_layouts_it_does_not_cover_go_to_sglangs_code(uncovered):
    manager = _Recording()
    slots = np.arange(4, dtype=np.int32)
    options = {}
    if uncovered == "mla":
        manager.is_mla_backend = True  # one flat buffer per layer
    else:
        options["dst_device_data_indices"] = slots + 8  # HiSparse: another page space for device buffers
    assert manager._send_kvcache_generic(mooncake_session_id="peer", src_data_ptrs=[1 << 32, 1 << 33],
                                         dst_data_ptrs=[1 << 34, 1 << 35], item_lens=[64, 64],
                                         prefill_data_indices=slots, dst_data_indices=slots, executor=None,
                                         **options) == 0
    assert manager.arrays == [False]  # SGLang's own path built the blocks


class _PrefillRooms(ZmqKVManager):
    """A prefill manager with just the room bookkeeping SGLang's ``update_status`` and ``clear`` touch."""

    def __init__(self) -> None:  # no SGLang set-up: nothing is served
        from sglang.srt.disaggregation.utils import DisaggregationMode

        self.disaggregation_mode = DisaggregationMode.PREFILL
        self.request_status = {}
        self.deferred_bootstrap = None
        self._deferred_ack_targets, self._deferred_ack_poisoned_rooms, self._staging_outstanding = {}, set(), {}
        self._registered_rooms = RecentRooms()


def test_a_prefill_room_reports_success_once_cleared_and_failed_if_never_registered():
    from sglang.srt.disaggregation.base.conn import KVPoll

    manager = _PrefillRooms()
    manager.update_status(7, KVPoll.Bootstrapping)  # a sender registered room 7
    manager.update_status(7, KVPoll.Transferring)
    assert manager.check_status(7) == KVPoll.Transferring
    manager.update_status(7, KVPoll.Success)
    manager.request_status.pop(7)  # the scheduler cleared the concluded room (``clear``)
    assert manager.check_status(7) == KVPoll.Success
    assert manager.check_status(8) == KVPoll.Failed  # no sender ever registered room 8
