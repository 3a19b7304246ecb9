"""pfs_sglang: PrefillShare on SGLang.

One frozen prefill module computes every prompt's KV once; many task decode modules
consume it. Parts (see docs/DESIGN.md for the invariants):

* ``identity``  fingerprints of a prefill module, decode-module records (invariant 4)
* ``models``    the offline tokenizer and the embedded demo models
* ``plugin``    what SGLang loads in each of its processes (registers everything below)
* ``transfer``  the ``zmq`` KV transfer backend and per-request transfer figures
* ``cache``     the prefill tree keyed on the prefill module (invariant 3)
* ``decode``    decode-server hooks: the decode module computes prompt[k:] (invariant 2)
* ``router``    the OpenAI/SGLang router; ``launch`` and ``launch_server`` start a deployment
* ``train``     cache-conditioned fine-tuning, evaluation and the replication
* ``oracle``    the transformers reference of the greedy oracle (invariant 5)
"""

__version__ = "0.1.0"
