"""The router: one OpenAI/SGLang endpoint, every request to the shared prefill pool and
to the named model's decode pool (prefix locality across models, least-loaded within)."""

from pfs_sglang.router.app import RouterConfig, build_router_app
from pfs_sglang.router.pools import DecodePool, PrefillWorker, Worker

__all__ = ["DecodePool", "PrefillWorker", "RouterConfig", "Worker", "build_router_app"]
