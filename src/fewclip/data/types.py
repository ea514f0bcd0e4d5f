"""The types every part of ``fewclip.data`` shares: an image :class:`Item` and a loaded :class:`DatasetSplits`.

They sit at the bottom of the package (no imports from its other modules), so the registry, the readers, the
loader and the samplers can all use them without import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: File suffixes read as images in users' own folders (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
#: The three parts of every split, in file and listing order.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class Item:
    """One image: ``path`` relative to :attr:`DatasetSplits.root` (absolute only for absolute CSV rows, which
    ``load_dataset`` accepts with ``allow_outside_root=True``)."""

    path: str
    label: int
    classname: str


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded dataset. Open an image as ``root / item.path``.

    - ``root``: the image root, the folder the split file's paths are relative to (e.g.
      ``caltech-101/101_ObjectCategories``); ``dataset_dir`` is the dataset folder itself.
    - ``classnames[label]``: the cleaned name (underscores kept; replace them at prompt time).
    - ``val`` is empty when the dataset has none (ImageNet: its val images are ``test``); ``train`` and ``val``
      are empty for the test-only ImageNet variants.
    - ``split_sha256``: SHA-256 of the split file's bytes when one file defines the split (``split_zhou_*.json``,
      a user's JSON), else of the loaded listing (lines ``split\\tpath\\tlabel\\tclassname``).
    - ``template``: the dataset's single template (``{}`` placeholder); ``template_set``: the default set name.
    - ``wnids`` / ``imagenet_indices``: for the ImageNet family, each class's wnid and its index among ImageNet's
      1000 classes (for 1000-way evaluation of the variants).
    """

    name: str
    root: Path
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    split_sha256: str
    template_set: str = "single"
    template: str = "a photo of a {}."
    dataset_dir: Path | None = None
    folder_alias: str | None = None
    split_source: str = ""
    standard_split: bool = True
    wnids: list[str] | None = None
    imagenet_indices: list[int] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def has_val(self) -> bool:
        return bool(self.val)

    def counts(self) -> dict[str, int]:
        return {"classes": self.num_classes, "train": len(self.train), "val": len(self.val), "test": len(self.test)}
