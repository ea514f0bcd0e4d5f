"""Small generated image datasets, for the offline demo, tests and benchmarks.

Each class has its own colour and stripe orientation; every image adds a random phase, shift and pixel noise,
so classes are separable from pixels (even through a randomly initialised network) without being trivial.
Images are written in any layout: :func:`write_images` takes relative paths, :func:`make_folder_dataset` writes
the ``folder`` kind's ``train/ val/ test/ <class>/`` tree.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_NAMES = ("train", "val", "test")


def class_image(label: int, num_classes: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """An [size, size, 3] uint8 image of class ``label``: a class colour modulated by class-oriented stripes."""
    hue = label / max(num_classes, 1)
    base = np.array(colorsys.hsv_to_rgb(hue, 0.55 + 0.3 * (label % 2), 0.85))
    angle = math.pi * ((label * 0.381966) % 1.0)  # golden-ratio spread of orientations
    freq = 2.0 + (label % 3)
    y, x = np.mgrid[0:size, 0:size] / size
    x = x + rng.uniform(-0.1, 0.1)
    y = y + rng.uniform(-0.1, 0.1)
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle)) + phase)
    pixels = base[None, None, :] * (0.55 + 0.45 * stripes[..., None])
    pixels = pixels + rng.normal(0.0, 0.06, size=pixels.shape)
    return (np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)


def write_images(
    root: str | Path, items: Sequence[tuple[str, int]], num_classes: int, *, size: int = 40, seed: int = 0
) -> list[Path]:
    """Write one generated image per ``(relative path, label)`` under ``root`` (format from the suffix)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    written = []
    for rel, label in items:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(class_image(int(label), num_classes, rng, size)).save(path)
        written.append(path)
    return written


def make_folder_dataset(
    root: str | Path,
    classnames: Sequence[str],
    counts: dict[str, int] | None = None,
    *,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """``root/{train,val,test}/<classname>/<i>.jpg`` with ``counts[split]`` images per class; returns ``root``."""
    counts = counts or {"train": 16, "val": 4, "test": 20}
    items = [
        (f"{split}/{name}/{split}_{i:03d}.jpg", label)
        for split in SPLIT_NAMES
        for label, name in enumerate(classnames)
        for i in range(counts.get(split, 0))
    ]
    write_images(root, items, len(classnames), size=size, seed=seed)
    return Path(root)
