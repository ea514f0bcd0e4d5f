import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewclip.data.generate import write_images  # noqa: E402
from fewclip.features.synthetic import make_synthetic_bundle  # noqa: E402

#: the classes of :func:`make_pets`
PETS = ["abyssinian", "beagle", "chihuahua"]


def make_pets(root: Path, train: int | list[int] = 6, val: int = 4, test: int = 5, *, size: int = 36) -> Path:
    """``root``/oxford_pets/images/<class>_<split>_<i>.jpg and split_zhou_OxfordPets.json (CoOp's layout), 3 classes
    (:data:`PETS`) with ``val`` and ``test`` images each and ``train`` training images each (or ``train[y]`` of class
    y); returns ``root``, the data root."""
    folder = root / "oxford_pets"
    per_class = {"train": train if isinstance(train, list) else [train] * len(PETS), "val": [val] * len(PETS)}
    per_class["test"] = [test] * len(PETS)
    split = {
        s: [[f"{PETS[y]}_{s}_{i}.jpg", y, PETS[y]] for y in range(len(PETS)) for i in range(n[y])]
        for s, n in per_class.items()
    }
    write_images(folder / "images", [(p, y) for rows in split.values() for p, y, _ in rows], len(PETS), size=size)
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


#: Coarse settings under which every method fits the ``bundle`` fixture well under a second: the test suite's one
#: copy (the demo keeps its own DEMO_GRIDS). Search grids are small, trained methods run a few epochs, and the linear
#: probe's L-BFGS is capped (its tol is a relative change of the loss; a loose one would make ties on the small
#: validation set depend on the support-row order).
FAST = {
    "tip-adapter": {"search_step": [12, 6]},
    "ape": {"search_step": [12, 6, 4], "channels": 40},
    "tip-adapter-f": {"search_step": [12, 6], "epochs": 4, "batch_size": 32},
    "ape-t": {"search_step": [12, 6], "channels": 40, "epochs": 4, "batch_size": 32},
    "clip-adapter": {"epochs": 4, "batch_size": 32},
    "candle": {"epochs": 4, "batch_size": 32},
    "linear-probe": {"max_iter": 50},
    "clip-ft": {"scope": "last", "epochs": 2, "lr": 1e-3, "batch_size": 8},
    "clip-lora": {"iterations": 4, "evaluations": 2, "lr": 1e-2, "batch_size": 4},
    "lp++": {"epochs": 30},
    "clap": {"epochs": 20, "text_norm": 1.0},  # synthetic bundles have no text_norms (that warning: test_lp_clap)
    "proker": {"search_step": [4, 5]},
    # the generic image-method checks have no generated set: FLIER's real-images-only variant (tests/test_flier.py
    # trains the generated path)
    "flier": {
        "blocks": 1,
        "epochs": 2,
        "warmup_epochs": 0,
        "lr": 1e-3,
        "batch_size": 8,
        "augmentation": "dassl_train",
        "ema_decay": 0.5,
        "use_generated": False,
    },
}


SHOP = ["mug", "plate", "spoon"]


def make_shop(root: Path) -> Path:
    """``root``/<class>/<i>.png: a folder of class sub-folders only (no split of its own), 3 classes (:data:`SHOP`)
    of 10 images each, 32 px; returns ``root``."""
    items = [(f"{n}/{i}.png", y) for y, n in enumerate(SHOP) for i in range(10)]
    write_images(root, items, len(SHOP), size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def bundle():
    """A structured synthetic bundle: 10 classes, 8 shots, D = 64, 4 views, val and test."""
    return make_synthetic_bundle(classes=10, shots=8, dim=64, views=4, val_per_class=4, test_per_class=20, seed=3)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
