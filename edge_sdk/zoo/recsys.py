"""Deep Interest Network (Zhou et al., KDD 2018) for MovieLens-1M click-through
style prediction (label: rating >= 4).

One int64 input vector per sample (see :mod:`edge_sdk.data.movielens`):
``[user, cand_item, cand_genre, hist_item_1..H, hist_genre_1..H]``, id 0 = padding.

Single-tensor cuts: the embedding block packs everything the attention block
needs into one float tensor ``(H + 2, 2D + 1)`` per sample: row 0 the user
embedding, row 1 the candidate, rows 2.. the history, the last column the
history mask (1 = real item). Quantizing that mask column is harmless: the
attention block thresholds it at 0.5.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_sdk.blocks import BlockModel


class Dice(nn.Module):
    """Data-adaptive activation from the DIN paper: a PReLU whose switch point
    follows the batch statistics of its input."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.bn(x))
        return p * x + (1 - p) * self.alpha * x


class DINEmbedding(nn.Module):
    def __init__(self, num_users: int, num_items: int, num_genres: int, dim: int, history: int) -> None:
        super().__init__()
        self.history = history
        self.user = nn.Embedding(num_users, 2 * dim, padding_idx=0)
        self.item = nn.Embedding(num_items, dim, padding_idx=0)
        self.genre = nn.Embedding(num_genres, dim, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.history
        user, item, genre = ids[:, 0], ids[:, 1], ids[:, 2]
        hist_items, hist_genres = ids[:, 3 : 3 + h], ids[:, 3 + h : 3 + 2 * h]
        u = self.user(user).unsqueeze(1)  # (B, 1, 2D)
        c = torch.cat([self.item(item), self.genre(genre)], dim=-1).unsqueeze(1)  # (B, 1, 2D)
        hist = torch.cat([self.item(hist_items), self.genre(hist_genres)], dim=-1)  # (B, H, 2D)
        rows = torch.cat([u, c, hist], dim=1)  # (B, H+2, 2D)
        mask = torch.cat([torch.ones_like(user).unsqueeze(1).expand(-1, 2), (hist_items > 0).long()], dim=1)
        return torch.cat([rows, mask.unsqueeze(-1).to(rows.dtype)], dim=-1)  # (B, H+2, 2D+1)


class AttentionPooling(nn.Module):
    """DIN's local activation unit: weight each history item by an MLP of
    (item, candidate, item - candidate, item * candidate), no softmax (as in the
    paper, so the sum keeps the intensity of the interest)."""

    def __init__(self, dim: int, hidden: tuple[int, int] = (80, 40)) -> None:
        super().__init__()
        d = 2 * dim
        self.att = nn.Sequential(
            nn.Linear(4 * d, hidden[0]), nn.PReLU(), nn.Linear(hidden[0], hidden[1]), nn.PReLU(), nn.Linear(hidden[1], 1)
        )

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        rows, mask = packed[..., :-1], (packed[..., -1] > 0.5)
        u, c, hist = rows[:, 0], rows[:, 1], rows[:, 2:]
        hmask = mask[:, 2:].unsqueeze(-1).to(rows.dtype)
        cc = c.unsqueeze(1).expand_as(hist)
        w = self.att(torch.cat([hist, cc, hist - cc, hist * cc], dim=-1)) * hmask  # (B, H, 1)
        pooled = (w * hist).sum(dim=1)
        return torch.cat([u, c, pooled, c * pooled], dim=1)  # (B, 8D)


def din(
    num_users: int = 6041,
    num_items: int = 3953,
    num_genres: int = 19,
    dim: int = 16,
    history: int = 20,
    hidden: tuple[int, int] = (200, 80),
) -> BlockModel:
    """Defaults fit MovieLens-1M's raw ids (users 1..6040, movies 1..3952, 18
    genres + padding). Output: (B, 1) logits of "the user likes the candidate"."""
    blocks: list[nn.Module] = [
        DINEmbedding(num_users, num_items, num_genres, dim, history),
        AttentionPooling(dim),
        nn.Sequential(nn.Linear(8 * dim, hidden[0]), Dice(hidden[0])),
        nn.Sequential(nn.Linear(hidden[0], hidden[1]), Dice(hidden[1])),
        nn.Linear(hidden[1], 1),
    ]
    return BlockModel(blocks, block_names=["embedding", "attention_pooling", "mlp1", "mlp2", "out"])


def din_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """BCE on the logit; ``correct`` counts predictions on the right side of 0.5."""
    logits = output.reshape(-1)
    t = target.reshape(-1).to(logits.dtype)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, t)
    correct = int(((logits > 0) == (t > 0.5)).sum().item())
    return loss, correct
