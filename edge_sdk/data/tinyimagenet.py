"""Tiny ImageNet-200 from its folder layout (64x64 JPEGs, 200 classes).

Images are decoded with Pillow (installed with matplotlib) lazily, one per
``__getitem__``: the full training set decoded is 1.2 GB of uint8. The labelled
``val`` split serves as the test split (the official ``test`` split has no labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from edge_sdk.data.base import DatasetError, DatasetSplits

LAYOUT = (
    "expected Tiny ImageNet: <data_dir>/tiny-imagenet-200/ (or <data_dir> itself) with wnids.txt "
    "(one class id per line), train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
    "val/val_annotations.txt (tab-separated: file name, wnid, ...)"
)

# ImageNet channel statistics, the usual choice for transfer from ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXTS = {".jpeg", ".jpg", ".png"}


class ImageFiles(Dataset):
    """(path, label) list decoded on access to a normalized (3, S, S) float tensor."""

    def __init__(self, items: list[tuple[Path, int]], size: int = 64) -> None:
        self.items, self.size = items, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise DatasetError(f"cannot decode image {path}: {exc}; {LAYOUT}") from exc
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std, torch.tensor(label, dtype=torch.int64)


def load_tinyimagenet(data_dir: Path, image_size: int = 64) -> DatasetSplits:
    try:
        import PIL  # noqa: F401
    except ImportError as exc:  # pragma: no cover - Pillow comes with matplotlib
        raise DatasetError("Tiny ImageNet needs Pillow (pip install pillow)") from exc
    root = data_dir / "tiny-imagenet-200" if (data_dir / "tiny-imagenet-200").is_dir() else data_dir
    wnids_file = root / "wnids.txt"
    ann_file = root / "val" / "val_annotations.txt"
    for p in (wnids_file, root / "train", root / "val" / "images", ann_file):
        if not p.exists():
            raise DatasetError(f"Tiny ImageNet: {p} not found; {LAYOUT}")
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"{wnids_file} is empty or has duplicate ids; {LAYOUT}")
    index = {w: i for i, w in enumerate(wnids)}
    train: list[tuple[Path, int]] = []
    for w in wnids:
        img_dir = root / "train" / w / "images"
        if not img_dir.is_dir():
            raise DatasetError(f"Tiny ImageNet: class folder {img_dir} not found; {LAYOUT}")
        train += [(p, index[w]) for p in sorted(img_dir.iterdir()) if p.suffix.lower() in _EXTS]
    test: list[tuple[Path, int]] = []
    for n, line in enumerate(ann_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetError(f"{ann_file}:{n}: expected 'file<TAB>wnid...' with a wnid from wnids.txt; {LAYOUT}")
        img = root / "val" / "images" / fields[0]
        if not img.is_file():
            raise DatasetError(f"Tiny ImageNet: {img} listed in val_annotations.txt is missing; {LAYOUT}")
        test.append((img, index[fields[1]]))
    if not train or not test:
        raise DatasetError(f"Tiny ImageNet at {root} has no training or no validation images; {LAYOUT}")
    return DatasetSplits(
        name="tinyimagenet",
        train=ImageFiles(train, image_size),
        test=ImageFiles(test, image_size),
        num_classes=len(wnids),
        input_shape=(3, image_size, image_size),
        meta={"root": str(root), "wnids": wnids},
    )
