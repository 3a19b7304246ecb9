"""pfs_sglang.train data and batching: rows parse, bad rows name their line, padding is exact."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from pfs_sglang.train.__main__ import main as train_main
from pfs_sglang.train.collate import IGNORE_INDEX, collate_split
from pfs_sglang.train.data import DatasetError, load_examples

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(demo_models):
    return AutoTokenizer.from_pretrained(demo_models.base)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_chat_and_prompt_completion_rows(tokenizer, tmp_path):
    chat = {"messages": [{"role": "user", "content": "name: tom\nWhat is the name?"},
                         {"role": "assistant", "content": "tom"}]}
    raw = {"prompt": "name: ana; city: oslo\nWhat is the city?\n", "completion": "oslo"}
    path = write_lines(tmp_path / "rows.jsonl", [json.dumps(chat), "", json.dumps(raw)])
    first, second = load_examples(path, tokenizer)
    expected_prompt = tokenizer.apply_chat_template(chat["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(first.prompt_ids) == expected_prompt
    assert expected_prompt.endswith("<|assistant|>\n")
    assert first.completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(first.completion_ids[:-1]) == "tom" and first.answer == "tom"
    assert tokenizer.decode(second.prompt_ids) == raw["prompt"] and second.answer == "oslo"


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "Expecting property name"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "at least two messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}),
     "last message must be the assistant"),
    (json.dumps({"prompt": "hi"}), "needs 'messages', or string 'prompt' and 'completion'"),
    (json.dumps({"prompt": "h", "completion": "i"}), "at least two tokens"),
    (json.dumps([1, 2]), "must be a JSON object"),
])
def test_malformed_line_is_named(tokenizer, tmp_path, bad_line, message):
    good = json.dumps({"prompt": "name: tom\n", "completion": "tom"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, bad_line, good])
    with pytest.raises(DatasetError, match=rf"bad\.jsonl:3: .*{message}"):
        load_examples(path, tokenizer)


def test_cli_reports_the_bad_line(demo_models, tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "name: tom\n", "completion": "tom"}), "[]"])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: a row must be a JSON object"):
        train_main(["--base", str(demo_models.base), "--data", str(path), "--out", str(tmp_path / "out")])


def test_collate_left_pads_prefixes_and_right_pads_completions(tokenizer, tmp_path):
    rows = [{"prompt": "name: tom; city: oslo\nWhat is the city?\n", "completion": "oslo"},
            {"prompt": "qty: 3\n", "completion": "a longer completion here"}]
    path = write_lines(tmp_path / "rows.jsonl", [json.dumps(row) for row in rows])
    examples = load_examples(path, tokenizer)
    batch = collate_split(examples, tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        prefix_len, completion_len = len(example.prompt_ids) - 1, len(example.completion_ids)
        assert batch.prefix_mask[row].tolist() == [0] * (batch.prefix_ids.shape[1] - prefix_len) + [1] * prefix_len
        assert batch.prefix_ids[row][batch.prefix_mask[row].bool()].tolist() == example.prompt_ids[:-1]
        assert batch.prefix_positions[row][batch.prefix_mask[row].bool()].tolist() == list(range(prefix_len))
        assert batch.decode_ids[row, :completion_len].tolist() == example.prompt_ids[-1:] + example.completion_ids[:-1]
        assert batch.decode_positions[row, :completion_len].tolist() == \
            list(range(prefix_len, prefix_len + completion_len))
        targets = batch.target_ids[row].tolist()
        assert targets[:completion_len] == example.completion_ids
        assert set(targets[completion_len:]) <= {IGNORE_INDEX}
