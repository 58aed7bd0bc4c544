"""IMDB sentiment (Maas et al., 2011) from the ``aclImdb`` folders, with a simple
deterministic tokenizer and a vocabulary built from the training split only
(building it on the test split would leak)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from edge_sdk.data.base import DatasetError, DatasetSplits

LAYOUT = (
    "expected IMDB: <data_dir>/aclImdb/ (or <data_dir> itself) with train/pos, train/neg, "
    "test/pos and test/neg folders of UTF-8 .txt reviews"
)

PAD, UNK = 0, 1
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """Lower-case words (with an apostrophe suffix kept: "don't"), HTML line breaks
    removed, punctuation dropped."""
    return _TOKEN.findall(_BR.sub(" ", text).lower())


def build_vocab(token_lists: list[list[str]], vocab_size: int) -> dict[str, int]:
    """Most frequent ``vocab_size - 2`` tokens -> ids 2.. (0 = padding, 1 = unknown);
    ties broken alphabetically so the vocabulary is the same everywhere."""
    counts = Counter(t for toks in token_lists for t in toks)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max(0, vocab_size - 2)]
    return {tok: i + 2 for i, (tok, _) in enumerate(ranked)}


def encode(tokens: list[str], vocab: dict[str, int], seq_len: int) -> list[int]:
    """Ids of the first ``seq_len`` tokens, right-padded with 0."""
    ids = [vocab.get(t, UNK) for t in tokens[:seq_len]]
    return ids + [PAD] * (seq_len - len(ids))


def _read_split(root: Path, split: str) -> tuple[list[list[str]], list[int]]:
    texts: list[list[str]] = []
    labels: list[int] = []
    for label, sub in ((0, "neg"), (1, "pos")):
        folder = root / split / sub
        if not folder.is_dir():
            raise DatasetError(f"IMDB: folder {folder} not found; {LAYOUT}")
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise DatasetError(f"IMDB: no .txt reviews in {folder}; {LAYOUT}")
        for f in files:
            try:
                texts.append(tokenize(f.read_text(encoding="utf-8")))
            except UnicodeDecodeError as exc:
                raise DatasetError(f"IMDB: {f} is not UTF-8 text ({exc}); {LAYOUT}") from exc
            labels.append(label)
    return texts, labels


def load_imdb(data_dir: Path, vocab_size: int = 20000, seq_len: int = 256) -> DatasetSplits:
    """x: (seq_len,) int64 token ids; y: 0 = negative, 1 = positive.
    Defaults match the zoo's ``bilstm`` (vocab_size=20000, seq_len=256)."""
    root = data_dir / "aclImdb" if (data_dir / "aclImdb").is_dir() else data_dir
    tr_tokens, tr_labels = _read_split(root, "train")
    te_tokens, te_labels = _read_split(root, "test")
    vocab = build_vocab(tr_tokens, vocab_size)

    def to_ds(tokens: list[list[str]], labels: list[int]) -> TensorDataset:
        x = torch.tensor([encode(t, vocab, seq_len) for t in tokens], dtype=torch.int64)
        return TensorDataset(x, torch.tensor(labels, dtype=torch.int64))

    return DatasetSplits(
        name="imdb",
        train=to_ds(tr_tokens, tr_labels),
        test=to_ds(te_tokens, te_labels),
        num_classes=2,
        input_shape=(seq_len,),
        input_dtype=torch.int64,
        meta={"root": str(root), "vocab": vocab, "vocab_size": vocab_size, "seq_len": seq_len},
    )
