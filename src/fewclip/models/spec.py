"""A backbone named by plain data, so that any process can rebuild it: ship ``spec.to_dict()``, never a model.

>>> spec = BackboneSpec("ViT-B/16", "openai", precision="fp16", device="cuda")
>>> payload = json.dumps(spec.to_dict())                       # to a worker
>>> backbone = BackboneSpec.from_dict(json.loads(payload)).load()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BackboneError
from .backbone import Backbone
from .backbones import load_backbone, weights_identity


@dataclass(frozen=True)
class BackboneSpec:
    """The arguments of :func:`~fewclip.models.load_backbone`, as a value.

    ``device`` and ``cache_dir`` say where *this* process loads; a worker elsewhere may replace them
    (``dataclasses.replace(spec, device="cuda:1")``) and gets the same features.
    """

    model: str
    pretrained: str | None = None
    backend: str = "open_clip"
    precision: str = "fp32"
    device: str = "cpu"
    preprocess: str = "auto"
    cache_dir: str | None = None
    trust_checkpoint: bool = False

    def load(self) -> Backbone:
        """The backbone this spec names, through :func:`~fewclip.models.load_backbone`."""
        return load_backbone(
            self.model,
            self.pretrained,
            backend=self.backend,
            precision=self.precision,
            device=self.device,
            preprocess=self.preprocess,
            cache_dir=self.cache_dir,
            trust_checkpoint=self.trust_checkpoint,
        )

    def weights_identity(self) -> dict[str, Any]:
        """The weights' identity without loading them (see :func:`~fewclip.models.backbones.weights_identity`)."""
        return weights_identity(self.model, self.pretrained, backend=self.backend, cache_dir=self.cache_dir)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: every field, ``device`` and ``cache_dir`` as strings."""
        out = dataclasses.asdict(self)
        out["device"] = str(self.device)
        out["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """The spec :meth:`to_dict` wrote; unknown keys and a missing ``model`` are errors that name them."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise BackboneError(f"backbone spec: unknown key(s) {unknown}; valid: {', '.join(fields)}.")
        if not data.get("model"):
            raise BackboneError(f"backbone spec: 'model' must be given, got {dict(data)!r}.")
        return cls(**data)
