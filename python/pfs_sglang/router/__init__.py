"""The router: one OpenAI/SGLang endpoint, every request to the shared prefill pool and
to the named model's decode pool (prefix locality across models, least-loaded within)."""

from pfs_sglang.router.app import RouterConfig, build_router_app

__all__ = ["RouterConfig", "build_router_app"]
