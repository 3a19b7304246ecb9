"""The seam table (``pfs_sglang.seams``) against the installed SGLang, with no server.

Every entry resolves, with the parameters the project relies on and the project's side
still in place; every hook the plugin registers is in the table and applied once SGLang
loads the plugin; every registry entry, patch and stand-in is there. So an SGLang upgrade
that renames a target fails here, in seconds, with the target's name, instead of
dropping an invariant that only the slow oracle tests notice (``HookRegistry.apply_hooks``
only logs a target it cannot find). The checks run in one fresh process
(``seam_probe.py``: loading the plugin patches SGLang for the rest of a process), from
one test, so parallel workers do not each import SGLang for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pfs_sglang.seams import SEAMS


def run_probe(out: Path) -> dict:
    env = {**os.environ, "SGLANG_PLUGINS": "pfs_sglang"}  # this project's plugin only
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("seam_probe.py")), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(out.read_text())


def seam_failures(probe: dict) -> list[str]:
    return [f"{seam.target} ({seam.kind}, relied on by {seam.owner}): {problem}"
            for index, seam in enumerate(SEAMS) for problem in probe["problems"][str(index)]]


def hook_failures(probe: dict) -> list[str]:
    in_table = {(seam.target, seam.owner, seam.hook_type) for seam in SEAMS if seam.kind == "hook"}
    registered = {tuple(hook) for hook in probe["registered_hooks"]}
    return ([f"{target}: the plugin hooks it ({hook_type} {hook}) but the seam table has no such hook"
             for target, hook, hook_type in sorted(registered - in_table)]
            + [f"{target}: a hook in the seam table ({hook_type} {hook}) that the plugin does not register"
               for target, hook, hook_type in sorted(in_table - registered)])


def patch_failures(probe: dict) -> list[str]:
    in_table = set() if probe["cuda"] else {seam.target for seam in SEAMS if seam.kind == "monkey-patch"}
    patched = set(probe["torch_patched"])
    return ([f"{target}: the plugin patches it but the seam table has no such monkey-patch"
             for target in sorted(patched - in_table)]
            + [f"{target}: a monkey-patch in the seam table that the plugin does not make here"
               for target in sorted(in_table - patched)])


def engine_failures(probe: dict) -> list[str]:
    """A method Mooncake starts calling on its engine must exist on the ZMQ engine too."""
    in_table = {seam.target.rpartition(".")[2] for seam in SEAMS if seam.kind == "interface"}
    return [f"MooncakeKVManager calls self.engine.{method}, which is no interface seam in the table"
            for method in probe["engine_calls"] if method not in in_table]


def test_every_seam_holds_in_the_installed_sglang(tmp_path):
    probe = run_probe(tmp_path / "probe.json")
    failures = seam_failures(probe) + hook_failures(probe) + patch_failures(probe) + engine_failures(probe)
    assert not failures, "SGLang seams that no longer hold:\n" + "\n".join(failures)


def test_each_seam_is_listed_once():
    keys = [(seam.kind, seam.target, seam.owner) for seam in SEAMS]
    assert len(keys) == len(set(keys))
