"""Accuracy through the served path (issue 25): ``eval --url`` gives the offline evaluation's answers.

The tests that count send a held-out set of a task a demo decode module was trained on
(32 rows, ``corpus.task_rows``; once also another task's, which the module gets wrong)
to a shared deployment of ``conftest.py``, score it with ``served_eval.served_exact_match``
and offline with ``evaluate.exact_match`` (transformers: the base's KV of ``prompt[:-1]``,
the decode module from ``prompt[-1]``), and require the same answer for every example, not just the
same accuracy (invariant 5: greedy, float32). The full-weight demo decode modules run on
the PD demo deployment (``demo_deployment``), the demo's LoRA decode modules on the
unified server (``unified_deployment``: page size 4, 32-token chunks, SGLang's retraction
switch on). One PD task also goes through the command line (``python -m pfs_sglang.train
eval DATA --url URL --served-model NAME``).

A stub HTTP server (no engine) checks the client alone, fast: every request carries the
offline evaluation's prompt ids, greedy, its ``max_new_tokens`` and stop token; answers
are cut at the stop token; and each way the deployment can fail (unreachable, unknown
model, refused key, refused request) is a ``ServedEvalError`` that says so.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import UNIFIED_DEMO_LORA
from pfs_sglang.bench.server_state import wait_deployment_idle
from pfs_sglang.launch.processes import free_port
from pfs_sglang.models import DEMO_DECODE_MODULES
from pfs_sglang.models.demo import ASSETS
from pfs_sglang.train.__main__ import main
from pfs_sglang.train.corpus import task_rows, write_jsonl
from pfs_sglang.train.data import load_examples
from pfs_sglang.train.evaluate import exact_match
from pfs_sglang.train.served_eval import ServedEvalError, ServedModel, served_exact_match

HELD_OUT_ROWS = 32
BASE_TOKENIZER = ASSETS / "base"


def held_out(directory: Path, task: str, rows: int = HELD_OUT_ROWS) -> Path:
    """A held-out set of ``task`` (its own seed: not the rows the demo modules were trained on)."""
    return write_jsonl(task_rows(task, rows, random.Random(f"served-eval-{task}")), directory / f"{task}.test.jsonl")


def assert_same_answers(served, offline) -> None:
    differ = [(index, s, o) for index, (s, o) in enumerate(zip(served.answers, offline.answers)) if s != o]
    assert not differ and len(served.answers) == len(offline.answers), \
        f"served != offline at (example, served, offline): {differ[:5]}"
    assert (served.correct, served.total) == (offline.correct, offline.total)


# The tests that count: real deployments.

# Each demo decode module on its task, and one on another task's questions (wrong answers,
# which must be wrong the same way on both paths).
PD_CASES = [(task, task) for task in DEMO_DECODE_MODULES] + [("transform", "extract")]


@pytest.mark.parametrize(("model", "task"), PD_CASES)
def test_pd_deployment_answers_as_the_offline_evaluation(demo_deployment, demo_models, tmp_path, model, task):
    data = held_out(tmp_path, task)
    offline = exact_match(demo_models.decode[model], data, prefill_dir=demo_models.base)
    served = served_exact_match(ServedModel(demo_deployment.url, model), data)  # tokenizer: the decode server's
    assert_same_answers(served, offline)
    if model == task:
        assert offline.accuracy >= 0.9, offline.mistakes  # the module does its task: real answers were compared
    else:
        assert offline.accuracy < 0.5, offline.mistakes
    wait_deployment_idle(demo_deployment.url, timeout_s=60)


def test_eval_url_command_prints_the_offline_accuracy(demo_deployment, demo_models, tmp_path, capsys):
    data = held_out(tmp_path, "compute")
    offline = exact_match(demo_models.decode["compute"], data, prefill_dir=demo_models.base)
    assert main(["eval", str(data), "--url", demo_deployment.url, "--served-model", "compute",
                 "--concurrency", "4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["setting"] == "served" and printed["model"] == "compute"
    assert (printed["correct"], printed["total"]) == (offline.correct, offline.total)


@pytest.mark.server  # the unified server is not one of conftest's SHARED_SERVERS
@pytest.mark.parametrize("task", UNIFIED_DEMO_LORA)
def test_unified_deployment_answers_as_the_offline_evaluation(unified_deployment, tmp_path, task):
    models, url = unified_deployment.models, unified_deployment.deployment.url
    data = held_out(tmp_path, task)
    offline = exact_match(models.decode[task], data, prefill_dir=models.base)  # the adapter merged into the base
    served = served_exact_match(ServedModel(url, task), data, tokenizer_dir=models.base)
    assert_same_answers(served, offline)
    assert offline.accuracy >= 0.9, offline.mistakes
    wait_deployment_idle(url, timeout_s=60)


# The client alone, against a stub of the router's HTTP API.

@dataclass
class Stub:
    """What the stub serves and what it was sent."""

    model: str
    tokenizer_path: str
    answers: dict[tuple[int, ...], list[int]]  # prompt ids -> output ids
    api_key: str | None = None
    refuse_generate: bool = False
    bodies: list[dict] = field(default_factory=list)


def _handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if stub.api_key is None or self.headers.get("Authorization") == f"Bearer {stub.api_key}":
                return True
            self._reply(401, {"error": {"message": "Incorrect or missing API key", "code": "invalid_api_key"}})
            return False

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/v1/models":
                self._reply(200, {"object": "list", "data": [{"id": stub.model}]})
            elif self.path == f"/v1/models/{stub.model}":
                self._reply(200, {"id": stub.model})
            elif self.path == f"/models/{stub.model}/get_model_info":
                self._reply(200, {"model_path": stub.tokenizer_path, "tokenizer_path": stub.tokenizer_path})
            else:
                self._reply(404, {"error": {"message": f"The model '{self.path}' does not exist"}})

        def do_POST(self) -> None:
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.bodies.append(body)
            if stub.refuse_generate:
                self._reply(400, {"error": {"message": "the prompt is too long"}})
            else:
                self._reply(200, {"text": "", "output_ids": stub.answers[tuple(body["input_ids"])], "meta_info": {}})

    return Handler


@pytest.fixture
def stub_server() -> Iterator[tuple[str, Stub]]:
    stub = Stub(model="stub", tokenizer_path=str(BASE_TOKENIZER), answers={})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", stub
    finally:
        server.shutdown()
        server.server_close()


def test_requests_carry_the_offline_prompt_ids_and_answers_stop_at_the_end_token(stub_server, tmp_path):
    url, stub = stub_server
    tokenizer = AutoTokenizer.from_pretrained(BASE_TOKENIZER)
    data = held_out(tmp_path, "transform", rows=6)
    examples = load_examples(data, tokenizer)
    eos = tokenizer.eos_token_id
    for index, example in enumerate(examples):
        answer = "WRONG" if index == 2 else example.answer
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        stub.answers[tuple(example.prompt_ids)] = ids + [eos] + ids  # what follows the stop token is not the answer
    result = served_exact_match(ServedModel(url, "stub"), data, max_new_tokens=12, concurrency=3)
    assert result.answers == [("WRONG" if index == 2 else example.answer) for index, example in enumerate(examples)]
    assert (result.correct, result.total) == (5, 6)
    assert result.mistakes[0]["expected"] == examples[2].answer and result.mistakes[0]["got"] == "WRONG"
    assert sorted(tuple(body["input_ids"]) for body in stub.bodies) == sorted(tuple(e.prompt_ids) for e in examples)
    for body in stub.bodies:
        assert body["model"] == "stub"
        assert body["sampling_params"] == {"max_new_tokens": 12, "temperature": 0, "stop_token_ids": [eos]}


def test_each_refusal_is_an_error_that_says_why(stub_server, tmp_path, capsys):
    url, stub = stub_server
    data = held_out(tmp_path, "extract", rows=2)
    with pytest.raises(ServedEvalError, match=r"does not serve 'other'; it serves \['stub'\]"):
        served_exact_match(ServedModel(url, "other"), data)
    with pytest.raises(ServedEvalError, match="cannot reach the deployment"):
        served_exact_match(ServedModel(f"http://127.0.0.1:{free_port()}", "stub"), data)
    stub.refuse_generate = True
    with pytest.raises(ServedEvalError, match="/generate refused .*HTTP 400: the prompt is too long"):
        served_exact_match(ServedModel(url, "stub"), data)
    stub.api_key = "secret"
    with pytest.raises(ServedEvalError, match="refused the API key"):
        served_exact_match(ServedModel(url, "stub"), data)
    assert main(["eval", str(data), "--url", url, "--served-model", "stub", "--api-key", "wrong"]) == 1
    assert "refused the API key" in capsys.readouterr().err
    assert main(["eval", str(data), "--url", url, "--served-model", "stub", "--model", str(BASE_TOKENIZER)]) == 2
