"""Reduce PNGs to a 64-colour palette in place (plots need no more), for docs/images/.

Usage: python docs/_hooks/shrink_png.py FILE.png ...  (run by `make docs-images`)
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image


def shrink(path: Path) -> None:
    image = Image.open(path).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        shrink(Path(name))
