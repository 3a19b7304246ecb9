"""The request fields SGLang knows, per endpoint, read from SGLang's own source.

The router refuses a request field no SGLang request type has (a misspelled
``max_token`` would otherwise be dropped silently, by SGLang as by pydantic), so the
lists must be SGLang's exactly: the fields of ``ChatCompletionRequest`` and
``CompletionRequest`` (OpenAI endpoints), ``GenerateReqInput`` (``/generate``) and
``SamplingParams`` (its ``sampling_params``); ``request_body.py`` says which endpoint
takes which. Importing those modules would cost the
router seconds and torch (hundreds of MB), and their fields are plain class
annotations, so they are read with ``ast`` from the installed SGLang's files, bases
within those files included. ``tests/test_router_unknown_fields.py`` compares the
result with the imported classes.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

# The SGLang files holding the request types.
_SOURCES = ("srt/entrypoints/openai/protocol.py", "srt/managers/io_struct.py", "srt/sampling/sampling_params.py")


def _sglang_root() -> Path:
    spec = importlib.util.find_spec("sglang")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SGLang is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _classes() -> dict[str, ast.ClassDef]:
    root = _sglang_root()
    classes: dict[str, ast.ClassDef] = {}
    for source in _SOURCES:
        tree = ast.parse((root / source).read_text(), filename=str(root / source))
        classes.update({node.name: node for node in tree.body if isinstance(node, ast.ClassDef)})
    return classes


@cache
def fields_of(name: str) -> frozenset[str]:
    """The fields of SGLang's class ``name``: its annotated attributes and its bases' in the same files."""
    node = _classes()[name]
    fields = {statement.target.id for statement in node.body
              if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
              and not statement.target.id.startswith("_") and "ClassVar" not in ast.unparse(statement.annotation)}
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in _classes():
            fields |= fields_of(base.id)
    return frozenset(fields)
