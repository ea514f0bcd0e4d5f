import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewclip.features.synthetic import make_synthetic_bundle  # noqa: E402

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
}


@pytest.fixture(scope="session")
def bundle():
    """A structured synthetic bundle: 10 classes, 8 shots, D = 64, 4 views, val and test."""
    return make_synthetic_bundle(classes=10, shots=8, dim=64, views=4, val_per_class=4, test_per_class=20, seed=3)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
