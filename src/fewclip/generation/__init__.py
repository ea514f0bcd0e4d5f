"""Generated training data (FLIER): class descriptions from a language model, Stable Diffusion images and their
final denoised latents.

The one thing the rest of fewclip reads from here is a *generated set* (:class:`GeneratedSet`): images as a dataset of
the ``folder`` kind plus, per image, the latent it was decoded from. Its on-disk layout is in :mod:`.types`.

- :mod:`.describe`: description files (CuPL style) and ``fewclip describe`` (an OpenAI-compatible chat endpoint,
  answers cached per class);
- :mod:`.settings`: generation settings (FLIER-faithful defaults), per-item seeds and keys;
- :mod:`.diffusion`: loading a Stable Diffusion pipeline (``diffusers``, imported lazily) and sampling latents and
  images in one call;
- :mod:`.store`: the content-addressed, resumable store and :func:`generate`;
- :mod:`.tiny`: a tiny random pipeline saved to disk, for tests and CPU benchmarks.

The names below are imported on first use, so that the command line's parser can read this package's torch-free
modules (:mod:`.settings`, :mod:`.describe`) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GENERATED_FORMAT": ".types",
    "GeneratedSet": ".types",
    "load_generated_set": ".types",
    "write_generated_set": ".types",
    "GenerationError": ".settings",
    "GenerationSettings": ".settings",
    "generate": ".store",
    "GenerationStore": ".store",
    "load_descriptions": ".describe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
