"""Generated training data (FLIER): class descriptions from a language model, Stable Diffusion images and their
final denoised latents.

The one thing the rest of fewclip reads from here is a *generated set* (:class:`GeneratedSet`): images as a dataset of
the ``folder`` kind plus, per image, the latent it was decoded from. Its on-disk layout is in :mod:`.types`.
"""

from .types import GENERATED_FORMAT, GeneratedSet, load_generated_set, write_generated_set

__all__ = ["GENERATED_FORMAT", "GeneratedSet", "load_generated_set", "write_generated_set"]
