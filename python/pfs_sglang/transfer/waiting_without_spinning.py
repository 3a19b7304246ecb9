"""A PD server waiting on KV hand-offs polls instead of spinning, when it was asked to sleep on idle.

SGLang's ``--sleep-on-idle`` puts a scheduler to sleep only when it is *fully* idle.
A prefill or decode server that has nothing to compute but a hand-off in flight
(bootstrap, KV transfer, metadata) is not fully idle: its event loop calls
``on_idle``, which yields with ``time.sleep(0)`` and loops again, a full core per
server. On a small CPU box a deployment has several such servers, and their spinning
takes the cores that the transfer threads, tokenizers and forwards need (seen here:
four concurrent requests on the demo models took seconds each on two cores).

``on_idle_polling_pd_waits`` (AROUND ``Scheduler.on_idle``) keeps SGLang's
housekeeping and adds a short sleep (``PD_WAIT_POLL_S``) when the server sleeps on
idle, is a PD server and is still waiting on something. Without ``--sleep-on-idle``
(the launcher's GPU default) nothing changes. The wait adds at most one poll
interval to a hand-off; no request's outcome depends on it.
"""

from __future__ import annotations

import time

PD_WAIT_POLL_S = 0.0005


def on_idle_polling_pd_waits(original, scheduler, *args, **kwargs):
    from sglang.srt.disaggregation.utils import DisaggregationMode

    result = original(scheduler, *args, **kwargs)
    if (
        scheduler.idle_sleeper is not None
        and scheduler.disaggregation_mode != DisaggregationMode.NULL
        and not scheduler.is_fully_idle()
    ):
        time.sleep(PD_WAIT_POLL_S)
    return result


def register_pd_wait_polling() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.on_idle", on_idle_polling_pd_waits, HookType.AROUND)
