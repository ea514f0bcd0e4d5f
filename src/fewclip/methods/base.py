"""The estimator contract every method follows (scikit-learn style).

- A method is a keyword-only dataclass of hyperparameters, each declared once with its default and its constraint
  (:func:`~fewclip.methods.params.param`). The constructor stores them and does nothing else.
- ``fit(data)`` checks every hyperparameter against its constraint, then what depends on the data or on two
  hyperparameters at once (the ``_check`` hook), all before any work; then ``_fit`` learns (hyperparameter
  selection included) on the data **without its test split**, so nothing it selects can depend on test data, and
  returns the values it selected. The base class records them (``selected_``), which selection ran
  (``selection_used_``), the validation accuracy (``val_accuracy_``) and the fitted markers ``num_classes_`` and
  ``dim_``, and moves fitted tensors to the CPU: only once ``_fit`` has succeeded. A ``fit`` that raises leaves no
  fitted state at all, so the estimator reports :class:`NotFittedError` afterwards.
- Learned state lives in attributes ending with ``_`` (private caches too, e.g. ``_layout_``); ``save`` writes the
  public ones (tensors to safetensors, everything else to JSON metadata) plus the hyperparameters and the preset.
- ``preset`` is provenance, not a hyperparameter: :func:`~fewclip.methods.create` records the preset it loaded on the
  instance, and ``hyperparameters()`` reports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import MethodError, NotFittedError
from ..io import atomic_write
from ..metrics import accuracy
from .calibration import apply_offset, best_offset
from .cv import CV_SEED, cv_fold_count, cv_fold_ids, fold_bundle
from .params import Constraint, Options, constraint_of, param, validate
from .temperature import calibration_record, fit_temperature

MODEL_FORMAT = "fewclip-model/1"
#: joins a fitted dict-of-tensors attribute and an entry's name in a model file ("encoder_state_/visual.proj")
STATE_SEPARATOR = "/"
SELECTIONS = ("val", "cv", "none")
CALIBRATIONS = ("auto", "val", "none")
#: what ``fit`` takes, by the value of :attr:`Method.inputs`
INPUTS = ("features", "images")


class FitData(Protocol):
    """What :meth:`Method.fit` itself reads from its data, whatever the kind: a
    :class:`~fewclip.features.bundle.Bundle` (``inputs = "features"``) or an image episode (``inputs = "images"``).

    ``dim`` (the feature dimension) is read when present; data without it (images) leaves ``dim_`` to the fitted
    model (:meth:`Method._fitted_dim`). The validation split is read only by :meth:`Method._validation_accuracy`,
    which a method fitted on images overrides.
    """

    @property
    def has_val(self) -> bool: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def classnames(self) -> Sequence[str]: ...

    def shots_per_class(self) -> torch.Tensor: ...

    def without_test(self) -> FitData: ...


@dataclass(kw_only=True, repr=False, eq=False)
class Method:
    """Base class. A subclass is registered (``@register("name")``), decorated with
    ``@dataclass(kw_only=True, repr=False, eq=False)``, declares its hyperparameters with
    :func:`~fewclip.methods.params.param`, and implements ``_fit`` (returning the selected values) and ``_logits``;
    checks that need the data or two hyperparameters go in ``_check``."""

    name: ClassVar[str] = ""
    #: What ``fit`` takes. ``"features"``: a :class:`~fewclip.features.bundle.Bundle` of cached CLIP features (every
    #: method today). ``"images"``: an image episode, for a method that back-propagates through CLIP's encoders; it
    #: still predicts from features, those of its fine-tuned encoder.
    inputs: ClassVar[str] = "features"
    #: True when ``selection="val"`` chooses something on the validation split; such a method refuses data without
    #: one, unless :attr:`falls_back_without_validation`. False for a method with nothing to select (zero-shot): it
    #: accepts data without validation, and records ``selection_used_ = "none"``.
    selects_on_validation: ClassVar[bool] = True
    #: True when, under ``selection="val"``, data without a validation split is accepted and the method keeps what it
    #: would keep under ``selection="none"`` (Candle: the last epoch), recording ``selection_used_ = "none"``.
    falls_back_without_validation: ClassVar[bool] = False
    #: True when every class needs at least one support image.
    needs_support_for_every_class: ClassVar[bool] = False
    #: True when ``selection="cv"`` is implemented: a fit with ``selection="val"`` leaves ``_cv_counts_`` (the
    #: validation counts over a grid that does not depend on the data) and ``_cv_values(index)`` maps a grid index to
    #: the constructor values that fix that choice; or the method overrides :meth:`_cv_select`.
    cross_validates: ClassVar[bool] = False

    #: Provenance, not a hyperparameter: the preset :func:`~fewclip.methods.create` loaded (its canonical key), or None.
    preset = None
    #: True on the copies cross-validation fits on its folds: they fit no temperature (T = 1.0); the final model does
    _cv_fold_probe = False
    #: on those copies: the number of support images of all the data (a method whose scale depends on the count can
    #: score a fold in the units of the full support, e.g. the cache methods' α)
    _cv_full_rows = None

    selection: str = param(
        "val",
        Options(SELECTIONS),
        doc="'val': choose the hyperparameters (epochs, α, β, ...) on the validation split; 'cv': choose them by "
        "stratified k-fold cross-validation over the support images (k = min(K, 4)), then fit on all of them; 'none': "
        "keep the initial values",
        hint="There is no selection on test.",
    )
    calibrate: str = param(
        "auto",
        Options(CALIBRATIONS),
        doc="offset δ subtracted from the logits of the classes with support (calibrated stacking), chosen on "
        "validation with the method's own selection. 'auto': when the data has classes without support, a "
        "validation split and selection='val'; 'val': also for a method that selects nothing (zero-shot); 'none': "
        "off (δ = 0, the logits as the method computes them)",
        hint="There is no calibration on test.",
    )

    # ------------------------------------------------------------------ parameters
    @classmethod
    def param_fields(cls) -> list[Field]:
        """The hyperparameter fields: the method's own, then those every method has (``selection``)."""
        common = Method.__dataclass_fields__
        every = fields(cls)
        return [f for f in every if f.name not in common] + [f for f in every if f.name in common]

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in cls.param_fields()]

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {f.name: f.default for f in cls.param_fields()}

    @classmethod
    def constraints(cls) -> dict[str, Constraint | None]:
        """Each hyperparameter's constraint (None where a field has none, which ``register`` refuses)."""
        return {f.name: constraint_of(f) for f in cls.param_fields()}

    @classmethod
    def merge_preset(cls, preset_values: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments for a preset's values overridden by the user's ``params`` (a method whose preset
        values depend on what the user sets overrides this)."""
        return {**preset_values, **params}

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names()}

    def __repr__(self) -> str:
        defaults = self.default_params()
        changed = {k: v for k, v in self.get_params().items() if defaults.get(k, object()) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ fitting
    def fit(self, data: FitData) -> Self:
        """Validate, learn, record; returns ``self``. Any earlier fitted state is dropped first."""
        self._reset()
        try:
            self.validate_params()
            self._check_data(data)
            dim = getattr(data, "dim", None)
            if dim is not None:
                self.check_dim(int(dim))
            self._check(data)
            train = data.without_test()
            self.seen_classes_ = (data.shots_per_class() > 0).cpu()
            self._calibrating_ = self._calibration_applies(data)
            cv = self.selection == "cv" and self.selects_on_validation
            selected = self._fit_cv(train) if cv else self._fit(train)
            self._move_fitted_to_cpu()
            self._calibrate(train)
            self.selected_ = {
                **selected,
                "calibration": "val" if self._calibrating_ else "none",
                "calibration_offset": self.calibration_offset_,
            }
            val_used = self.selection == "val" and self.selects_on_validation and data.has_val
            self.selection_used_ = "val" if val_used else "cv" if cv else "none"
            self.num_classes_ = data.num_classes
            self.dim_ = int(dim) if dim is not None else self._fitted_dim()
            self.val_accuracy_ = self._validation_accuracy(train)
            self._fit_temperature(train)
            self.selected_["temperature"] = self.temperature_
        except BaseException:
            self._reset()
            raise
        return self

    def validate_params(self, names: Iterable[str] | None = None) -> None:
        """Check the hyperparameters (or those in ``names``) against their constraints; all of them also against
        each other (the ``_check_params`` hook). Needs no data: ``fewclip run`` calls it before any image is
        encoded."""
        values = self.get_params() if names is None else {key: getattr(self, key) for key in names}
        validate(self.name, {f.name: f for f in self.param_fields()}, values)
        if names is None:
            self._check_params()

    def _check_params(self) -> None:
        """Checks of hyperparameters together, or of what they would allocate, that need no data (raise
        :class:`MethodError`). Nothing by default."""

    def check_dim(self, dim: int) -> None:
        """Checks that need only the feature dimension D (a channel count, attention heads): run by ``fit``, and by
        ``fewclip run`` as soon as the backbone is loaded, before any image is encoded (raise
        :class:`MethodError`). Nothing by default."""

    def _check_data(self, data: FitData) -> None:
        """What every method requires of the data: validation data for ``selection="val"``, support per class."""
        needs_val = self.selects_on_validation and not self.falls_back_without_validation
        if needs_val and self.selection == "val" and not data.has_val:
            raise MethodError(
                f"{self.name}: selection='val' needs validation data, but the data has no val_features/val_labels "
                "(missing, or 0 rows). Either add a validation split, or use selection='none' (--selection none) to "
                "keep the method's initial hyperparameter values."
            )
        if self.selection == "cv" and self.selects_on_validation:
            self._check_cv(data)
        if self.needs_support_for_every_class:
            missing = (data.shots_per_class() == 0).nonzero().flatten().tolist()
            if missing:
                names = [data.classnames[i] for i in missing[:5]]
                raise MethodError(
                    f"{self.name} needs at least one support image per class, but {len(missing)} class(es) have none "
                    f"(e.g. {names}). Use a method that handles classes without support (zero-shot, tip-adapter, ape)."
                )

    def cv_refusal(self, data: FitData) -> str | None:
        """Why ``selection="cv"`` cannot run on ``data`` (no implementation, an image method, too few support images),
        the message ``fit`` would raise; None when it can. ``fewclip run`` asks this under an automatic cv, to fall
        back per method instead of refusing the run."""
        try:
            self._check_cv(data)
        except MethodError as exc:
            return str(exc)
        return None

    def _check_cv(self, data: FitData) -> None:
        """``selection="cv"``: a method that implements it, features, and support that can be split (K ≥ 2 where every
        class needs support in every fold's training part)."""
        fallback = "use selection='none' (--selection none) to keep the initial values, or add a validation split"
        if self.inputs != "features":
            raise MethodError(
                f"{self.name}: selection='cv' is not implemented for a method fine-tuned on images (it would fine-tune "
                "the encoder once per fold); use selection='none' (--selection none) to keep the last epoch, or add a "
                "validation split."
            )
        if not self.cross_validates:
            raise MethodError(f"{self.name}: selection='cv' is not implemented for this method; {fallback}.")
        shots = data.shots_per_class()
        smallest = int(shots[shots > 0].min()) if bool((shots > 0).any()) else 0
        if smallest < 2 and self.needs_support_for_every_class:
            raise MethodError(
                f"{self.name}: selection='cv' holds out support images, but a class has {smallest} support image(s) "
                f"and {self.name} needs support for every class in every fold (K ≥ 2); {fallback}."
            )
        if int(data.num_support) < 2:
            raise MethodError(f"{self.name}: selection='cv' needs at least 2 support images; {fallback}.")

    def _cv_seed(self) -> int:
        """The folds' seed: the method's ``seed`` hyperparameter where it has one, else :data:`CV_SEED`."""
        return int(getattr(self, "seed", CV_SEED))

    def _fit_cv(self, data: Any) -> dict[str, Any]:
        """``selection="cv"``: choose on stratified folds of the support images (:meth:`_cv_select`), then fit on all
        of them with the chosen values fixed (``selection="none"``); the constructor values are restored afterwards,
        what was chosen is in ``selected_``."""
        k = cv_fold_count(data.shots_per_class())
        seed = self._cv_seed()
        ids = cv_fold_ids(data.support_labels, data.num_classes, k, seed)
        folds = [fold_bundle(data, ids == f) for f in range(k)]
        self._cv_full_rows = int(data.num_support)  # the fold copies' (the final fit's ratio to it is 1)
        try:
            return self._cv_choose_and_fit(data, k, seed, ids, folds)
        finally:
            self._cv_full_rows = None

    def _cv_choose_and_fit(
        self, data: Any, k: int, seed: int, ids: torch.Tensor, folds: Sequence[Any]
    ) -> dict[str, Any]:
        """The body of :meth:`_fit_cv`: choose on the ``folds`` (fold of each support image in ``ids``), fit on all
        support with the choice fixed, record ``cv_`` and the out-of-fold rows of the temperature."""
        chosen, best_correct = self._cv_select(folds)
        saved = self.get_params()
        try:
            for key, value in {**chosen, "selection": "none"}.items():
                setattr(self, key, value)
            selected = self._fit(data)
        finally:
            for key, value in saved.items():
                setattr(self, key, value)
        self.cv_ = {
            "folds": k,
            "seed": seed,
            "fold_sizes": [int((ids == f).sum()) for f in range(k)],
            "rows": int(data.num_support),
            "best_correct": best_correct,
            "chosen": chosen,
        }
        self._cv_oof_ = self._cv_out_of_fold(folds, saved, chosen)
        return {**selected, "cv_folds": k, "cv_seed": seed}

    def _cv_out_of_fold(
        self, folds: Sequence[Any], params: Mapping[str, Any], chosen: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Out-of-fold (logits [N, C], labels [N]) of the chosen configuration, for the temperature: on each fold, a
        copy with the chosen values fixed (``selection="none"``, uncalibrated) fitted on the fold's training part
        predicts its held-out images."""
        logits, labels = [], []
        for fold in folds:
            probe = self._cv_fixed({**params, **chosen, "selection": "none", "calibrate": "none"}).fit(fold)
            logits.append(probe.predict_logits(fold.val_features.cpu()))
            labels.append(fold.val_labels.cpu())
        return torch.cat(logits), torch.cat(labels)

    def _cv_fixed(self, values: Mapping[str, Any]) -> Method:
        """An unfitted copy with the constructor ``values`` (a fold's fit with the chosen values fixed), fitting no
        temperature of its own."""
        probe = type(self)(**values)
        probe._cv_fold_probe, probe._cv_full_rows = True, self._cv_full_rows
        return probe

    def _cv_probe(self) -> Method:
        """An unfitted copy that selects on a fold's validation split, uncalibrated, fitting no temperature."""
        probe = type(self)(**{**self.get_params(), "selection": "val", "calibrate": "none"})
        probe.preset = self.preset
        probe._cv_fold_probe, probe._cv_full_rows = True, self._cv_full_rows
        return probe

    def _cv_select(self, folds: Sequence[Any]) -> tuple[dict[str, Any], int]:
        """The constructor values chosen on ``folds`` and their summed correct count: each fold fitted with
        ``selection="val"``, its validation counts over the method's grid (``_cv_counts_``) summed over the folds,
        the first maximum (the grid's own tie order) mapped back by ``_cv_values``."""
        total, probe = None, None
        for fold in folds:
            probe = self._cv_probe().fit(fold)
            counts = probe._cv_counts_.double()
            total = counts if total is None else total + counts
        flat = total.reshape(-1)
        pos = int((flat == flat.max()).nonzero()[0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), total.shape))
        return probe._cv_values(index), int(flat[pos])

    def _cv_values(self, index: tuple[int, ...]) -> dict[str, Any]:  # pragma: no cover - per method
        """The constructor values that fix the choice at ``index`` of ``_cv_counts_``."""
        raise NotImplementedError

    def _calibration_applies(self, data: FitData) -> bool:
        """Whether ``fit`` chooses a calibration offset (see the ``calibrate`` hyperparameter): features with classes
        with and without support, a validation split, and a selection on it."""
        if self.calibrate == "none" or self.inputs != "features" or not data.has_val:
            return False
        if self.selection != "val" or (self.calibrate == "auto" and not self.selects_on_validation):
            return False
        seen = data.shots_per_class() > 0
        return bool(seen.any()) and not bool(seen.all())

    def _selection_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """The validation accuracy a method's own selection (an epoch, a ratio) maximises: that of ``logits`` as they
        are, or, while calibrating, at their best offset (so the selection and the offset are chosen jointly)."""
        if getattr(self, "_calibrating_", False):
            offset, _, _ = best_offset(logits.float().cpu(), labels.cpu(), self.seen_classes_)
            return accuracy(apply_offset(logits.float().cpu(), self.seen_classes_, offset), labels.cpu())
        return accuracy(logits, labels)

    def _calibrate(self, data: Any) -> None:
        """Set ``calibration_offset_``: 0.0 when not calibrating; the value a joint search in ``_fit`` chose (a cache
        method's grid, GDA's α); otherwise the best offset for the selected model's validation logits."""
        if not self._calibrating_:
            self.calibration_offset_ = 0.0
            return
        if hasattr(self, "calibration_offset_"):
            return
        self.calibration_offset_ = 0.0
        self.num_classes_ = data.num_classes  # predict_logits needs the fitted markers; fit sets them again
        self.dim_ = int(data.dim)
        logits = self.predict_logits(data.val_features.cpu())
        offset, correct, grid = best_offset(logits, data.val_labels.cpu(), self.seen_classes_)
        self.calibration_offset_ = offset
        self.calibration_search_ = {"points": int(grid.numel()), "best_correct": correct}

    def _fit_temperature(self, data: Any) -> None:
        """Set ``temperature_`` (temperature scaling of the probabilities, :mod:`~fewclip.methods.temperature`) and
        ``temperature_fit_`` (where it was fitted, on how many rows, the ECE there before and after). Fitted on the
        final model's validation logits (calibration offset applied) under ``selection="val"``; on the out-of-fold
        logits of the chosen configuration under ``selection="cv"`` (a method fitted on images: its validation images
        encoded by its fine-tuned encoder, :meth:`_temperature_rows`); otherwise (no validation split, ``"none"``)
        T = 1.0. Never changes ``predict_logits``."""
        rows, source = (None, "none") if self._cv_fold_probe else self._temperature_rows(data)
        if rows is None:
            self.temperature_ = 1.0
            self.temperature_fit_ = {"source": "none", "rows": 0, "val_ece_before": None, "val_ece_after": None}
            return
        logits, labels = rows
        self.temperature_ = fit_temperature(logits, labels)
        ece = calibration_record(logits, labels, self.temperature_)
        self.temperature_fit_ = {
            "source": source,
            "rows": int(labels.numel()),
            "val_ece_before": ece["before"],
            "val_ece_after": ece["after"],
        }

    def _temperature_rows(self, data: Any) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
        """((logits [M, C], labels [M]) to fit the temperature on, or None; their source: "val", "cv" or "none").
        Features: the validation features, or the out-of-fold logits under cv; a method fitted on images overrides
        this (its validation images through its fine-tuned encoder)."""
        if self.selection == "cv" and hasattr(self, "_cv_oof_"):
            rows = self._cv_oof_
            del self._cv_oof_
            return rows, "cv"
        if self.selection == "val" and self.inputs == "features" and data.has_val:
            return (self.predict_logits(data.val_features.cpu()), data.val_labels.cpu()), "val"
        return None, "none"

    def _check(self, data: Any) -> None:
        """Checks that depend on the data or on two hyperparameters at once (run before any work; raise
        :class:`MethodError`). Nothing by default."""

    def _fit(self, data: Any) -> dict[str, Any]:  # pragma: no cover - abstract
        """Learn from ``data`` (no test split) and return the selected values (recorded as ``selected_``)."""
        raise NotImplementedError

    def _validation_accuracy(self, data: Any) -> float | None:
        """The fitted model's accuracy on the validation split (None without one). Features: score the bundle's
        validation features; a method fitted on images overrides this."""
        if not data.has_val:
            return None
        return self.score(data.val_features.cpu(), data.val_labels.cpu())

    def _fitted_dim(self) -> int:
        """The feature dimension the fitted model predicts from, for data without ``dim`` (an image episode): an
        image method overrides this with the width of its image features."""
        raise MethodError(f"{self.name}: the data has no feature dimension (dim) and the method reports none.")

    def _fitted_names(self) -> list[str]:
        return [k for k in vars(self) if k.endswith("_") and not k.startswith("__")]

    def _reset(self) -> None:
        """Drop every fitted attribute (public ``x_`` and private ``_x_``)."""
        for key in self._fitted_names():
            delattr(self, key)

    def _move_fitted_to_cpu(self) -> None:
        for key in self._fitted_names():
            value = getattr(self, key)
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                setattr(self, key, value.cpu())

    def _check_fitted(self) -> None:
        if not hasattr(self, "dim_"):
            raise NotFittedError(f"this {self.name} estimator is not fitted yet; call fit(bundle) first.")

    # ------------------------------------------------------------------ prediction
    def predict_logits(self, features: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """[M, C] float32 logits for raw (or normalised) image features [M, D]."""
        self._check_fitted()
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.dim_:
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise MethodError(f"{self.name}: features have shape {shape}; expected [M, {self.dim_}].")
        features = features.float()
        if not bool(torch.isfinite(features).all()):
            raise MethodError(f"{self.name}: features hold NaN or infinite values.")
        with torch.no_grad():
            parts = [self._logits(features[i : i + batch_size]) for i in range(0, features.shape[0], batch_size)]
        logits = torch.cat(parts) if parts else torch.zeros(0, self.num_classes_)
        offset = getattr(self, "calibration_offset_", 0.0)
        return apply_offset(logits, self.seen_classes_.to(logits.device), offset) if offset else logits

    def _logits(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Arg-max class per row; ties go to the lowest class index."""
        return self.predict_logits(features).argmax(dim=1)

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        """[M, C] float32 class probabilities: softmax(predict_logits / ``temperature_``) (T = 1.0 for a model file
        written before temperatures were fitted)."""
        logits = self.predict_logits(features)
        return torch.softmax(logits / float(getattr(self, "temperature_", 1.0)), dim=1)

    def calibration_report(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """The results file's ``calibration`` record: the temperature, where it was fitted, the ECE (percent) on those
        rows before and after, and on the test ``logits`` [M, C] / ``labels`` [M] before and after (reported only:
        nothing is chosen on them)."""
        temperature = float(getattr(self, "temperature_", 1.0))
        fit = getattr(self, "temperature_fit_", {})
        test = calibration_record(logits, labels, temperature)
        return {
            "temperature": temperature,
            "source": fit.get("source", "none"),
            "val_ece_before": fit.get("val_ece_before"),
            "val_ece_after": fit.get("val_ece_after"),
            "test_ece_before": test["before"],
            "test_ece_after": test["after"],
        }

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in percent."""
        return accuracy(self.predict_logits(features), labels)

    def hyperparameters(self) -> dict[str, Any]:
        """The values that ran: the hyperparameters, the preset they came from, and what selection chose."""
        self._check_fitted()
        out = self.get_params()
        out["preset"] = self.preset
        out.update(self.selected_)
        return out

    # ------------------------------------------------------------------ persistence
    def _fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, scalars = {}, {}
        for key, value in vars(self).items():
            if not key.endswith("_") or key.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().clone()  # own storage: safetensors refuses aliases
            elif isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                for name, tensor in value.items():  # a state dict (fine-tuned weights): one tensor per entry
                    tensors[f"{key}{STATE_SEPARATOR}{name}"] = tensor.detach().cpu().clone()
            else:
                scalars[key] = value
        return tensors, scalars

    def state(self) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """(metadata, tensors) of the model file :meth:`save` writes: what
        :func:`~fewclip.methods.registry.model_from_state` rebuilds the fitted estimator from (a deployable
        classifier file nests the two)."""
        self._check_fitted()
        tensors, scalars = self._fitted_state()
        meta = {
            "format": MODEL_FORMAT,
            "method": self.name,
            "params": json.dumps(self.get_params()),
            "preset": json.dumps(self.preset),
            "fitted": json.dumps(scalars),
            "fewclip_version": __version__,
        }
        return meta, tensors

    def save(self, path: str | os.PathLike) -> Path:
        """Write hyperparameters, preset and fitted state to ``path`` (a safetensors file), atomically."""
        meta, tensors = self.state()
        path = Path(path)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path
