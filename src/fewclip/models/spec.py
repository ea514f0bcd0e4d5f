"""A backbone named by plain data, so that any process can rebuild it (placeholder until the models split lands)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackboneSpec:
    model: str
    pretrained: str | None = None
    backend: str = "open_clip"
    precision: str = "fp32"
    device: str = "cpu"
    preprocess: str = "auto"
    cache_dir: str | None = None
    trust_checkpoint: bool = False

    def load(self):
        from .backbones import load_backbone

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        return cls(**d)
