"""A deployable classifier: one safetensors file with everything needed to label new images.

>>> clf = load_classifier("shots_16-seed_1.<run id>.classifier.safetensors")
>>> rows = clf.predict_images(["a.jpg", "b.png"], top_k=5)       # loads the backbone it was fitted on
>>> rows = clf.predict_features(features)                       # [N, D] image features of that backbone

File format ``fewclip-classifier/1`` (safetensors):

- tensors: the method's fitted tensors (those of its model file, :meth:`~fewclip.methods.Method.save`) under the
  prefix ``method.``, and ``text_weights`` [C, D], the zero-shot classifier of the class names under the prompts. A
  method fine-tuned on images (clip-ft, and any :class:`~fewclip.methods.image.ImageMethod`) carries its fine-tuned
  trainable parameters there (``method.encoder_state_/...``), with their SHA-256 (``encoder_sha256_``): predicting
  loads the pre-trained backbone, checks it, applies them and checks their hash;
- metadata (JSON strings): ``method`` (the model file's own metadata: method, params, preset, fitted scalars),
  ``classnames``, ``prompts`` (name, kind, SHA-256, templates), ``backbone`` (:meth:`BackboneSpec.to_dict`),
  ``weights`` (the weights' identity: SHA-256s of local files, else the tag or hub id) and ``preprocess`` (the
  evaluation transform's description).

Loading the backbone compares the weights' identity, before and after loading, with the stored one and refuses a
different backbone, naming both. ``load_classifier(path, pretrained=...)`` (``fewclip predict --pretrained``)
points at weights that moved: the new path replaces the spec's ``pretrained`` (or the folder of a ``local-dir:``
model), and the weights found there must still have the stored SHA-256. Images are encoded without the feature cache:
new images are usually seen once, and labelling a folder should not grow ``~/.cache/fewclip`` by one row per image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from .. import __version__
from ..errors import ClassifierError
from ..features.extract import extract
from ..io import atomic_write, read_safetensors
from ..methods import Method
from ..methods.registry import model_from_state
from ..models import Backbone, BackboneSpec

CLASSIFIER_FORMAT = "fewclip-classifier/1"
METHOD_PREFIX = "method."
#: what ``fewclip predict`` takes from a folder (lower-cased suffixes)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def classifier_bytes(
    model: Method,
    *,
    backbone_spec: BackboneSpec,
    classnames: Sequence[str],
    prompts_record: Mapping[str, Any],
    text_weights: torch.Tensor,
    weights_identity: Mapping[str, Any],
    preprocess: str | None = None,
) -> bytes:
    """The bytes of the classifier file of the fitted ``model`` (see the module's format)."""
    if model.inputs == "images" and not getattr(model, "encoder_state_", None):
        raise ClassifierError(f"{model.name}: the fitted model holds no fine-tuned encoder state to save.")
    meta_m, tensors_m = model.state()
    if text_weights.shape[0] != len(classnames):
        raise ClassifierError(f"text_weights has {text_weights.shape[0]} rows for {len(classnames)} class names.")
    tensors = {f"{METHOD_PREFIX}{k}": v for k, v in tensors_m.items()}
    tensors["text_weights"] = text_weights.detach().float().cpu().contiguous().clone()
    spec = dataclasses.replace(backbone_spec, device="cpu", cache_dir=None).to_dict()
    meta = {
        "format": CLASSIFIER_FORMAT,
        "method": json.dumps(meta_m),
        "classnames": json.dumps(list(classnames), ensure_ascii=False),
        "prompts": json.dumps(dict(prompts_record), ensure_ascii=False, default=str),
        "backbone": json.dumps(spec),
        "weights": json.dumps(dict(weights_identity), sort_keys=True),
        "preprocess": json.dumps(preprocess),
        "fewclip_version": __version__,
    }
    return safetensors_bytes(tensors, metadata=meta)


def save_classifier(path: str | os.PathLike, model: Method, **fields: Any) -> Path:
    """Write the classifier file of ``model`` to ``path`` atomically (``fields``: those of
    :func:`classifier_bytes`)."""
    data = classifier_bytes(model, **fields)
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


@dataclass
class Classifier:
    """A fitted method with its classes, prompts and backbone; rows are dicts (see :meth:`predict_images`)."""

    model: Method
    classnames: list[str]
    text_weights: torch.Tensor
    prompts: dict[str, Any]
    backbone_spec: BackboneSpec
    weights: dict[str, Any]
    preprocess: str | None
    path: str | None = None
    _backbone: Backbone | None = None

    @property
    def temperature(self) -> float:
        """The fitted temperature the logits are divided by (1.0 for a model without one)."""
        t = getattr(self.model, "temperature_", None)
        return 1.0 if t is None else float(t)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """[N, C] class probabilities: softmax of the method's logits divided by its temperature."""
        logits = self.model.predict_logits(features.float())
        return torch.softmax(logits / self.temperature, dim=1)

    def predict_features(self, features: torch.Tensor, *, top_k: int = 5, paths: Sequence[str] | None = None):
        """One row per feature row [N, D]: ``path`` (given ``paths``, else the row index), ``class``,
        ``probability``, ``top_k`` ([[class, probability], ...], most probable first)."""
        if features.ndim != 2:
            raise ClassifierError(f"features must be [N, D], got shape {tuple(features.shape)}.")
        probs = self.probabilities(features) if features.shape[0] else torch.zeros(0, len(self.classnames))
        k = max(1, min(int(top_k), len(self.classnames)))
        values, indices = probs.topk(k, dim=1)  # sorted, ties to the lower index as argmax
        rows = []
        for i in range(probs.shape[0]):
            top = [[self.classnames[j], float(p)] for j, p in zip(indices[i].tolist(), values[i].tolist(), strict=True)]
            cls = self.classnames[int(probs[i].argmax())]
            rows.append(
                {
                    "path": paths[i] if paths is not None else i,
                    "class": cls,
                    "probability": float(probs[i].max()),
                    "top_k": top,
                    "error": None,
                }
            )
        return rows

    def backbone(self, device: str | None = None) -> Backbone:
        """The backbone the model predicts from, loaded once; refused when its weights are not the stored ones. For a
        method fine-tuned on images: the pre-trained backbone with its fine-tuned parameters applied, refused too when
        their SHA-256 is not the one recorded at fitting."""
        if self._backbone is not None and (device is None or str(self._backbone.device) == str(torch.device(device))):
            return self._backbone
        spec = self.backbone_spec if device is None else dataclasses.replace(self.backbone_spec, device=device)
        self._check_weights(spec.weights_identity(), "its weights")
        if self.model.inputs == "images":
            backbone = self._finetuned(spec)
        else:
            backbone = spec.load()
        self._check_weights(backbone.identity.get("weights") or {}, "the loaded backbone")
        self._backbone = backbone
        return backbone

    def _finetuned(self, spec: BackboneSpec) -> Backbone:
        """The image method's fine-tuned encoder on the (checked) pre-trained weights of ``spec``."""
        model = self.model
        model.backbone_spec_ = spec.to_dict()
        model.__dict__.pop("_encoder_", None)
        encoder = model.image_encoder()
        found = (encoder.identity.get("finetuned") or {}).get("sha256")
        expected = getattr(model, "encoder_sha256_", None)
        if expected is None:  # every image method records it at fitting: without it nothing can be checked
            raise ClassifierError(
                f"{self.path or 'classifier'}: a classifier of a method fine-tuned on images without the SHA-256 of "
                "its fine-tuned parameters (encoder_sha256_); the file is damaged or not written by fewclip: re-save "
                "it with fewclip run --save-models."
            )
        if found != expected:
            raise ClassifierError(
                f"{self.path or 'classifier'}: its fine-tuned parameters hash to SHA-256 {found}, but {expected} was "
                "recorded when the model was fitted; the file is damaged: write it again (fewclip run --save-models)."
            )
        return encoder

    def _check_weights(self, found: Mapping[str, Any], what: str) -> None:
        expected = self.weights
        keys = ("sha256", "config_sha256") if expected.get("sha256") else tuple(expected)
        if {k: expected.get(k) for k in keys} != {k: found.get(k) for k in keys}:
            raise ClassifierError(
                f"{self.path or 'classifier'}: fitted on backbone weights {_describe(expected)}, but {what} "
                f"({self.backbone_spec.model}, {self.backbone_spec.pretrained}) are {_describe(found)}; load the "
                "backbone it was fitted on (a different one gives meaningless features)."
            )

    def predict_images(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        top_k: int = 5,
        batch_size: int = 128,
        device: str | None = None,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """One row per path, in order (the rows of :meth:`predict_features`); an unreadable image's row has
        ``class`` and ``probability`` None and its reason in ``error`` (none stops the others)."""
        backbone = self.backbone(device)
        names = [str(p) for p in paths]
        out = extract(
            backbone,
            Path("."),
            [str(Path(p).absolute()) for p in names],
            store=None,
            batch_size=batch_size,
            num_workers=num_workers,
            skip_bad_images=True,
            progress=progress,
            desc="predicting",
        )
        good = self.predict_features(out.features, top_k=top_k, paths=[names[i] for i in out.kept])
        rows: list[dict[str, Any] | None] = [None] * len(names)
        for i, row in zip(out.kept, good, strict=True):
            rows[i] = row
        errors = {b.path: b.error for b in out.bad}
        for i, name in enumerate(names):
            if rows[i] is None:
                reason = errors.get(str(Path(name).absolute()), "unreadable image")
                rows[i] = {"path": name, "class": None, "probability": None, "top_k": [], "error": reason}
        return rows  # type: ignore[return-value]


def _describe(identity: Mapping[str, Any]) -> str:
    if identity.get("sha256"):
        return f"SHA-256 {identity['sha256']}"
    return json.dumps(dict(identity), sort_keys=True)


def moved_weights(spec: BackboneSpec, pretrained: str | os.PathLike) -> BackboneSpec:
    """``spec`` with its weights at ``pretrained``: the folder of a ``local-dir:`` model, else the ``pretrained``
    file. Nothing is loaded; the weights found there are checked against the stored hash when the backbone loads."""
    where = str(Path(pretrained).expanduser())
    if spec.model.startswith("local-dir:"):
        if not Path(where).is_dir():
            raise ClassifierError(
                f"--pretrained {pretrained}: the classifier's model is a local-dir: folder ({spec.model}); give the "
                "folder it moved to (holding open_clip_config.json and the weights)."
            )
        return dataclasses.replace(spec, model=f"local-dir:{where}")
    if not Path(where).is_file():
        raise ClassifierError(f"--pretrained {pretrained}: no such weights file.")
    return dataclasses.replace(spec, pretrained=where)


def load_classifier(path: str | os.PathLike, pretrained: str | os.PathLike | None = None) -> Classifier:
    """The :class:`Classifier` in the file :func:`save_classifier` (or ``fewclip run --save-models``) wrote;
    ``pretrained``: where the backbone's weights are now, when they moved (:func:`moved_weights`; their SHA-256 must
    still be the stored one)."""
    meta, tensors = read_safetensors(path, expected_format=CLASSIFIER_FORMAT, what="classifier", error=ClassifierError)
    try:
        method_meta = json.loads(meta["method"])
        method_tensors = {k[len(METHOD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(METHOD_PREFIX)}
        model = model_from_state(method_meta, method_tensors, where=str(path))
        classnames = json.loads(meta["classnames"])
        spec = BackboneSpec.from_dict(json.loads(meta["backbone"]))
        if pretrained is not None:
            spec = moved_weights(spec, pretrained)
        text = tensors["text_weights"]
        out = Classifier(
            model=model,
            classnames=list(classnames),
            text_weights=text,
            prompts=json.loads(meta["prompts"]),
            backbone_spec=spec,
            weights=json.loads(meta["weights"]),
            preprocess=json.loads(meta.get("preprocess", "null")),
            path=str(path),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ClassifierError(f"{path}: not a usable classifier file ({type(exc).__name__}: {exc}).") from exc
    return out


def image_paths(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """The images ``inputs`` names: files as given, folders searched recursively for image suffixes (sorted),
    ``.txt`` files read as one path a line (relative to the file's folder; blank lines and ``#`` comments skipped).
    A missing input is an error naming it."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix.lower() == ".txt" and p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line).expanduser()
                    out.append(str(q if q.is_absolute() else p.parent / q))
        elif p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(str(p))  # a missing image file is reported as unreadable with the others
        else:
            raise ClassifierError(f"{item}: no such file or folder (give images, folders or a .txt list of paths).")
    return out
