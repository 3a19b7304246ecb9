"""Run by ``test_seams.py`` in a process of its own: checks ``pfs_sglang.seams.SEAMS`` against the
installed SGLang, loads the plugin the way SGLang does, and writes what it found as JSON.

A process of its own because loading the plugin patches SGLang's classes, and torch's
tensor factories where no CUDA is present, for the rest of the process. Usage:
``python seam_probe.py OUT.json`` with ``SGLANG_PLUGINS=pfs_sglang``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import pkgutil
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pfs_sglang.seams import SEAMS, Seam, SeamNotFound, resolve

PLUGIN = "pfs_sglang"  # the entry point's name in pyproject.toml
METADATA_PARSER = "sglang.srt.disaggregation.mooncake.conn.TransferInfo.from_zmq"


def owner_problems(seam: Seam, target: object) -> list[str]:
    """What no longer holds on the project's side: its code named as owner, its subclass, its override."""
    try:
        owner = pkgutil.resolve_name(seam.owner)
    except (AttributeError, ImportError, ValueError) as error:
        return [f"the project's {seam.owner} that relies on it is gone: {error}"]
    if seam.kind == "subclass" and not (isinstance(owner, type) and issubclass(owner, target)):
        return [f"{seam.owner} no longer subclasses it"]
    if seam.kind == "override":
        owner_class, _, member = seam.owner.rpartition(".")
        if member not in vars(pkgutil.resolve_name(owner_class)):
            return [f"{seam.owner} no longer overrides it"]
    return []


def parameter_problems(seam: Seam, target: object) -> list[str]:
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError) as error:
        return [f"its signature cannot be read: {error}"]
    missing = [name for name in seam.parameters if name not in names]
    if missing:
        return [f"it has no parameter {', '.join(missing)} (its parameters: {', '.join(names)})"]
    positions = [names.index(name) for name in seam.parameters]
    if positions != sorted(positions):
        return [f"its parameters are no longer in the order {', '.join(seam.parameters)} ({', '.join(names)})"]
    return []


def metadata_message_problems() -> list[str]:
    """Mooncake's metadata message, built by Mooncake, through the prefill side's generation reader and back
    into Mooncake's parser: the room and the decode session where the reader takes them, the message as it was,
    the decode side's cached prefix (``decode_prefix_len``) read back."""
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVManager, TransferInfo

    from pfs_sglang.transfer.zmq_backend import GENERATION_FRAME_PREFIX, ZmqKVManager

    room, session, generation = 42, "10.0.0.2:7002", 5
    decode = SimpleNamespace(local_ip="10.0.0.2", rank_port=7001, get_session_id=lambda: session)
    prefill = SimpleNamespace(_peer_generations={}, transfer_infos={})
    try:
        message = MooncakeKVManager.build_receiver_metadata_message(
            decode, bootstrap_room=room, required_dst_info_num=1, kv_indices=np.arange(3, dtype=np.int32),
            aux_index=0, state_indices=None, decode_prefix_len=8, is_dummy=False)
        read = ZmqKVManager._note_peer_generation(prefill, [*message, GENERATION_FRAME_PREFIX + b"%d" % generation])
        info = TransferInfo.from_zmq(read)
    except Exception as error:  # whatever SGLang's changed message makes of the stub
        return [f"the metadata message no longer round-trips: {error!r}"]
    if prefill._peer_generations != {room: {session: generation}}:
        return [f"the room and session are no longer frames 0 and 3: read {prefill._peer_generations}, "
                f"message {message}"]
    if read != message or (info.room, info.mooncake_session_id) != (room, session):
        return [f"the message is not Mooncake's again once the generation is off: {read}"]
    if info.decode_prefix_len != 8:  # the decode cache's promise reaches the prefill side
        return [f"decode_prefix_len no longer survives the generation frame: parsed {info.decode_prefix_len}"]
    return []


SPECIFIC_CHECKS = {METADATA_PARSER: metadata_message_problems}


def engine_calls() -> list[str]:
    """The methods Mooncake's KV manager (its whole class hierarchy) calls on ``self.engine``."""
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVManager

    files = {inspect.getsourcefile(klass) for klass in MooncakeKVManager.__mro__[:-1]}
    return sorted({method for file in files for method in re.findall(r"self\.engine\.(\w+)\(", Path(file).read_text())})


def torch_namespaces() -> dict[str, object]:
    """torch's attributes (submodules left out: they appear as they are imported) and torch.Tensor's
    (inherited ones included, unbound), by dotted name."""
    functions = {f"torch.{name}": value for name, value in vars(torch).items() if not inspect.ismodule(value)}
    methods = {f"torch.Tensor.{name}": inspect.getattr_static(torch.Tensor, name) for name in dir(torch.Tensor)}
    return functions | methods


def registry_entries(hook_registry) -> dict[str, object]:
    """Each registry and enum the project adds to: what it holds now."""
    from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES
    from sglang.srt.disaggregation.utils import TransferBackend
    from sglang.srt.mem_cache.registry import registered_radix_cache_backends

    return {
        "sglang.srt.plugins.load_plugins": {source.plugin_name for hooks in hook_registry._hooks.values()
                                            for _, _, source in hooks if source is not None},
        "sglang.srt.mem_cache.registry.register_radix_cache_backend": registered_radix_cache_backends(),
        "sglang.srt.arg_groups.choices.add_disagg_transfer_backend_choices": DISAGG_TRANSFER_BACKEND_CHOICES,
        "sglang.srt.disaggregation.utils.TransferBackend": TransferBackend.__members__,
    }


def applied_problems(seam: Seam, before: object, hook_registry, entries: dict[str, object],
                     stand_in_expected: bool) -> list[str]:
    """What the loaded plugin should have changed for this seam and did not."""
    if seam.kind == "hook" or (seam.kind == "monkey-patch" and not torch.cuda.is_available()):
        if seam.kind == "hook" and seam.target not in hook_registry._patched:
            return ["HookRegistry did not apply it (SGLang logs 'Failed to apply hooks to' and carries on)"]
        if _function(resolve(seam)) is _function(before):
            return ["it is still SGLang's own after the plugin loaded"]
    if seam.kind == "import-stand-in" and stand_in_expected:
        stand_in = sys.modules.get("vllm._custom_ops")
        if not (stand_in and (stand_in.__doc__ or "").startswith("pfs_kernels import stand-in")):
            return ["no vllm._custom_ops stand-in after the plugin loaded"]
    if seam.entry:
        if seam.target not in entries:
            return ["seam_probe.registry_entries cannot read this registry"]
        if seam.entry not in entries[seam.target]:
            return [f"it has no entry {seam.entry!r} after the plugin loaded"]
    return []


def _function(target: object) -> object:
    """A classmethod's function (each lookup binds a new method object), else the target itself."""
    return getattr(target, "__func__", target)


def main(out: Path) -> None:
    problems: dict[int, list[str]] = {}
    before: dict[int, object] = {}
    for index, seam in enumerate(SEAMS):
        try:
            before[index] = target = resolve(seam)
        except SeamNotFound as error:
            problems[index] = [f"not in the installed SGLang: {error.__cause__}"]
            continue
        problems[index] = owner_problems(seam, target) + (parameter_problems(seam, target) if seam.parameters else [])
        if seam.target in SPECIFIC_CHECKS:
            problems[index] += SPECIFIC_CHECKS[seam.target]()
        elif seam.kind == "wire-format":
            problems[index].append("seam_probe.SPECIFIC_CHECKS has no check for it")
        if seam.kind == "source-read" and target.__module__ != seam.target.rpartition(".")[0]:
            problems[index].append(f"it is defined in {target.__module__} now, which the router does not read")

    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    torch_before = torch_namespaces()
    stand_in_expected = not torch.cuda.is_available() and importlib.util.find_spec("vllm") is None
    load_plugins()  # SGLang's own start: runs the entry point, then HookRegistry.apply_hooks()
    entries = registry_entries(HookRegistry)
    for index, seam in enumerate(SEAMS):
        if index in before:
            problems[index] += applied_problems(seam, before[index], HookRegistry, entries, stand_in_expected)
        if seam.kind == "hook" and seam.hook_type not in {hook_type.value for hook_type in HookType}:
            problems[index].append(f"SGLang has no hook type {seam.hook_type!r}")
    registered = sorted([target, f"{hook.__module__}.{hook.__qualname__}", hook_type.value]
                        for target, hooks in HookRegistry._hooks.items()
                        for hook_type, hook, source in hooks if source is not None and source.plugin_name == PLUGIN)
    torch_after = torch_namespaces()
    torch_patched = sorted(name for name, value in torch_after.items() if torch_before.get(name) is not value)
    out.write_text(json.dumps({
        "cuda": torch.cuda.is_available(),
        "problems": {str(index): found for index, found in problems.items()},
        "registered_hooks": registered,
        "torch_patched": torch_patched,
        "engine_calls": engine_calls(),
    }, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
