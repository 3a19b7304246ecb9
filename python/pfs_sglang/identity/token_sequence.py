"""What turns a request into token ids, compared between prefill and decode (invariant 4).

The prefill server tokenizes a request with the base's files, each decode server with
its own model's files. If the two disagree the decode module reads KV of a different
token sequence than the one it extends, and answers fluent garbage with no error. So
a decode module must match the prefill module in everything that decides the token
sequence, read from the model directory as SGLang (transformers) reads it:

- ``tokenizer``: the whole ``tokenizer.json`` pipeline (normalizer, pre-tokenizer,
  merges, post-processor, added tokens and their flags), as the tokenizers library
  re-serialises it, hashed;
- ``special_tokens``: bos/eos/pad/unk/... and ``add_bos_token``-style switches from
  ``tokenizer_config.json`` and ``special_tokens_map.json``;
- ``chat_template``: the effective template (``chat_template.jinja``, else
  ``chat_template.json``, else ``tokenizer_config.json``'s), hashed;
- ``stop_token_ids``: bos/eos/pad ids of ``config.json`` and ``generation_config.json``
  (where generation stops, so what a later turn's prompt holds).

Sampling defaults in ``generation_config.json`` (temperature, top_p...) are a decode
model's own choice and are not compared. These fields sit beside the fingerprint
rather than in it, so fingerprint digests (cache namespaces, recorded identities) stay
what they were; the trainer records them too (``prefill_token_sequence``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TOKEN_SEQUENCE_FIELDS = ("tokenizer", "special_tokens", "chat_template", "stop_token_ids")

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token",
                       "additional_special_tokens", "add_bos_token", "add_eos_token", "add_prefix_space", "legacy",
                       "do_lower_case")
_STOP_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
_NO_TEMPLATE = "none"


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _json_file(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _tokenizer_pipeline(model_dir: Path) -> str:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    pipeline = json.loads(Tokenizer.from_file(str(path)).to_str())
    for key in ("truncation", "padding"):  # per-call settings, not what a text encodes to
        pipeline.pop(key, None)
    return _sha(_canonical(pipeline))


def _special_tokens(model_dir: Path) -> str:
    sources = {name: _json_file(model_dir / name) for name in ("tokenizer_config.json", "special_tokens_map.json")}
    return _canonical({name: {key: data[key] for key in _SPECIAL_TOKEN_KEYS if key in data}
                       for name, data in sources.items()})


def chat_template_source(model_dir: str | Path) -> tuple[str, str] | None:
    """The effective chat template and the file it comes from, or ``None``."""
    model_dir = Path(model_dir)
    for name in _CHAT_TEMPLATE_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text(), name
        template = json.loads(path.read_text()).get("chat_template")
        if template:  # a string, or a list of named templates
            return (template if isinstance(template, str) else _canonical(template)), name
    return None


def _chat_template(model_dir: Path) -> str:
    found = chat_template_source(model_dir)
    return _NO_TEMPLATE if found is None else _sha(found[0])


def _stop_token_ids(model_dir: Path) -> str:
    sources = {name: _json_file(model_dir / name) for name in ("config.json", "generation_config.json")}
    return _canonical({name: {key: data[key] for key in _STOP_ID_KEYS if data.get(key) is not None}
                       for name, data in sources.items()})


def token_sequence_of(model_dir: str | Path) -> dict[str, str]:
    """The token-sequence fields of a model directory (see the module docstring)."""
    model_dir = Path(model_dir)
    return {
        "tokenizer": _tokenizer_pipeline(model_dir),
        "special_tokens": _special_tokens(model_dir),
        "chat_template": _chat_template(model_dir),
        "stop_token_ids": _stop_token_ids(model_dir),
    }
