"""BiLSTM text classifier (IMDB sentiment) as single-tensor blocks.

``nn.LSTM`` returns a tuple; the block wrapper keeps only the output sequence so
that the boundary after it is a real one-tensor cut.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_sdk.blocks import BlockModel


class BiLSTMLayer(nn.Module):
    """One bidirectional LSTM layer returning the (B, T, 2H) output sequence."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return out


class MaxOverTime(nn.Module):
    """(B, T, C) -> (B, C): the largest activation of each channel over the text."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=1)


def bilstm(
    vocab_size: int = 20000,
    embed_dim: int = 128,
    hidden: int = 128,
    num_layers: int = 2,
    num_classes: int = 2,
    dropout: float = 0.3,
) -> BlockModel:
    """Embedding -> ``num_layers`` BiLSTM layers -> max-pool over time -> MLP.
    Input: (T,) int64 token ids, 0 = padding, 1 = unknown (see
    :mod:`edge_sdk.data.imdb`). The cut after pooling is (2*hidden,) per sample,
    far smaller than the (T, 2*hidden) sequences before it."""
    blocks: list[nn.Module] = [nn.Embedding(vocab_size, embed_dim, padding_idx=0)]
    in_size = embed_dim
    for _ in range(num_layers):
        blocks.append(BiLSTMLayer(in_size, hidden))
        in_size = 2 * hidden
    blocks.append(MaxOverTime())
    blocks.append(nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, 64), nn.ReLU()))
    blocks.append(nn.Linear(64, num_classes))
    names = ["embedding"] + [f"bilstm{i + 1}" for i in range(num_layers)] + ["max_over_time", "fc1", "fc2"]
    return BlockModel(blocks, block_names=names)
