"""MovieLens-1M (``ratings.dat``, ``movies.dat``) as DIN samples.

Each rating becomes one sample: the user, the rated movie (candidate) and its
first genre, and the user's previous ``history`` movies and their genres in time
order (most recent last, left-padded with 0). Label: rating >= 4 ("liked").
Split: per user, in time order, the last ``test_fraction`` of their ratings are
test samples - the model predicts the future from the past, never the reverse.
Raw ids are kept (users 1..6040, movies 1..3952), matching the zoo's ``din`` defaults.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from edge_sdk.data.base import DatasetError, DatasetSplits

LAYOUT = (
    "expected MovieLens-1M: <data_dir>/ml-1m/ (or <data_dir> itself) with ratings.dat "
    "(UserID::MovieID::Rating::Timestamp) and movies.dat (MovieID::Title::Genre|Genre...), latin-1 text"
)

GENRES = [
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
GENRE_ID = {g: i + 1 for i, g in enumerate(GENRES)}  # 0 = padding / unknown


def _lines(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DatasetError(f"MovieLens: {path} not found; {LAYOUT}")
    return [line.split("::") for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def read_movies(path: Path) -> dict[int, int]:
    """movie id -> id of its first listed genre."""
    genre: dict[int, int] = {}
    for n, f in enumerate(_lines(path), 1):
        if len(f) != 3 or not f[0].isdigit():
            raise DatasetError(f"{path}:{n}: expected MovieID::Title::Genres; {LAYOUT}")
        genre[int(f[0])] = GENRE_ID.get(f[2].split("|")[0].strip(), 0)
    return genre


def read_ratings(path: Path) -> np.ndarray:
    """(N, 4) int64 array of user, movie, rating, timestamp."""
    rows = []
    for n, f in enumerate(_lines(path), 1):
        if len(f) != 4:
            raise DatasetError(f"{path}:{n}: expected UserID::MovieID::Rating::Timestamp; {LAYOUT}")
        try:
            row = [int(v) for v in f]
        except ValueError:
            raise DatasetError(f"{path}:{n}: non-integer field; {LAYOUT}") from None
        if not 1 <= row[2] <= 5:
            raise DatasetError(f"{path}:{n}: rating {row[2]} outside 1..5; {LAYOUT}")
        rows.append(row)
    if not rows:
        raise DatasetError(f"{path} has no ratings; {LAYOUT}")
    return np.asarray(rows, dtype=np.int64)


def load_movielens(data_dir: Path, history: int = 20, test_fraction: float = 0.1) -> DatasetSplits:
    root = data_dir / "ml-1m" if (data_dir / "ml-1m").is_dir() else data_dir
    genre = read_movies(root / "movies.dat")
    ratings = read_ratings(root / "ratings.dat")
    unknown = sorted(set(ratings[:, 1].tolist()) - set(genre))
    if unknown:
        raise DatasetError(f"ratings.dat refers to movies missing from movies.dat: {unknown[:10]}; {LAYOUT}")
    by_user: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for u, m, r, t in ratings.tolist():
        by_user[u].append((t, m, r))
    train_x, train_y, test_x, test_y = [], [], [], []
    for u in sorted(by_user):
        events = sorted(by_user[u])  # by timestamp, then movie id: deterministic
        n_test = int(round(len(events) * test_fraction))
        for i, (_, m, r) in enumerate(events):
            past = [e[1] for e in events[max(0, i - history) : i]]
            hist = [0] * (history - len(past)) + past
            row = [u, m, genre[m], *hist, *[genre.get(h, 0) for h in hist]]
            (test_x if i >= len(events) - n_test else train_x).append(row)
            (test_y if i >= len(events) - n_test else train_y).append(1.0 if r >= 4 else 0.0)
    width = 3 + 2 * history

    def to_ds(x: list, y: list) -> TensorDataset:
        return TensorDataset(torch.tensor(x, dtype=torch.int64).reshape(-1, width), torch.tensor(y, dtype=torch.float32))

    return DatasetSplits(
        name="movielens",
        train=to_ds(train_x, train_y),
        test=to_ds(test_x, test_y),
        num_classes=1,
        input_shape=(width,),
        input_dtype=torch.int64,
        meta={
            "root": str(root),
            "history": history,
            "num_users": int(ratings[:, 0].max()) + 1,
            "num_items": int(max(genre)) + 1,
            "num_genres": len(GENRES) + 1,
        },
    )
