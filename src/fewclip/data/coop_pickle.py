"""Import of CoOp's few-shot draws: ``split_fewshot/shot_{K}-seed_{S}.pkl`` files as episodes (:class:`Episode`).

CoOp (``KaiyangZhou/CoOp``) pickles a dict ``{"train": [Datum, ...], "val": [Datum, ...]}`` of Dassl's ``Datum``
objects (``KaiyangZhou/Dassl.pytorch``). The file is read through a restricted unpickler that builds only a
stand-in for ``Datum``, so neither Dassl nor anything else the pickle might name is imported or constructed.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from ..errors import DataError
from .episodes import Episode
from .sampling import group_by_label
from .types import DatasetSplits, Item


class _Datum:
    """Stand-in for Dassl's ``Datum`` (attributes ``_impath``, ``_label``, ``_classname``)."""


def _field(datum: _Datum, name: str) -> Any:
    """Dassl's ``_name`` attribute of ``datum`` (or ``name``), None when absent. Read from ``vars`` so that a
    pickled state cannot shadow a method of the stand-in."""
    d = vars(datum)
    return d.get(f"_{name}", d.get(name))


def _show(value: Any) -> str:
    """``value`` for a message: its type and a repr cut at 60 characters."""
    text = repr(value)
    return f"{text[:57] + '...' if len(text) > 60 else text} ({type(value).__name__})"


class _CoOpUnpickler(pickle.Unpickler):
    _ALLOWED = {("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"), ("builtins", "object")}

    def find_class(self, module: str, name: str) -> Any:
        if name == "Datum":
            return _Datum
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CoOp few-shot pickle holds only Datum)")


_PKL_NAME = re.compile(r"shot_(\d+)-seed_(\d+)\.pkl$")


def import_coop_pickle(
    pkl_path: str | Path, splits: DatasetSplits, *, k: int | None = None, seed: int | None = None
) -> Episode:
    """Convert CoOp's ``split_fewshot/shot_{K}-seed_{S}.pkl`` into an :class:`Episode` for ``splits``.

    The pickle is read through a restricted unpickler (no Dassl needed, nothing else is constructed). Absolute
    paths are rewritten relative to the image root by matching them against the split; every item must be in
    the split with the same label and name, and every class must have min(K, n) (or K) support images and, when
    the dataset has a val split, min(K, 4)-ish val images (incomplete bundles are rejected).
    """
    pkl_path = Path(pkl_path)
    m = _PKL_NAME.search(pkl_path.name)
    if (k is None or seed is None) and not m:
        raise DataError(f"{pkl_path}: name is not shot_K-seed_S.pkl; pass k= and seed= (CLI --shots, --seed).")
    k = int(m.group(1)) if k is None else k
    seed = int(m.group(2)) if seed is None else seed
    try:
        with open(pkl_path, "rb") as fh:
            data = _CoOpUnpickler(fh).load()
    except FileNotFoundError:
        raise DataError(f"{pkl_path}: no such file.") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{pkl_path}: not a CoOp few-shot pickle ({exc}).") from None
    if not isinstance(data, dict) or "train" not in data:
        found = f"keys {sorted(map(str, data))}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise DataError(
            f"{pkl_path}: expected a dict with 'train' (and 'val') lists of Datum, found {found}; "
            "use CoOp's split_fewshot/shot_K-seed_S.pkl."
        )
    if splits.val and "val" not in data:
        raise DataError(f"{pkl_path}: has no 'val' list, but {splits.name} has a val split (incomplete bundle).")
    known = {i.path: i for i in (*splits.train, *splits.val)}
    strip: int | None = None

    def relative(impath: str) -> str:
        nonlocal strip
        parts = impath.replace("\\", "/").split("/")
        if strip is not None and "/".join(parts[strip:]) in known:
            return "/".join(parts[strip:])
        for s in range(len(parts)):
            if "/".join(parts[s:]) in known:
                strip = s
                return "/".join(parts[s:])
        raise DataError(
            f"{pkl_path}: {impath} matches no image of {splits.name}'s split ({splits.split_source}); the pickle "
            "comes from another dataset or split file."
        )

    out: dict[str, list[Item]] = {}
    for part in ("train", "val"):
        rows = data.get(part, [])
        if not isinstance(rows, list):
            raise DataError(f"{pkl_path}: '{part}' is {_show(rows)}; expected a list of Datum objects.")
        items = []
        for n, d in enumerate(rows):
            where = f"{pkl_path}: {part}[{n}]"
            if not isinstance(d, _Datum):
                raise DataError(f"{where} is {_show(d)}; expected a Datum (impath, label, classname).")
            impath, label, name = _field(d, "impath"), _field(d, "label"), _field(d, "classname")
            if not isinstance(impath, str) or not impath:
                raise DataError(f"{where}: field impath is {_show(impath)}; expected the image path (a string).")
            if isinstance(label, bool) or not isinstance(label, int):
                raise DataError(f"{where}: field label is {_show(label)}; expected the class index (an int).")
            if not isinstance(name, str):
                raise DataError(f"{where}: field classname is {_show(name)}; expected the class name (a string).")
            rel = relative(impath)
            ref = known[rel]
            if label != ref.label or name != ref.classname:
                raise DataError(
                    f"{pkl_path}: {rel} has label {label} ({name!r}); the split says {ref.label} ({ref.classname!r})."
                )
            items.append(ref)
        out[part] = items
    _check_counts(out["train"], splits.train, k, pkl_path, "train")
    if splits.val:
        _check_counts(out["val"], splits.val, min(k, 4), pkl_path, "val")
    return Episode(
        dataset=splits.name,
        train=out["train"],
        val=out["val"],
        classnames=list(splits.classnames),
        k=k,
        seed=seed,
        sampler="dassl",
        split_sha256=splits.split_sha256,
        val_kind="fewshot" if out["val"] else "none",
        source=f"coop-pickle:{pkl_path.name}",
    )


def _check_counts(items: list[Item], full: list[Item], k: int, where: Path, part: str) -> None:
    have = {y: len(g) for y, g in group_by_label(items).items()}
    for y, group in group_by_label(full).items():
        n = have.get(y, 0)
        if n not in (k, min(k, len(group))):
            name = group[0].classname
            raise DataError(
                f"{where}: incomplete bundle: class {y} ({name!r}) has {n} {part} image(s), expected "
                f"{min(k, len(group))} (K={k}); re-run CoOp's sampling or sample with fewclip."
            )
