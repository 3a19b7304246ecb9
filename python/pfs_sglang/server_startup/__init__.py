"""Hooks on an SGLang server's own start-up, inside its HTTP process (registered by the plugin).

Kept apart from ``pfs_sglang.launch`` (the launcher, which imports the router): a module
here imports nothing of the project's, so loading the plugin in an SGLang process does
not import the router, and with it ``prometheus_client``, before SGLang sets
``PROMETHEUS_MULTIPROC_DIR`` (a ``prometheus_client`` imported earlier keeps every
metric in-process, where the server's ``/metrics`` never sees it).
"""
