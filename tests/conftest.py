import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewclip.features.synthetic import make_synthetic_bundle  # noqa: E402


@pytest.fixture(scope="session")
def bundle():
    """A structured synthetic bundle: 10 classes, 8 shots, D = 64, 4 views, val and test."""
    return make_synthetic_bundle(classes=10, shots=8, dim=64, views=4, val_per_class=4, test_per_class=20, seed=3)


@pytest.fixture(scope="session")
def small_grid():
    """Small search grids so that every method fits in well under a second."""
    return {
        "tip-adapter": {"search_step": [12, 6]},
        "ape": {"search_step": [12, 6, 4], "channels": 40},
    }


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
