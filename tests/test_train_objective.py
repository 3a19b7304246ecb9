"""Invariant 2 in training: the training forward is the serving forward, padding included."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from pfs_sglang.oracle import prefillshare_greedy
from pfs_sglang.train.collate import IGNORE_INDEX, collate_split
from pfs_sglang.train.corpus import TASKS, CorpusSizes, write_corpus
from pfs_sglang.train.data import load_examples
from pfs_sglang.train.evaluate import greedy_answers, load_model
from pfs_sglang.train.objective import (
    cache_conditioned_logits,
    completion_loss,
    language_model_logits,
    language_model_targets,
    own_kv_logits,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=123, sizes=CorpusSizes(8, 8, 8))


@pytest.fixture(scope="module")
def mixed_examples(demo_models, corpus):
    """Rows of different prompt and completion lengths, so every batch is padded."""
    tokenizer = AutoTokenizer.from_pretrained(demo_models.base)
    examples = [example for task in TASKS for example in load_examples(corpus.test[task], tokenizer)[:2]]
    examples += load_examples(corpus.pretrain, tokenizer)[:2]
    assert len({len(e.prompt_ids) for e in examples}) > 1 and len({len(e.completion_ids) for e in examples}) > 1
    return tokenizer, examples


@torch.no_grad()
def serving_logits(base, decode, example):
    """One sequence, no padding: base KV of prompt[:-1], decode module from prompt[-1]."""
    past = base(torch.tensor([example.prompt_ids[:-1]]), use_cache=True).past_key_values
    return decode(torch.tensor([example.prompt_ids[-1:] + example.completion_ids[:-1]]), past_key_values=past).logits[0]


def test_training_forward_equals_serving_forward(demo_models, mixed_examples):
    tokenizer, examples = mixed_examples
    base, decode = load_model(demo_models.base), load_model(demo_models.decode["extract"])
    with torch.no_grad():
        batched = cache_conditioned_logits(base, decode, collate_split(examples, tokenizer.pad_token_id))
    for row, example in enumerate(examples):
        expected = serving_logits(base, decode, example)
        torch.testing.assert_close(batched[row, : len(example.completion_ids)], expected, atol=1e-4, rtol=1e-4)


def test_own_kv_forward_is_the_split_with_the_model_as_its_own_prefill(demo_models, mixed_examples):
    tokenizer, examples = mixed_examples
    model = load_model(demo_models.decode["compute"])
    batch = collate_split(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        own, split = own_kv_logits(model, batch), cache_conditioned_logits(model, model, batch)
    mask = batch.decode_mask.bool()
    torch.testing.assert_close(own[mask], split[mask], atol=1e-4, rtol=1e-4)


def test_batched_evaluation_matches_the_greedy_oracle(demo_models, mixed_examples):
    tokenizer, examples = mixed_examples
    base, decode = load_model(demo_models.base), load_model(demo_models.decode["transform"])
    answers = greedy_answers(decode, tokenizer, examples, prefill=base, batch_size=4, max_new_tokens=8)
    for example, answer in zip(examples, answers):
        reference = prefillshare_greedy(demo_models.base, demo_models.decode["transform"], example.prompt_ids, 8,
                                        stop_token_ids=(tokenizer.eos_token_id,))
        assert answer == tokenizer.decode(reference.output_ids, skip_special_tokens=True)


def test_language_model_objective_is_next_token_loss_over_whole_rows(demo_models, mixed_examples):
    """Padding aside, the lm targets are every row's tokens shifted by one, prompt included,
    and the batched loss is the loss of each row alone."""
    tokenizer, examples = mixed_examples
    model = load_model(demo_models.base)
    batch = collate_split(examples, tokenizer.pad_token_id)
    targets = language_model_targets(batch)
    for row, example in enumerate(examples):
        sequence = example.prompt_ids + example.completion_ids
        assert targets[row][targets[row] != IGNORE_INDEX].tolist() == sequence[1:]
    with torch.no_grad():
        batched = completion_loss(language_model_logits(model, batch), targets)
        alone = [completion_loss(model(torch.tensor([e.prompt_ids + e.completion_ids[:-1]])).logits,
                                 torch.tensor([(e.prompt_ids + e.completion_ids)[1:]])) for e in examples]
    counts = [len(e.prompt_ids) + len(e.completion_ids) - 1 for e in examples]
    expected = sum(loss * count for loss, count in zip(alone, counts)) / sum(counts)
    torch.testing.assert_close(batched, expected, atol=1e-4, rtol=1e-4)
