"""Published numbers to compare results with, shipped as data: ``protocols/published/<method>.json``.

Every number comes from fewclip's reference specifications (``specs/*.md``), each with the source the spec names (a
paper table, a log committed to a repository, a README), never from memory. One file per method
(``fewclip-published/1``)::

    {"format": "fewclip-published/1", "method": "gda", "display": "GDA", "notes": "what is not included and why",
     "entries": [{"backbone": "RN50", "protocol": "fewshot", "dataset": "average", "shots": [1, 2, 4, 8, 16],
                  "values": {"test_accuracy": [62.19, 66.19, 69.77, 73.31, 76.05]},
                  "source": "mrflogs/ICLR24: logs/fewshots.log, exp.log", "kind": "log",
                  "spec": "gda_and_baselines.md §3.5", "status": "confirmed",
                  "published_selection": "α chosen on the full CoOp validation split, ImageNet's on test; 3 seeds"}]}

- ``backbone``: the OpenAI CLIP model (``RN50``, ``ViT-B/16``, ...); ``dataset``: a dataset key or ``average`` (the
  11-dataset mean); ``shots`` null for a number that does not depend on them (zero-shot); ``values``: per field
  (``test_accuracy``; ``base``, ``new``, ``harmonic_mean`` for base-to-new), one value per shot count.
- ``kind``: ``log`` (a file committed to the repository), ``paper``, ``readme``, ``figure`` (read off a plot).
- ``status``: ``confirmed`` (the spec names the table or file), ``approximate`` (read off a figure, about ±0.3) or
  ``unconfirmed`` (the spec marks it so: a recollection or a rough read-off). The report leaves unconfirmed numbers
  out unless asked.
- ``published_selection``: how the publication chose its hyperparameters (full validation split, test, none), so a
  reader compares like with like.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..errors import ResultsError

PUBLISHED_FORMAT = "fewclip-published/1"
STATUSES = ("confirmed", "approximate", "unconfirmed")
KINDS = ("log", "paper", "readme", "figure")
#: OpenAI CLIP models by the names results record (open_clip names with ``--pretrained openai``, transformers ids)
OPENAI_MODELS = {
    "RN50": "RN50",
    "RN101": "RN101",
    "ViT-B-32": "ViT-B/32",
    "ViT-B-16": "ViT-B/16",
    "ViT-L-14": "ViT-L/14",
    "openai/clip-vit-base-patch32": "ViT-B/32",
    "openai/clip-vit-base-patch16": "ViT-B/16",
    "openai/clip-vit-large-patch14": "ViT-L/14",
}


@dataclass(frozen=True)
class Published:
    """One published number: ``method`` on ``dataset`` (or ``average``) with ``backbone`` at ``shots`` (None: any)."""

    method: str
    display: str
    backbone: str
    protocol: str
    dataset: str
    shots: int | None
    key: str
    value: float
    source: str
    kind: str
    spec: str
    status: str
    published_selection: str
    approximate: bool = False
    note: str | None = None

    @property
    def text(self) -> str:
        """The value as published: ``≈`` before a read-off value."""
        return f"{'≈' if self.approximate else ''}{self.value:.2f}"


def _files() -> list[tuple[str, str]]:
    folder = resources.files("fewclip.protocols").joinpath("published")
    return sorted((f.name, f.read_text(encoding="utf-8")) for f in folder.iterdir() if f.name.endswith(".json"))


def parse_published(name: str, text: str) -> tuple[dict[str, Any], list[Published]]:
    """(file header, its numbers) of one published-numbers file; a malformed file raises :class:`ResultsError` naming
    the file, the entry and the field."""
    where = f"published numbers {name}"
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ResultsError(f"{where}: not valid JSON ({exc}).") from exc
    if not isinstance(doc, dict) or doc.get("format") != PUBLISHED_FORMAT:
        raise ResultsError(f"{where}: not a {PUBLISHED_FORMAT} file.")
    out = []
    for i, e in enumerate(doc.get("entries", [])):
        at = f"{where}, entry {i}"
        for key in ("backbone", "protocol", "dataset", "source", "kind", "spec", "status", "published_selection"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise ResultsError(f"{at}: '{key}' must be a non-empty string (every number needs its source).")
        if e["status"] not in STATUSES or e["kind"] not in KINDS:
            raise ResultsError(f"{at}: status {e['status']!r} / kind {e['kind']!r}; valid: {STATUSES} / {KINDS}.")
        shots = e.get("shots")
        if shots is not None and not (isinstance(shots, list) and all(isinstance(k, int) for k in shots)):
            raise ResultsError(f"{at}: 'shots' must be null or a list of shot counts.")
        values = e.get("values")
        if not isinstance(values, dict) or not values:
            raise ResultsError(f"{at}: 'values' must map a field to its numbers.")
        for key, numbers in values.items():
            count = 1 if shots is None else len(shots)
            if not isinstance(numbers, list) or len(numbers) != count:
                raise ResultsError(f"{at}: values[{key!r}] must hold {count} number(s), one per shot count.")
            for k, value in zip(shots or [None], numbers):
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
                    raise ResultsError(f"{at}: values[{key!r}] has {value!r}, not an accuracy in [0, 100].")
                out.append(
                    Published(
                        doc["method"], doc.get("display", doc["method"]), e["backbone"], e["protocol"], e["dataset"],
                        k, key, float(value), e["source"], e["kind"], e["spec"], e["status"],
                        e["published_selection"], bool(e.get("approximate")), e.get("note"),
                    )
                )  # fmt: skip
    return doc, out


def load_published(include_unconfirmed: bool = False) -> list[Published]:
    """Every shipped published number (the unconfirmed ones only with ``include_unconfirmed``)."""
    out = []
    for name, text in _files():
        out.extend(parse_published(name, text)[1])
    return [p for p in out if include_unconfirmed or p.status != "unconfirmed"]


def published_notes() -> dict[str, str]:
    """method → the file's note (what is not included and why)."""
    return {doc["method"]: doc.get("notes", "") for doc, _ in (parse_published(n, t) for n, t in _files())}


def published_backbone(model: str | None, pretrained: str | None, overrides: Mapping[str, str] | None = None,
                       slug: str | None = None) -> str | None:  # fmt: skip
    """The published backbone name (``RN50``, ``ViT-B/16``) a result's backbone is compared with: ``overrides``
    (backbone folder name → published name, ``--published-as``) first; else an OpenAI CLIP model by its open_clip name
    with ``pretrained="openai"`` (``ViT-B/16`` or ``ViT-B-16``), or a transformers ``openai/clip-vit-*`` id; else None
    (other weights are not what the papers used)."""
    if overrides and slug in overrides:
        return overrides[slug]
    if not model:
        return None
    if model.startswith("openai/"):
        return OPENAI_MODELS.get(model)
    if (pretrained or "").lower() == "openai":
        return OPENAI_MODELS.get(model.replace("/", "-"))
    return None


def matches(published: Sequence[Published], method: str, backbone: str, protocol: str, dataset: str,
            shots: int) -> list[Published]:  # fmt: skip
    """The published numbers of ``method`` on ``dataset`` (or ``average``) with ``backbone`` at ``shots`` (numbers
    that do not depend on shots match every shot count)."""
    return [
        p
        for p in published
        if p.method == method
        and p.backbone == backbone
        and p.protocol == protocol
        and p.dataset == dataset
        and (p.shots is None or p.shots == shots)
    ]
