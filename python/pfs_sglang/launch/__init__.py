"""Starting a deployment: topology (flags/YAML), SGLang command lines, child processes."""

from pfs_sglang.launch.deployment import Deployment, check_decode_models
from pfs_sglang.launch.processes import LaunchError
from pfs_sglang.launch.topology import DecodeModelSpec, Topology

__all__ = ["DecodeModelSpec", "Deployment", "LaunchError", "Topology", "check_decode_models"]
