"""The estimator contract every method follows (scikit-learn style).

- The constructor stores hyperparameters and does nothing else.
- ``fit(bundle)`` validates, learns (hyperparameter selection included) and returns ``self``. It is handed a
  copy of the bundle without test features or labels, so nothing it selects can depend on test data.
- Learned state lives in attributes ending with ``_``; ``save`` writes exactly those (tensors to safetensors,
  everything else to JSON metadata) plus the constructor's hyperparameters.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from .. import __version__
from ..errors import MethodError, NotFittedError
from ..features.bundle import Bundle
from ..io import atomic_write
from ..metrics import accuracy

MODEL_FORMAT = "fewclip-model/1"
SELECTIONS = ("val", "none")


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Method:
    """Base class. Subclasses set ``name``, implement ``_fit`` and ``_logits`` and list hyperparameters in
    ``__init__`` (keyword-only)."""

    name: ClassVar[str] = ""
    #: False for methods with nothing to select (zero-shot): they accept a bundle without validation data.
    selects: ClassVar[bool] = True
    #: True when every class needs at least one support image.
    needs_support_for_every_class: ClassVar[bool] = False

    selection: str
    preset: str | None

    # ------------------------------------------------------------------ parameters
    @classmethod
    def param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind == p.KEYWORD_ONLY]

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {p.name: p.default for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names()}

    def __repr__(self) -> str:
        defaults = self.default_params()
        changed = {k: v for k, v in self.get_params().items() if defaults.get(k, object()) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ fitting
    def fit(self, bundle: Bundle) -> Method:
        if self.selection not in SELECTIONS:
            raise MethodError(
                f"{self.name}: selection={self.selection!r} is not valid; choose one of {list(SELECTIONS)} "
                "(there is no selection on test)."
            )
        if self.selects and self.selection == "val" and not bundle.has_val:
            raise MethodError(
                f"{self.name}: selection='val' needs validation data, but the bundle has no val_features/val_labels. "
                "Either add a validation split to the bundle, or use selection='none' (--selection none) to keep the "
                "method's initial hyperparameter values."
            )
        if self.needs_support_for_every_class:
            missing = (bundle.shots_per_class() == 0).nonzero().flatten().tolist()
            if missing:
                names = [bundle.classnames[i] for i in missing[:5]]
                raise MethodError(
                    f"{self.name} needs at least one support image per class, but {len(missing)} class(es) have none "
                    f"(e.g. {names}). Use a method that handles classes without support (zero-shot, tip-adapter, ape)."
                )
        self.num_classes_ = bundle.num_classes
        self.dim_ = bundle.dim
        self._fit(bundle.without_test())
        return self

    def _fit(self, bundle: Bundle) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

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
        return torch.cat(parts) if parts else torch.zeros(0, self.num_classes_)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Arg-max class per row; ties go to the lowest class index."""
        return self.predict_logits(features).argmax(dim=1)

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in percent."""
        return accuracy(self.predict_logits(features), labels)

    def hyperparameters(self) -> dict[str, Any]:
        """The values that ran: constructor settings overlaid with what selection chose."""
        self._check_fitted()
        out = {k: v for k, v in self.get_params().items()}
        out.update(getattr(self, "selected_", {}))
        return out

    # ------------------------------------------------------------------ persistence
    def _fitted_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, scalars = {}, {}
        for key, value in vars(self).items():
            if not key.endswith("_") or key.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().clone()  # own storage: safetensors refuses aliases
            else:
                scalars[key] = value
        return tensors, scalars

    def save(self, path: str | os.PathLike) -> Path:
        """Write hyperparameters and fitted state to ``path`` (a safetensors file), atomically."""
        self._check_fitted()
        tensors, scalars = self._fitted_state()
        meta = {
            "format": MODEL_FORMAT,
            "method": self.name,
            "params": json.dumps(self.get_params()),
            "fitted": json.dumps(scalars),
            "fewclip_version": __version__,
        }
        path = Path(path)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path
