"""Datasets, splits, prompts and few-shot episodes.

Load a dataset and draw an episode::

    from fewclip import data

    splits = data.load_dataset("caltech101", "/data")        # folder caltech-101/ (or an APE/Candle alias)
    episode = data.sample_episode(splits, k=16, seed=1)      # CoOp/Dassl-compatible draw
    base = episode.subsample_classes("base")                 # base-to-new: first ceil(C/2) labels
    image = splits.root / episode.train[0].path              # every Item opens as root / item.path
    texts = data.load_prompts("single", splits.name).sentences(splits.classnames)

Types: :class:`Item` (path, label, classname) and :class:`DatasetSplits` (train/val/test lists of items,
class names, image root, split SHA-256). Errors are :class:`DataError` (a ``ValueError``) with one-line
messages; count differences from the published numbers are :class:`DataWarning`.

Modules, bottom up: ``types`` (Item, DatasetSplits), ``registry`` (``datasets.json``, names, folders), ``readers``
(one split reader per dataset kind), ``datasets`` (:func:`load_dataset`), ``episodes`` (Episode, its file,
base/new classes), ``sampling`` (samplers, imbalance), ``coop_pickle`` (CoOp's few-shot pickles), ``prompts``,
``classnames`` and ``generate`` (small synthetic image sets). Import from ``fewclip.data``; the modules may move.
"""

from ..errors import DataError, DataWarning
from .classnames import canonical_imagenet_classnames, prompt_name
from .coop_pickle import import_coop_pickle
from .datasets import find_missing, load_dataset, save_split
from .episodes import (
    SUBSAMPLES,
    Episode,
    base_new_labels,
    episode_filename,
    load_episode,
    save_episode,
    subsample_classes,
    subsample_splits,
    verify_episode,
)
from .prompts import TEMPLATE_SETS, Prompts, fill_template, load_prompts, template_set
from .readers import KIND_OPTIONS, read_split_json
from .registry import DatasetInfo, dataset_info, list_datasets, resolve_folder, resolve_name
from .sampling import (
    SAMPLERS,
    VAL_KINDS,
    dassl_fewshot,
    default_sampler,
    imbalance_counts,
    make_imbalanced,
    portable_fewshot,
    sample_episode,
)
from .types import DatasetSplits, Item

__all__ = [
    "KIND_OPTIONS",
    "SAMPLERS",
    "SUBSAMPLES",
    "TEMPLATE_SETS",
    "VAL_KINDS",
    "DataError",
    "DataWarning",
    "DatasetInfo",
    "DatasetSplits",
    "Episode",
    "Item",
    "Prompts",
    "base_new_labels",
    "canonical_imagenet_classnames",
    "dassl_fewshot",
    "dataset_info",
    "default_sampler",
    "episode_filename",
    "fill_template",
    "find_missing",
    "import_coop_pickle",
    "imbalance_counts",
    "list_datasets",
    "load_dataset",
    "load_episode",
    "load_prompts",
    "make_imbalanced",
    "portable_fewshot",
    "prompt_name",
    "read_split_json",
    "resolve_folder",
    "resolve_name",
    "sample_episode",
    "save_episode",
    "save_split",
    "subsample_classes",
    "subsample_splits",
    "template_set",
    "verify_episode",
]
