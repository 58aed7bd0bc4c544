"""Named device profiles: how much slower than one desktop CPU core a device trains.

Why slowdown factors and not absolute speeds: profiles are *measured* on this
machine (``edge_sdk.profile``); a device's per-block time is then estimated as
``measured_ms * slowdown``, and the emulator sleeps ``(slowdown - 1)`` times its
measured compute. The reference is one core of a recent desktop x86 CPU running
PyTorch fp32 (e.g. a Zen 3 / Alder Lake P-core at ~4-5 GHz with AVX2 FMA).

These factors are APPROXIMATIONS (honest error bars: about +-50 %). They combine
single-core CPU benchmark ratios with peak fp32 throughput ratios; real ratios
depend on the layer mix (memory-bound layers shrink the gap, big GEMMs widen it),
on thermal throttling, and on the kernel library. Where a real device is at hand,
measure it with ``python -m edge_sdk profile`` and use the measured ratio instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    slowdown: float  # device compute time / desktop-core compute time
    memory_budget_bytes: int  # memory a training app can reasonably use
    cores: int
    description: str

    def to_dict(self) -> dict:
        return asdict(self)


_DEVICES: dict[str, DeviceProfile] = {
    # Reference: one desktop core. Geekbench 5 single-core ~1,600-1,800 for
    # Zen 3 / Alder Lake; peak fp32 ~ 2 FMA units x 8 lanes x 2 x 4.5 GHz ~ 144 GFLOP/s.
    "desktop": DeviceProfile("desktop", 1.0, 16 * GiB, 1, "one desktop x86 core (the reference)"),
    # Raspberry Pi 4 Model B: 4x Cortex-A72 @ 1.5 GHz, 128-bit NEON.
    # Sources: Geekbench 5 single-core ~250-300 on the Geekbench browser (ratio
    # ~6x vs the reference); peak fp32 per core 1.5 GHz x 8 FLOP/cycle = 12 GFLOP/s
    # (~12x below the reference). PyTorch CNN training on a Pi 4 core is commonly
    # reported 5-10x slower than a desktop core; we take 8x.
    "raspberry-pi-4": DeviceProfile(
        "raspberry-pi-4", 8.0, 3 * GiB, 4, "Raspberry Pi 4 (Cortex-A72 @1.5 GHz), one core, 4 GB board"
    ),
    # NVIDIA Jetson TX2, CPU only: 2x Denver2 + 4x Cortex-A57 @ 2.0 GHz.
    # Geekbench 4/5 single-core results put a Denver2/A57 core near 2x a Pi 4 core
    # (~400-500 GB5), i.e. ~4x below the reference; peak fp32 per A57 core
    # 2.0 GHz x 8 = 16 GFLOP/s (~9x). We take 5x.
    "jetson-tx2": DeviceProfile(
        "jetson-tx2", 5.0, 6 * GiB, 6, "Jetson TX2, CPU cores only (Denver2/A57 @2 GHz), 8 GB shared memory"
    ),
    # Jetson TX2 with its 256-core Pascal GPU (NVIDIA spec: ~0.67 TFLOP/s fp32 peak
    # at 1.3 GHz). At the 20-40 % utilization small-batch training reaches, that is
    # ~0.15-0.25 TFLOP/s, about 1.5-2x one desktop core on conv layers; small
    # layers are launch-bound and gain nothing. We take 0.6 (faster than the reference).
    "jetson-tx2-gpu": DeviceProfile(
        "jetson-tx2-gpu", 0.6, 6 * GiB, 6, "Jetson TX2 using its Pascal GPU (CUDA), 8 GB shared memory"
    ),
    # Mid-range phone (2021-2023, e.g. Snapdragon 778G / Dimensity 1080: Cortex-A78
    # big cores @ 2.4-2.6 GHz). Geekbench 5 single-core ~800-900 -> ~2x below the
    # reference; NEON peak per core ~20 GFLOP/s (~7x). Sustained training also
    # throttles after minutes. We take 3x for the big core; usable app memory ~2 GB
    # on a 6-8 GB phone (Android kills larger background apps).
    "mid-range-phone": DeviceProfile("mid-range-phone", 3.0, 2 * GiB, 8, "mid-range Android phone (Cortex-A78 class big core)"),
}

_ALIASES = {
    "pi4": "raspberry-pi-4",
    "rpi4": "raspberry-pi-4",
    "raspberry-pi4": "raspberry-pi-4",
    "raspberrypi4": "raspberry-pi-4",
    "tx2": "jetson-tx2",
    "phone": "mid-range-phone",
    "midrange-phone": "mid-range-phone",
    "tx2-gpu": "jetson-tx2-gpu",
}


def names() -> list[str]:
    return list(_DEVICES)


def choices_text() -> str:
    """The names a ``--device`` flag takes, aliases in brackets (for ``--help``)."""
    by_name: dict[str, list[str]] = {n: [] for n in _DEVICES}
    for alias, name in _ALIASES.items():
        by_name[name].append(alias)
    return ", ".join(f"{n} ({', '.join(a)})" if a else n for n, a in by_name.items())


def parse_device(text: str) -> str:
    """argparse ``type`` for ``--device``: the canonical name of a known device or alias."""
    import argparse

    try:
        return get_device(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def get_device(name: str) -> DeviceProfile:
    """Profile by name; case, spaces and underscores are ignored ("Raspberry Pi 4" works)."""
    key = "-".join(str(name).strip().lower().replace("_", " ").split())
    key = _ALIASES.get(key, key)
    if key not in _DEVICES:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(names())} (aliases: {', '.join(sorted(_ALIASES))})")
    return _DEVICES[key]
