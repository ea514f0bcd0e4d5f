"""Class names: how a name goes into a prompt, and open_clip's canonical ImageNet names to check against.

CoOp's split files (``KaiyangZhou/CoOp``) already hold cleaned class names; a regenerated split takes its names
from the folder names through the renames in ``datasets.json`` (EuroSAT, Caltech101). ImageNet-family
``classnames.txt`` files are compared with open_clip's list, since zero-shot accuracy depends on the names.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType


def prompt_name(classname: str) -> str:
    """The name as every code base writes it into a prompt: underscores become spaces."""
    return classname.replace("_", " ")


# --------------------------------------------------------------------------- open_clip metadata


@cache
def open_clip_metadata() -> ModuleType:
    """open_clip's ``zero_shot_metadata`` module (ImageNet class names and templates).

    Loaded from the installed package's file without importing open_clip (and torch) when possible.
    """
    name = "open_clip.zero_shot_metadata"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed; it provides the ImageNet class names and the 80 templates.")
    path = Path(next(iter(spec.submodule_search_locations))) / "zero_shot_metadata.py"
    if not path.is_file():  # pragma: no cover - layout of another open_clip version
        return importlib.import_module(name)
    mod_spec = importlib.util.spec_from_file_location("_fewclip_open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def canonical_imagenet_classnames() -> list[str]:
    """OpenAI's cleaned 1000 ImageNet names in sorted-wnid order, from the installed open_clip."""
    return list(open_clip_metadata().IMAGENET_CLASSNAMES)


def imagenet_classnames_difference(names: list[str], where: str) -> str | None:
    """A warning text when ``names`` (from a ``classnames.txt``) differ from open_clip's list, else None."""
    canonical = canonical_imagenet_classnames()
    if len(names) != len(canonical):
        return (
            f"{where}: {len(names)} class names, but the canonical ImageNet list (open_clip IMAGENET_CLASSNAMES) "
            f"has {len(canonical)}; use CoOp's classnames.txt (another label file changes accuracy)."
        )
    diffs = [i for i, (a, b) in enumerate(zip(names, canonical)) if a != b]
    if not diffs:
        return None
    i = diffs[0]
    return (
        f"{where}: {len(diffs)} of {len(names)} class names differ from open_clip's IMAGENET_CLASSNAMES "
        f"(first: line {i + 1} {names[i]!r}, canonical {canonical[i]!r}); zero-shot accuracy depends on the "
        "names, so use CoOp's classnames.txt unless the change is deliberate."
    )
