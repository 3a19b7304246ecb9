"""A field no SGLang request type has is refused with 400 and the nearest known name;
every field SGLang knows still passes. The field lists are read from SGLang's source
(``router/sglang_fields.py``): here they are compared with the imported classes."""

from __future__ import annotations

import dataclasses

import pytest

from pfs_sglang.router.sglang_fields import fields_of
from test_router import chat, cluster


def test_the_fields_read_from_source_are_the_imported_classes_fields():
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    assert fields_of("ChatCompletionRequest") == set(ChatCompletionRequest.model_fields)
    assert fields_of("CompletionRequest") == set(CompletionRequest.model_fields)
    assert fields_of("GenerateReqInput") == {field.name for field in dataclasses.fields(GenerateReqInput)}
    assert fields_of("SamplingParams") == set(SamplingParams.__struct_fields__)


@pytest.mark.parametrize("path, body, param, hint", [
    ("/v1/chat/completions", chat("coder", "hi", max_token=4), "max_token", "max_tokens"),
    ("/v1/chat/completions", chat("coder", "hi", temprature=0.5), "temprature", "temperature"),
    ("/v1/completions", {"model": "coder", "prompt": "hi", "stream_option": {}}, "stream_option", "stream_options"),
    ("/generate", {"model": "coder", "text": "hi", "sampling_param": {}}, "sampling_param", "sampling_params"),
    ("/generate", {"model": "coder", "text": "hi", "sampling_params": {"max_new_token": 4}},
     "sampling_params.max_new_token", "sampling_params.max_new_tokens"),
    ("/generate", {"model": "coder", "text": "hi", "sampling_params": [{"top_p": 1}, {"topk": 2}]},
     "sampling_params.topk", "sampling_params.top_k"),
])
def test_an_unknown_field_is_400_with_the_nearest_known_name(path, body, param, hint):
    with cluster(decode_counts={"coder": 1}) as c:
        reply = c.post(path, body)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == param and error["code"] == "unknown_parameter"
        assert f"Unrecognized request argument supplied: '{param}'; did you mean '{hint}'?" == error["message"]
        assert not c.prefill[0].bodies and not c.decode["coder"][0].bodies


def test_sglang_extensions_pass():
    with cluster(decode_counts={"coder": 1}) as c:
        for path, body in [
            ("/v1/chat/completions", chat("coder", "hi", ignore_eos=True, regex="[a-z]+", separate_reasoning=False,
                                          chat_template_kwargs={}, rid="r1", top_k=3, min_p=0.1)),
            ("/v1/completions", {"model": "coder", "prompt": "hi", "ignore_eos": True, "no_stop_trim": True}),
            ("/generate", {"text": "hi", "return_logprob": True, "lora_path": None, "stream": False,
                           "sampling_params": {"max_new_tokens": 2, "stop_token_ids": [1], "json_schema": None}}),
        ]:
            assert c.post(path, body).status_code == 200, (path, body)
