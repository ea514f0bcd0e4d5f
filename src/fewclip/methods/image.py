"""Methods that back-propagate through CLIP (``inputs = "images"``): what they are fitted on and what they return.

An image method is fitted on an :class:`ImageEpisode`: the dataset's images, the episode (support and validation
items), the :class:`~fewclip.models.BackboneSpec` it builds a trainable model from, and the cached zero-shot text
classifier. For test time it returns two things:

- a fine-tuned image encoder (:meth:`ImageMethod.image_encoder`, an inference :class:`~fewclip.models.Backbone`
  whose cache key records the fine-tuned weights' SHA-256), through which the runner encodes test images with the
  ordinary extraction pipeline and feature cache;
- a feature-level head (:meth:`~fewclip.methods.base.Method.predict_logits`) that scores those features as every
  other method does, so protocols, results and predictions files stay the same.

The fine-tuned weights are fitted state (``encoder_state_``, the trainable parameters only), saved with the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import DatasetSplits, Episode, Item
from ..errors import MethodError
from ..features.extract import extract, load_image, seeded, view_seed
from ..features.pipeline import ExtractionOptions
from ..generation.types import GeneratedSet
from ..models import Backbone, BackboneSpec, TrainableBackbone
from .base import Method

LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class ImageEpisode:
    """What an image method is fitted on (the analogue of a feature :class:`~fewclip.features.bundle.Bundle`).

    - ``splits``: the dataset; images open as ``splits.root / item.path``.
    - ``episode``: support (``train``) and validation items, labels in ``episode.classnames``.
    - ``backbone``: the pre-trained model to fine-tune, as a spec any process can rebuild; ``loaded`` optionally
      the backbone already loaded from it in this process (saves loading the weights again).
    - ``text_weights`` [C, D]: the zero-shot classifier, one unit row per class of ``episode.classnames``.
    - ``test``: test items (removed in the copy ``fit`` sees); ``exclude``: paths of unreadable images left out.
    - ``options``: batch size, loader workers and progress bars for reading images.
    - ``generated``: generated images with their latents (FLIER), labels in ``episode.classnames``, only for classes
      with support (:func:`generated_for_episode`); None when the run has no generated set.
    """

    splits: DatasetSplits
    episode: Episode
    backbone: BackboneSpec
    text_weights: torch.Tensor
    test: Sequence[Item] | None = None
    loaded: Backbone | None = None
    exclude: frozenset[str] = frozenset()
    options: ExtractionOptions = ExtractionOptions()
    generated: GeneratedSet | None = None

    @property
    def num_classes(self) -> int:
        return int(self.text_weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text_weights.shape[1])

    @property
    def classnames(self) -> list[str]:
        return list(self.episode.classnames)

    @property
    def train(self) -> list[Item]:
        """The support items, unreadable ones left out."""
        return [i for i in self.episode.train if i.path not in self.exclude]

    @property
    def val(self) -> list[Item]:
        """The validation items, unreadable ones left out."""
        return [i for i in self.episode.val if i.path not in self.exclude]

    @property
    def has_val(self) -> bool:
        return bool(self.val)

    def shots_per_class(self) -> torch.Tensor:
        labels = torch.tensor([i.label for i in self.train], dtype=torch.long)
        return torch.bincount(labels, minlength=self.num_classes)

    def without_test(self) -> ImageEpisode:
        return dataclasses.replace(self, test=None)

    def trainable(self, scope: str) -> TrainableBackbone:
        """The backbone as a :class:`~fewclip.models.TrainableBackbone` (``loaded`` if given, else from the spec)."""
        if self.loaded is not None:
            return TrainableBackbone(self.loaded, scope, spec=self.backbone)
        return TrainableBackbone.from_spec(self.backbone, scope)


def generated_for_episode(generated: GeneratedSet, episode: Episode) -> GeneratedSet:
    """``generated`` restricted to the classes of ``episode`` that have support images (base classes only under
    base-to-new), labelled in ``episode.classnames``. A class with support but no generated sample is an error
    naming it (:meth:`GeneratedSet.for_classes`)."""
    supported = sorted({item.label for item in episode.train})
    names = [episode.classnames[c] for c in supported]
    subset = generated.for_classes(names)
    index = torch.tensor(supported, dtype=torch.long)
    return GeneratedSet(
        classnames=tuple(episode.classnames),
        images=subset.images,
        labels=index[subset.labels] if len(subset) else subset.labels,
        latents=subset.latents,
        prompts=subset.prompts,
    )


class ImageItems(torch.utils.data.Dataset):
    """Item i: (transformed image or None, label, path, error). With ``seed`` the random transform of image p is
    drawn from a generator seeded by (seed, p, ``draw``), so the pixels do not depend on batching, workers or the
    order of the items. A failure is returned, not raised, so the main process can name the file. A subclass may
    index by other keys and call :meth:`read` with its own draw (CLIP-LoRA's (support index, pass) keys)."""

    def __init__(self, root: Path, items: Sequence[Item], transform: Callable, seed: int | None = None, draw: int = 0):
        self.root, self.items, self.transform, self.seed, self.draw = root, list(items), transform, seed, draw

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str, str | None]:
        return self.read(self.items[i], self.draw)

    def read(self, item: Item, draw: int) -> tuple[torch.Tensor | None, int, str, str | None]:
        """``item`` opened and transformed (under augmentation draw ``draw`` when seeded), or its error."""
        try:
            image = load_image(self.root / item.path)
            if self.seed is None:
                return self.transform(image), item.label, item.path, None
            with seeded(view_seed(self.seed, item.path, draw)):
                return self.transform(image), item.label, item.path, None
        except Exception as exc:  # any decoding or transform failure marks the image unreadable
            return None, item.label, item.path, f"{type(exc).__name__}: {exc}"


def collate_images(rows: list[tuple[torch.Tensor | None, int, str, str | None]]):
    """A loader's ``collate_fn`` for :class:`ImageItems`: (images [B, 3, S, S] of the readable rows or None,
    labels [B], [(path, error) of each unreadable row])."""
    good = [(t, y) for t, y, _, error in rows if error is None]
    bad = [(path, error) for _, _, path, error in rows if error is not None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, torch.tensor([y for _, y in good], dtype=torch.long), bad


def checked_batches(
    loader: Iterable[tuple[torch.Tensor | None, torch.Tensor, list[tuple[str, str]]]],
    root: Path,
    options: ExtractionOptions,
    unreadable: set[str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (images, labels) batches of ``loader`` (collated by :func:`collate_images`, paths relative to ``root``).
    An image that cannot be read is an error naming the file, unless ``options.skip_bad_images``: then it is left
    out of its batch and its path added to ``unreadable``; a batch with no readable image is skipped."""
    for images, labels, bad in loader:
        if bad and not options.skip_bad_images:
            path, error = bad[0]
            raise MethodError(
                f"{root / path}: cannot be read ({error}); replace or delete it, or run with --skip-bad-images."
            )
        if unreadable is not None:
            unreadable.update(path for path, _ in bad)
        if images is not None:
            yield images, labels


def image_batches(
    root: Path,
    items: Sequence[Item],
    transform: Callable,
    options: ExtractionOptions,
    batch_size: int,
    *,
    seed: int | None = None,
    draw: int = 0,
    order: Iterable[int] | None = None,
    unreadable: set[str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (images [B, 3, S, S], labels [B]) of ``items`` in ``order`` (default: as given), transformed by
    ``transform`` (seeded per image and ``draw`` when ``seed`` is given), read by ``options.num_workers`` loader
    workers (0 when unset: the support sets of few-shot episodes are small).

    An image that cannot be read is an error naming the file, unless ``options.skip_bad_images``: then it is left
    out of its batch and its path added to ``unreadable``.
    """
    items = list(items) if order is None else [items[i] for i in order]
    loader = torch.utils.data.DataLoader(
        ImageItems(root, items, transform, seed, draw),
        batch_size=batch_size,
        shuffle=False,
        num_workers=options.num_workers or 0,
        collate_fn=collate_images,
    )
    yield from checked_batches(loader, root, options, unreadable)


def readable_accuracy(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    predict: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[Item],
    unreadable: set[str],
) -> float:
    """Top-1 accuracy (%) of ``predict`` (images → scores [B, C]) over ``batches``, the (images, labels) of ``items``
    as :func:`image_batches` reads them with ``unreadable``: the hits over the items that could be read (an image
    left out, recorded in ``unreadable`` while reading, counts neither way; 0 when none could be)."""
    hits = 0
    for images, labels in batches:
        hits += int((predict(images).argmax(1).cpu() == labels).sum())
    return 100.0 * hits / max(1, len(items) - len(unreadable.intersection(i.path for i in items)))


class ImageMethod(Method):
    """Base of the methods fitted on images. A subclass implements ``_fit(episode: ImageEpisode)``, which sets
    ``text_`` (the head's text rows), ``encoder_state_`` (the fine-tuned trainable parameters), ``encoder_scope_``,
    ``backbone_spec_`` (``BackboneSpec.to_dict()``) and ``_val_accuracy_``, and may cache the fine-tuned encoder as
    ``_encoder_``. The head is zero-shot's over the fine-tuned features: 100·n(f)·Wᵀ."""

    inputs = "images"

    def wants_generated(self) -> bool:
        """Whether ``fit`` needs :attr:`ImageEpisode.generated` (FLIER): the runner then loads ``--generated``."""
        return False

    def _check_data(self, data: Any) -> None:
        if not isinstance(data, ImageEpisode):
            raise MethodError(
                f"{self.name} fine-tunes CLIP on images, so it is fitted on an image episode, not on "
                f"{type(data).__name__}; run it with `fewclip run` (a dataset on disk), not `fewclip fit` (a bundle)."
            )
        super()._check_data(data)

    def _validation_accuracy(self, data: Any) -> float | None:
        return self._val_accuracy_

    def _temperature_rows(self, data: Any) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
        """Under ``selection="val"``: the validation images encoded (evaluation transform, no feature cache) by the
        fine-tuned encoder and scored by the head, so the temperature is that of the model that predicts."""
        if self.selection != "val" or not isinstance(data, ImageEpisode) or not data.has_val:
            return None, "none"
        features, labels = self.encode_items(data, data.val, "validation images through the fine-tuned encoder")
        return (self.predict_logits(features), labels), "val"

    def encode_items(self, data: ImageEpisode, items: Sequence[Item], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [M, D], labels [M]) of ``items`` encoded by the fine-tuned encoder; unreadable images are left
        out (they were reported when the images were read for training)."""
        options = data.options
        out = extract(
            self.image_encoder(),
            data.splits.root,
            [i.path for i in items],
            store=None,
            batch_size=options.batch_size,
            num_workers=options.num_workers,
            skip_bad_images=True,
            progress=options.progress,
            desc=desc,
        )
        labels = torch.tensor([items[i].label for i in out.kept], dtype=torch.long)
        return out.features.float().cpu(), labels

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * F.normalize(features, dim=-1) @ self.text_.T

    def image_encoder(self, device: str | torch.device | None = None) -> Backbone:
        """The fine-tuned image encoder as an inference :class:`~fewclip.models.Backbone` (rebuilt from the spec and
        the saved state after :func:`~fewclip.methods.load`), on ``device`` (default: the spec's)."""
        self._check_fitted()
        cached = getattr(self, "_encoder_", None)
        if cached is not None and (device is None or torch.device(device) == cached.device):
            return cached
        spec = BackboneSpec.from_dict(self.backbone_spec_)
        if device is not None:
            spec = dataclasses.replace(spec, device=str(device))
        encoder = self._build_encoder(spec)
        self._encoder_ = encoder
        return encoder

    def _build_encoder(self, spec: BackboneSpec) -> Backbone:
        """The fine-tuned encoder built from ``spec`` and the fitted state (:meth:`image_encoder` caches it): the
        pre-trained backbone with ``encoder_state_`` loaded into its trainable ``encoder_scope_``, frozen."""
        return TrainableBackbone.from_spec(spec, self.encoder_scope_, state=self.encoder_state_).frozen()
