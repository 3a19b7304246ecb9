"""Per-request KV transfer figures in the prefill server's replies.

SGLang's prefill scheduler measures every hand-off (``KVTransferMetric``: bytes sent,
latency) but only feeds server-wide Prometheus histograms. This output streamer, a
subclass of SGLang's ``SchedulerOutputStreamer`` swapped in by ``registration``, adds them to
the request's own reply as ``meta_info["pfs_kv_transfer"] = [{"bytes", "seconds",
"decode_prefix_tokens"}]`` (a list: SGLang accumulates customized info per request) so the
router can count KV bytes moved and transfer time per decode model. ``decode_prefix_tokens``
is the prefix the decode server already held in its prefix cache of base KV (SGLang's
``decode_prefix_len``; the prefill sent only the KV after it), 0 without a hit or with the
decode cache off. A decode server's replies carry the same figure from its own side,
``meta_info["pfs_decode_prefix_tokens"] = [P]`` (the prefix its cache held when the KV
arrived): the router counts it from there, since it keeps a prefill reply only when that
came before the decode server's. Invariant-neutral: it reports, it changes nothing.
"""

from __future__ import annotations

from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

KV_TRANSFER_KEY = "pfs_kv_transfer"
DECODE_PREFIX_KEY = "pfs_decode_prefix_tokens"


def kv_transfer_report(req) -> dict | None:
    sender = getattr(req, "disagg_kv_sender", None)
    if sender is None:
        return None
    metric = sender.get_transfer_metric()
    if metric.transfer_total_bytes is None:
        return None
    seconds = metric.transfer_latency_s
    stats = req.time_stats
    if seconds is None and stats.prefill_transfer_queue_entry_time > 0 and stats.completion_time > 0:
        seconds = stats.completion_time - stats.prefill_transfer_queue_entry_time
    return {"bytes": int(metric.transfer_total_bytes), "seconds": float(seconds or 0.0),
            "decode_prefix_tokens": int(getattr(req, "disagg_decode_prefix_len", 0) or 0)}


class KVTransferReportingStreamer(SchedulerOutputStreamer):
    has_additional_customized_info = True

    def should_build_additional_customized_info(self) -> bool:
        return self.disaggregation_mode in (DisaggregationMode.PREFILL, DisaggregationMode.DECODE)

    def build_additional_customized_info(self, reqs) -> dict[str, list]:
        if self.disaggregation_mode == DisaggregationMode.DECODE:
            from pfs_sglang.decode.prompt_tail_extend import DECODE_PREFIX_LEN

            held = [getattr(req, DECODE_PREFIX_LEN, None) for req in reqs]
            return {DECODE_PREFIX_KEY: [[int(tokens)] if tokens is not None else [] for tokens in held]}
        reports = [kv_transfer_report(req) for req in reqs]
        return {KV_TRANSFER_KEY: [[report] if report else [] for report in reports]}

    def is_request_level_customized_info_key(self, key: str) -> bool:
        return key in (KV_TRANSFER_KEY, DECODE_PREFIX_KEY) or super().is_request_level_customized_info_key(key)

