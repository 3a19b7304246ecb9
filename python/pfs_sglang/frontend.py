"""SGLang frontend programs over a PrefillShare router, on one or several decode models.

SGLang's ``RuntimeEndpoint`` talks to one server, so a program runs on one model. The
router serves each model's endpoints under ``/models/{model}/``, so a stock
``RuntimeEndpoint`` pointed there runs a program on that model, with ``gen``,
``select``, ``fork``, ``join`` and streaming unchanged. ``PrefillShareBackend`` holds
one such endpoint per model (each reads ``/get_model_info`` once) and switches a running
program between them::

    pfs = PrefillShareBackend("http://127.0.0.1:30000")

    @sgl.function
    def pipeline(s, record):
        s += record                                  # one context ...
        pfs.use(s, "extract")
        s += "city: " + sgl.gen("city", max_tokens=8)
        pfs.use(s, "compute")                        # ... read by another model
        s += "total: " + sgl.gen("total", max_tokens=8)

    pipeline.run(record=..., backend=pfs.endpoint("extract"))

Every model's requests go through the one prefill module, so the context they share
is prefilled once and read from the shared prefix tree by each (invariant 3): the
second model's ``meta_info["cached_tokens"]`` counts it. Forks inherit the model of the
state they were forked from; ``use`` on a fork changes that fork only.
"""

from __future__ import annotations

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.interpreter import ProgramState


class PrefillShareBackend:
    """One ``RuntimeEndpoint`` per decode model of a router, made when first used."""

    def __init__(self, router_url: str, api_key: str | None = None):
        self.router_url = router_url.rstrip("/")
        self.api_key = api_key
        self._endpoints: dict[str, RuntimeEndpoint] = {}

    def endpoint(self, model: str) -> RuntimeEndpoint:
        """The backend that runs a program (or its next calls) on ``model``.

        Raises ``RuntimeError`` naming the model when the router does not serve it (its 404).
        """
        if model not in self._endpoints:
            self._endpoints[model] = RuntimeEndpoint(f"{self.router_url}/models/{model}", api_key=self.api_key)
        return self._endpoints[model]

    def use(self, state: ProgramState, model: str) -> None:
        """Send ``state``'s next calls to ``model``.

        Waits for the calls already queued on ``state`` (they run on the model they were
        queued for), so a program that switches models runs its calls in order.
        """
        backend = self.endpoint(model)
        executor = state.stream_executor
        executor.sync()
        executor.backend = backend
