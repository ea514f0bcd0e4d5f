"""The package surface of ``fewclip.data``: what it exports, and that importing it stays free of torch."""

from __future__ import annotations

import subprocess
import sys

from fewclip import data, errors

#: The public names as of the package's split into registry / readers / loader / episodes / samplers. Names may be
#: added; removing one breaks the code that imports it from ``fewclip.data``.
PUBLIC = {
    "DataError", "DataWarning", "DatasetInfo", "DatasetSplits", "Episode", "Item", "KIND_OPTIONS", "Prompts",
    "SAMPLERS", "SUBSAMPLES", "TEMPLATE_SETS", "VAL_KINDS", "base_new_labels", "canonical_imagenet_classnames",
    "dassl_fewshot", "dataset_info", "default_sampler", "episode_filename", "fill_template", "find_missing",
    "imbalance_counts", "import_coop_pickle", "list_datasets", "load_dataset", "load_episode", "load_prompts",
    "make_imbalanced", "portable_fewshot", "prompt_name", "read_split_json", "resolve_folder", "resolve_name",
    "sample_episode", "save_episode", "save_split", "subsample_classes", "subsample_splits", "template_set",
    "verify_episode",
}  # fmt: skip


def test_every_public_name_is_still_exported():
    assert PUBLIC <= set(data.__all__)
    assert [n for n in data.__all__ if not hasattr(data, n)] == []


def test_errors_are_the_project_wide_ones():
    assert data.DataError is errors.DataError and data.DataWarning is errors.DataWarning


def test_importing_data_does_not_import_torch():
    code = "import fewclip.data, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
