"""A CPU server's scheduler and detokenizer processes start by ``fork``, not ``spawn``.

Runs in every SGLang server's HTTP process (registered by the plugin). SGLang's launch
sets multiprocessing's start method to ``spawn`` (``_set_envs_and_config``) because a
CUDA context does not survive a fork; each spawned process then imports SGLang and
torch again, about as much CPU as the whole rest of a server's start on a CPU box
(docs/launcher.md, "Start-up"). A server on ``--device cpu``
has no CUDA context to lose, so ``fork_subprocesses_on_cpu`` (AFTER
``_set_envs_and_config``) sets the start method to ``CPU_START_METHOD_ENV``'s value,
``fork`` by default: the scheduler and detokenizer begin from the parent's imported
modules, its loaded plugins and applied hooks (SGLang's ``load_plugins`` is once per
process and a forked child inherits that it ran), and its parsed arguments.

Why a fork is safe there: SGLang launches those processes before the HTTP process builds
its tokenizer manager or binds a socket, from the main thread with no other Python
thread running; a ZMQ context the parent holds is never terminated by a forked child
(pyzmq checks the pid); each child sets up its own logging, torch threads and sockets as
it would after a spawn. What the children do is unchanged: every server test and the
greedy oracle (invariant 5) run on forked servers. A GPU server (any other device) keeps
SGLang's ``spawn``; ``PFS_SGLANG_CPU_START_METHOD=spawn`` restores it on CPU too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os

logger = logging.getLogger(__name__)

ENGINE_MODULE = "sglang.srt.entrypoints.engine"
CPU_START_METHOD_ENV = "PFS_SGLANG_CPU_START_METHOD"
START_METHODS = ("fork", "forkserver", "spawn")


def cpu_start_method() -> str:
    """The start method for a CPU server's subprocesses: ``CPU_START_METHOD_ENV``, ``fork`` when unset."""
    method = os.environ.get(CPU_START_METHOD_ENV, "fork")
    if method not in START_METHODS:
        raise ValueError(f"{CPU_START_METHOD_ENV}={method!r}: expected one of {', '.join(START_METHODS)}")
    return method


def fork_subprocesses_on_cpu(result, server_args, *args, **kwargs):
    """AFTER SGLang's ``_set_envs_and_config``: on a CPU server, replace its ``spawn``."""
    from sglang.srt.arg_groups.overrides import resolving_view

    if resolving_view(server_args).device == "cpu":
        method = cpu_start_method()
        multiprocessing.set_start_method(method, force=True)
        logger.info("pfs_sglang: CPU server, scheduler and detokenizer start by %s", method)
    return result


def register_fork_on_cpu() -> None:
    """Hook the HTTP server's process only (the one that launches the others)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if multiprocessing.parent_process() is not None:
        return
    HookRegistry.register(f"{ENGINE_MODULE}._set_envs_and_config", fork_subprocesses_on_cpu, HookType.AFTER)
