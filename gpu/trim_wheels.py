"""`python gpu/trim_wheels.py gpu-wheels`: drop the example files a wheel carries but nobody imports.

pyautoattack 0.2.0's wheel is 42 MB, almost all of it `pyautoattack/examples/model_test.pt` (a demo model); the
GPU check's checkout must travel in 64 MiB with the 33 MB of CIFAR-10 files, so that folder goes. The wheel's
RECORD loses the same lines, so pip installs exactly what remains.
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

DROPPED = "/examples/"


def trim(wheel: Path) -> int:
    """Rewrite `wheel` without its examples; returns the bytes saved (0: nothing to drop, file untouched)."""
    with zipfile.ZipFile(wheel) as src:
        items = src.infolist()
        keep = [i for i in items if DROPPED not in i.filename]
        if len(keep) == len(items):
            return 0
        trimmed = wheel.with_suffix(".trimmed")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in keep:
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if DROPPED not in line.split(",", 1)[0]).encode()
                dst.writestr(info, data)
    before = wheel.stat().st_size
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-wheels")
    for path in sorted(folder.glob("*.whl")):
        saved = trim(path)
        if saved:
            print(f"{path.name}: {saved / 2**20:.1f} MiB of examples dropped")
