"""Every error fewclip raises for a user to read, in one torch-free module.

Each derives from :class:`FewclipError`; its message names the file or value at fault and the fix, and the
command line prints it as one line (exit status 2) instead of a traceback. The packages re-export the classes
that belong to them (``fewclip.data.DataError``, ``fewclip.methods.MethodError``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class FewclipError(Exception):
    """Base class of every user-facing error."""


class CLIError(FewclipError):
    """A command-line usage error that argparse cannot catch."""


class DataError(FewclipError, ValueError):
    """A dataset, split, episode or prompt file that cannot be read as described."""


class DataWarning(UserWarning):
    """A dataset that loads but differs from the published one (counts, class names)."""


class BundleError(FewclipError, ValueError):
    """A bundle (or model) file or object that does not follow its format."""


class FeatureStoreError(FewclipError, ValueError):
    """A cache folder or shard that cannot be used."""


class ExtractionError(FewclipError, ValueError):
    """Extraction options that cannot be used (views, batch size, loader workers, ...)."""


class ProgressError(FewclipError, ValueError):
    """A progress setting that cannot be used (FEWCLIP_PROGRESS_SECONDS)."""


class _Bad(Protocol):
    path: str
    error: str


class BadImagesError(FewclipError, ValueError):
    """Unreadable or corrupt images; the message lists every one of them and the fix."""

    def __init__(self, bad: Sequence[_Bad], root: Path):
        self.bad = list(bad)
        lines = "\n".join(f"  {b.path}: {b.error}" for b in self.bad)
        super().__init__(
            f"{len(self.bad)} image(s) under {root} could not be read:\n{lines}\n"
            "Replace or delete these files, or pass --skip-bad-images (skip_bad_images=True) to leave them out "
            "and record them in the results. Features of the other images are cached already."
        )


class BackboneError(FewclipError, ValueError):
    """A model name, weights file or option that cannot be loaded."""


class PresetError(FewclipError, ValueError):
    """An unknown preprocessing or augmentation preset, or an image size a preset cannot use."""


class TextClassifierError(FewclipError, ValueError):
    """Templates or descriptions that cannot make a zero-shot classifier."""


class MethodError(FewclipError, ValueError):
    """Bad hyperparameters, or data a method cannot handle."""


class NotFittedError(FewclipError, RuntimeError):
    """A method used before ``fit`` succeeded."""


class ResultsError(FewclipError, ValueError):
    """A run configuration or results folder that cannot be used as asked."""


class ResultsLockedError(ResultsError):
    """A results folder another fewclip run is writing into now; the message names that run (pid, host, start)."""


class OutputError(ResultsError):
    """A results file that cannot be written: a file where the folder should be, no permission, a read-only file
    system or a full disk. The message names the path."""


class ClassifierError(FewclipError, ValueError):
    """A classifier file that cannot be used, or a backbone that is not the one it was fitted on."""
