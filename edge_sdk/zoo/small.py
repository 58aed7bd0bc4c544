"""Small, fast models for tests, the demo and the centralized sanity runs.

Both are explicit block lists, chosen so that the cut tensor shrinks along the
network (the decision engine then has a real trade-off: compute on the device vs
bytes on the link) and so that the pipeline meets the awkward layers for real:
``digits_cnn`` has BatchNorm (running statistics must not be updated twice by
feature replay) and Dropout (replay must reuse the step's RNG state).
"""

from __future__ import annotations

from torch import nn

from edge_sdk.blocks import BlockModel


def digits_cnn(num_classes: int = 10, width: int = 16, dropout: float = 0.25) -> BlockModel:
    """CNN for 1x8x8 digit images. Cut sizes per sample (floats): input 64,
    then 16*8*8=1024, 32*4*4=512, 64*2*2=256, 128, 10."""
    w = width
    blocks = [
        nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()),
        nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w * 4, 128), nn.ReLU()),
        nn.Linear(128, num_classes),
    ]
    return BlockModel(blocks, block_names=["conv1_bn", "conv2_pool", "conv3_pool", "fc1_dropout", "fc2"])


def mnist1d_cnn(num_classes: int = 10, width: int = 32, length: int = 40) -> BlockModel:
    """1-D CNN for MNIST-1D signals (1x40). Cut sizes per sample (floats):
    input 40, then 32*40=1280, 32*20=640, 64*10=640, 64*5=320, 256, 10."""
    w = width
    blocks = [
        nn.Sequential(nn.Conv1d(1, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU()),
        nn.Sequential(nn.Conv1d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2)),
        nn.Sequential(nn.Conv1d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2)),
        nn.Sequential(nn.Conv1d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (length // 8), 256), nn.ReLU()),
        nn.Linear(256, num_classes),
    ]
    return BlockModel(blocks, block_names=["conv1_bn", "conv2_pool", "conv3_pool", "conv4_pool", "fc1", "fc2"])
