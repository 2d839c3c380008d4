"""A text classifier updated continually with `retain update`: a small HuggingFace BERT, offline.

The task is synthetic but learnable, generated here (no download): 6 topics, each with its own
12 words; a sentence is 4-16 words, about 60% from its topic and the rest from 24 shared filler
words. Chunk t brings the topics {2t, 2t+1} (class-incremental: new classes per chunk, 3 chunks).
Tokenisation is a word vocabulary built in this file ([PAD]=0, [CLS]=1); batches are padded to
their longest sentence (dynamic padding) by `COLLATE_FN`, which returns what HuggingFace
collators return: a dict of `input_ids`, `attention_mask` and `labels`. The model is
`BertForSequenceClassification` built from a small `BertConfig` (random init, no weights
fetched), a plain `nn.Module` to retain: its state folder stores its weights, and `model_fn()`
rebuilds it for the next update and for `retain evaluate`. Needs the hf extra
(`pip install -e '.[hf]'` from a clone; `make test` installs it).

    RETAIN_CHUNK=0 retain update --config examples/text_config.py --output-state state/t0
    RETAIN_CHUNK=1 retain update --config examples/text_config.py --input-state state/t0 --output-state state/t1
    RETAIN_CHUNK=2 retain update --config examples/text_config.py --input-state state/t1 --output-state state/t2
    retain evaluate --config examples/text_config.py --state state/t2        # all 6 topics
    RETAIN_TEST_CHUNKS=0 retain evaluate --config examples/text_config.py --state state/t2   # topics 0, 1

`RETAIN_METHOD=er` / `RETAIN_METHOD=finetune` switch the method and its options (the default is
DER++); `RETAIN_TRAIN_ITEMS` sets the sentences per topic (default 150; the test uses fewer to run
in seconds) and `RETAIN_EPOCHS` the epochs per update (default 3).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.utils.data import Dataset

NUM_TOPICS = 6
TOPICS_PER_CHUNK = 2
TOPIC_WORDS = 12
FILLER_WORDS = 24
PAD, CLS = 0, 1

METHOD = os.environ.get("RETAIN_METHOD", "derpp")
_TRAINING = {"batch_size": 16, "max_epochs": int(os.environ.get("RETAIN_EPOCHS", "3")), "accelerator": "cpu",
             "progress_bar": False, "seed": 0}
_REPLAY = {"memory_size": 120, "memory_batch_size": 16, "loss_normalization": 0}
UPDATER_OPTIONS = {
    "finetune": _TRAINING,
    "er": {**_TRAINING, **_REPLAY, "alpha": 1.0},
    "derpp": {**_TRAINING, **_REPLAY, "alpha": 0.3, "beta": 1.0},
}[METHOD]


def vocabulary() -> dict[str, int]:
    """Word -> token id: [PAD], [CLS], the filler words, then each topic's words."""
    words = ["[PAD]", "[CLS]"] + [f"filler{i}" for i in range(FILLER_WORDS)]
    words += [f"topic{t}_word{i}" for t in range(NUM_TOPICS) for i in range(TOPIC_WORDS)]
    return {w: i for i, w in enumerate(words)}


VOCAB = vocabulary()


def tokenize(sentence: str) -> Tensor:
    """Token ids of a sentence: [CLS] then one id per word (offline, no tokenizer files)."""
    return torch.tensor([CLS] + [VOCAB[w] for w in sentence.split()], dtype=torch.long)


def sentences(topic: int, n: int, seed: int) -> list[str]:
    """``n`` sentences of ``topic``, drawn at ``seed``."""
    g = torch.Generator().manual_seed(seed * 1000 + topic)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 17, (1,), generator=g))
        from_topic = torch.rand(length, generator=g) < 0.6
        topic_ids = torch.randint(0, TOPIC_WORDS, (length,), generator=g)
        filler_ids = torch.randint(0, FILLER_WORDS, (length,), generator=g)
        words = [
            f"topic{topic}_word{int(t)}" if keep else f"filler{int(f)}"
            for keep, t, f in zip(from_topic.tolist(), topic_ids, filler_ids, strict=True)
        ]
        out.append(" ".join(words))
    return out


class TopicSentences(Dataset):
    """Items ``{"input_ids": (L,) long, "labels": topic}`` of variable length L."""

    def __init__(self, topics: list[int], per_topic: int, seed: int) -> None:
        self.items = [(tokenize(s), t) for t in topics for s in sentences(t, per_topic, seed)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor | int]:
        ids, label = self.items[i]
        return {"input_ids": ids, "labels": label}


def collate(items: list[dict[str, Tensor | int]]) -> dict[str, Tensor]:
    """Dynamic padding: the batch is padded to its longest sentence with [PAD] (mask 0)."""
    longest = max(int(item["input_ids"].shape[0]) for item in items)  # type: ignore[union-attr]
    ids = torch.full((len(items), longest), PAD, dtype=torch.long)
    for row, item in enumerate(items):
        seq = item["input_ids"]
        ids[row, : seq.shape[0]] = seq  # type: ignore[union-attr]
    labels = torch.tensor([int(item["labels"]) for item in items])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


COLLATE_FN = collate


def model_fn() -> torch.nn.Module:
    """A 2-layer, 32-wide BERT for the 6 topics, built from a config (nothing downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=NUM_TOPICS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.1,  # BERT's 0.02 is for width 768: at width 32 such a model collapses after one chunk
    )  # fmt: skip
    return BertForSequenceClassification(config)


def optimizer_fn(params):
    return torch.optim.AdamW(params, lr=1e-3)


def _chunk_topics(chunk: int) -> list[int]:
    if not 0 <= chunk < NUM_TOPICS // TOPICS_PER_CHUNK:
        raise ValueError(f"RETAIN_CHUNK must lie in [0, {NUM_TOPICS // TOPICS_PER_CHUNK - 1}], got {chunk}")
    return list(range(chunk * TOPICS_PER_CHUNK, (chunk + 1) * TOPICS_PER_CHUNK))


def train_dataset_fn() -> Dataset:
    chunk = int(os.environ.get("RETAIN_CHUNK", "0"))
    return TopicSentences(_chunk_topics(chunk), int(os.environ.get("RETAIN_TRAIN_ITEMS", "150")), seed=1)


def test_dataset_fn() -> Dataset:
    """The test sentences of the chunks in RETAIN_TEST_CHUNKS (comma-separated; default all)."""
    chunks = os.environ.get("RETAIN_TEST_CHUNKS", ",".join(str(c) for c in range(NUM_TOPICS // TOPICS_PER_CHUNK)))
    topics = [t for c in chunks.split(",") for t in _chunk_topics(int(c))]
    return TopicSentences(topics, 50, seed=2)
