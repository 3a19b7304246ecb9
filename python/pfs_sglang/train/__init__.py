"""Cache-conditioned fine-tuning: train decode modules against a frozen prefill module.

The same prefill/decode split as serving (invariant 2): the frozen base computes the
KV of ``prompt[:-1]``; the decode module runs ``prompt[-1]`` and the completion on top
of it and learns only from the completion. Trained modules record the base's
fingerprint (invariant 4). Parts, one responsibility each:

- ``data``: JSONL rows -> tokenized (prompt, completion) examples, errors name the line
- ``collate``: the padded prefix/decode-segment batch (masks, positions, targets)
- ``objective``: the cache-conditioned, own-KV and language-model forwards and the loss
- ``trainer``: transformers ``Trainer`` (full or PEFT LoRA), outputs and the record
- ``evaluate``: greedy exact match with prompt KV from a chosen model (settings i-iii)
- ``served_eval``: the same exact match through a running deployment (``eval --url``)
- ``corpus``: the synthetic multi-task corpus of the replication
- ``report``: the replication's and the sweep's markdown tables and charts
- ``replicate``: the small-scale replication pipeline (``--served``: its PrefillShare arms
  also scored through deployments), and the demo-model export
- ``sweep``: the (i) - (ii) gap over base capacity and training budget, in worker processes
- ``__main__``: the CLI (``python -m pfs_sglang.train``)
"""
