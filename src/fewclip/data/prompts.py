"""Prompt templates and class-description files, selected by ``--prompts``.

``--prompts`` takes a template-set name or a file:

- ``single``: the dataset's own template (``datasets.json``, CoOp's ``CUSTOM_TEMPLATES``);
- ``imagenet7``: the 7 templates of Tip-Adapter/APE/GDA on ImageNet (``templates.json``);
- ``imagenet80``: OpenAI's 80 templates, read from the installed open_clip;
- a ``.txt`` file (one template per line), a JSON list of templates, a JSON object of template lists keyed by
  dataset (CLIP_benchmark style), or a description file (CuPL style: ``{classname: [sentences]}``). Files are
  UTF-8 (a byte-order mark is dropped); other bytes are an error naming the file and the byte offset.

Templates use ``{}`` or ``{c}``; the class name goes in with underscores replaced by spaces. Classifiers
average the per-sentence embeddings of :meth:`Prompts.sentences`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError, DataWarning
from .classnames import open_clip_metadata, prompt_name
from .readers import decode_text
from .registry import dataset_info

TEMPLATE_SETS = ("single", "imagenet7", "imagenet80")


@cache
def _templates_table() -> dict[str, Any]:
    return json.loads(resources.files("fewclip.data").joinpath("templates.json").read_text(encoding="utf-8"))


def has_placeholder(template: str) -> bool:
    return "{}" in template or "{c}" in template


def fill_template(template: str, classname: str) -> str:
    """``template`` with ``{}`` / ``{c}`` replaced by ``classname`` (underscores become spaces)."""
    name = prompt_name(classname)
    return template.replace("{c}", name).replace("{}", name)


def template_set(name: str, dataset: str | None = None) -> list[str]:
    """The templates of a named set; ``single`` needs the dataset."""
    if name == "single":
        if dataset is None:
            raise DataError("the 'single' template set is per dataset; pass the dataset name.")
        return [dataset_info(dataset).template]
    entry = _templates_table()["sets"].get(name)
    if entry is None or name not in TEMPLATE_SETS:
        raise DataError(f"unknown template set {name!r}; valid: {', '.join(TEMPLATE_SETS)} or a prompt file path.")
    if "templates" in entry:
        return list(entry["templates"])
    found = [t("{}") for t in getattr(open_clip_metadata(), entry["open_clip"])]
    if len(found) != entry["count"]:
        raise DataError(
            f"template set {name!r}: open_clip's {entry['open_clip']} has {len(found)} templates, expected "
            f"{entry['count']}; check the installed open_clip version."
        )
    return found


@dataclass(frozen=True)
class Prompts:
    """Resolved ``--prompts``: templates, or per-class descriptions. ``sha256`` is the file's (None for sets)."""

    name: str
    kind: str  # "templates" | "descriptions"
    templates: tuple[str, ...] = ()
    descriptions: dict[str, list[str]] | None = None
    sha256: str | None = None

    def sentences(self, classnames: Sequence[str]) -> list[list[str]]:
        """One list of sentences per class, in label order."""
        if self.kind == "templates":
            return [[fill_template(t, c) for t in self.templates] for c in classnames]
        return _lookup_descriptions(self.descriptions or {}, classnames, self.name)


def _norm_key(name: str) -> str:
    return " ".join(prompt_name(name).lower().split())


def _lookup_descriptions(desc: dict[str, list[str]], classnames: Sequence[str], where: str) -> list[list[str]]:
    by_norm: dict[str, str] = {}
    for key in desc:
        by_norm.setdefault(_norm_key(key), key)
    out, missing, used = [], [], set()
    for c in classnames:
        key = c if c in desc else prompt_name(c) if prompt_name(c) in desc else by_norm.get(_norm_key(c))
        if key is None:
            missing.append(c)
            continue
        used.add(key)
        out.append(list(desc[key]))
    if missing:
        raise DataError(
            f"{where}: no descriptions for {len(missing)} of {len(classnames)} classes "
            f"({', '.join(repr(m) for m in missing[:5])}{', ...' if len(missing) > 5 else ''}); add them to the file."
        )
    extra = [k for k in desc if k not in used]
    if extra:
        warnings.warn(
            f"{where}: {len(extra)} description key(s) match no class ({', '.join(repr(e) for e in extra[:3])}).",
            DataWarning,
            stacklevel=3,
        )
    return out


def _check_templates(templates: list[Any], where: str) -> tuple[str, ...]:
    if not templates or not all(isinstance(t, str) for t in templates):
        raise DataError(f"{where}: templates must be a non-empty list of strings.")
    bad = [t for t in templates if not has_placeholder(t)]
    if bad:
        raise DataError(f"{where}: template {bad[0]!r} has no {{}} or {{c}} placeholder for the class name.")
    return tuple(templates)


def load_prompts(spec: str | Path, dataset: str | None = None) -> Prompts:
    """Resolve a ``--prompts`` value (a template-set name or a file) for ``dataset``."""
    if isinstance(spec, str) and spec in TEMPLATE_SETS:
        return Prompts(spec, "templates", tuple(template_set(spec, dataset)))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"--prompts {str(spec)!r}: neither a template set ({', '.join(TEMPLATE_SETS)}) nor a file.")
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    where = str(path)
    text = decode_text(raw, path)
    if path.suffix.lower() != ".json":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return Prompts(where, "templates", _check_templates(lines, where), sha256=sha)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc}).") from None
    if isinstance(obj, list):
        return Prompts(where, "templates", _check_templates(obj, where), sha256=sha)
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{where}: expected a list of templates or an object of lists.")
    for key, value in obj.items():
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise DataError(f"{where}: the value of {key!r} must be a list of strings.")
    if all(value and all(has_placeholder(s) for s in value) for value in obj.values()):
        # templates keyed by dataset (CLIP_benchmark style)
        if dataset is None:
            raise DataError(f"{where}: holds templates for datasets {sorted(obj)}; pass the dataset.")
        info = dataset_info(dataset)
        for key in (info.key, info.display, *info.names):
            for k in obj:
                if k.lower().replace("-", "_") == key.lower().replace("-", "_"):
                    return Prompts(f"{where}#{k}", "templates", _check_templates(obj[k], where), sha256=sha)
        raise DataError(f"{where}: no templates for {info.key}; keys present: {', '.join(sorted(obj))}.")
    return Prompts(where, "descriptions", descriptions={k: list(v) for k, v in obj.items()}, sha256=sha)
