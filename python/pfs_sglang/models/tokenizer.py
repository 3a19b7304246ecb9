"""An offline byte-level BPE tokenizer for the embedded demo models (no model hub).

Trained with `tokenizers` on a small deterministic corpus, it can encode any text
(the 256 byte symbols are always in the vocabulary) and carries the chat template
and special tokens that SGLang and transformers read from ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_TOKENS

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to in on for with from by and or not is are was be has have it this that "
    "record records field value name city country year price total count sum number list "
    "question answer user assistant system context document agent task model plan code "
    "what which who when where how many much first last next upper lower reverse extract "
    "compute transform order item items id date status open closed red green blue small large"
).split()


def training_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Deterministic text covering words, digits, punctuation and both letter cases."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        if rng.random() < 0.3:
            words = [w.upper() if rng.random() < 0.3 else w.capitalize() for w in words]
        corpus.append(" ".join(words) + rng.choice([".", "?", "!", ":", ",", ";", ""]))
    return corpus


def build_tokenizer(vocab_size: int = 512, seed: int = 0, extra_text: Sequence[str] = ()) -> Tokenizer:
    """Train the BPE merges on the generic corpus plus ``extra_text`` (e.g. a task corpus)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(seed) + list(extra_text), trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, model_dir: Path, max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tokenizer.save(str(model_dir / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        **specials,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (model_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
