"""Which model a ``--model``/``--pretrained`` pair names, decided before anything is loaded or downloaded.

The OpenAI paper names (``RN50``, ``ViT-B/16``, ...) map to open_clip's ``-quickgelu`` configs with tag ``openai``,
which reproduce OpenAI's ``clip.load`` models. An open_clip name whose pretrained tag was trained with QuickGELU
(``ViT-B-16`` + ``openai``) is switched to its ``-quickgelu`` config, because open_clip ≥ 2.29 only warns about
the mismatch. With ``--backend hf`` the paper names map to the ``openai/clip-vit-*`` ids of transformers.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackboneError

#: ``clip.load`` names → open_clip configs that reproduce OpenAI CLIP (QuickGELU); the tag is ``openai``.
OPENAI_MODELS: dict[str, str] = {
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "RN50x16": "RN50x16-quickgelu",
    "RN50x64": "RN50x64-quickgelu",
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
}
#: ``clip.load`` names → Hugging Face ids (ViT only; transformers has no ResNet CLIP).
HF_OPENAI_IDS: dict[str, str] = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
BACKENDS = ("open_clip", "hf")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class ModelSpec:
    """Where a backbone comes from, decided before anything is loaded or downloaded."""

    backend: str  # open_clip | hf
    requested: str  # the --model value as given
    name: str  # what the library is asked for: an open_clip config name, 'local-dir:…', 'hf-hub:…', an HF id/dir
    pretrained: str | None  # open_clip tag or weights file; None when ``name`` carries its own weights
    source: str  # tag | file | local-dir | hf-hub | hf
    force_quick_gelu: bool = False


def _paper_name(model: str) -> str | None:
    lowered = {k.lower(): k for k in OPENAI_MODELS}
    return lowered.get(model.strip().lower())


def resolve_model(model: str, pretrained: str | None = None, backend: str = "open_clip") -> ModelSpec:
    """Turn ``--model``/``--pretrained`` into a :class:`ModelSpec` (pure: no download, no weights read).

    ``resolve_model("RN50", "openai")`` gives open_clip's ``RN50-quickgelu`` with tag ``openai``.
    """
    if backend not in BACKENDS:
        raise BackboneError(f"backend {backend!r} is unknown; choose one of {list(BACKENDS)}.")
    if not model:
        raise BackboneError("model name is empty; give e.g. --model RN50 --pretrained openai.")
    if backend == "hf":
        return _resolve_hf(model, pretrained)
    if model.startswith(("local-dir:", "hf-hub:")):
        schema, ident = model.split(":", 1)
        if not ident:
            raise BackboneError(f"model {model!r} names no folder or repository after '{schema}:'.")
        if pretrained:
            raise BackboneError(
                f"--pretrained {pretrained!r} cannot be combined with model {model!r}: the weights come from the "
                f"{'folder' if schema == 'local-dir' else 'repository'}; drop --pretrained."
            )
        if schema == "local-dir":
            folder = Path(ident).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise BackboneError(
                    f"model {model!r}: {folder / 'open_clip_config.json'} does not exist; a local-dir: folder needs "
                    "open_clip_config.json (with model_cfg and preprocess_cfg) next to its weights."
                )
            return ModelSpec("open_clip", model, f"local-dir:{folder}", None, "local-dir")
        return ModelSpec("open_clip", model, model, None, "hf-hub")

    import open_clip  # only names that open_clip's registry resolves need it (2-3 s to import)

    paper = _paper_name(model)
    name = OPENAI_MODELS[paper] if paper else model.replace("/", "-")
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known + list(OPENAI_MODELS), n=4, cutoff=0.6)
        raise BackboneError(
            f"model {model!r} is not an open_clip architecture"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; see open_clip.list_models(), the OpenAI names "
            + ", ".join(OPENAI_MODELS)
            + ", or give 'local-dir:FOLDER' / 'hf-hub:ORG/REPO'."
        )
    if pretrained is None:
        if not paper:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise BackboneError(
                f"model {model!r} needs --pretrained: a tag ({', '.join(tags) or 'none known'}) or a weights file "
                f"({'/'.join(WEIGHT_SUFFIXES)})."
            )
        pretrained = "openai"

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        config_quick_gelu = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
        force = False
        if tag_cfg.get("quick_gelu", False) and not config_quick_gelu:
            if f"{name}-quickgelu" in known and open_clip.get_pretrained_cfg(f"{name}-quickgelu", pretrained):
                name = f"{name}-quickgelu"
            else:
                force = True
        return ModelSpec("open_clip", model, name, pretrained, "tag", force)

    path = Path(pretrained).expanduser()
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise BackboneError(
                f"weights file {str(path)!r} has suffix {path.suffix!r}; expected one of {list(WEIGHT_SUFFIXES)}."
            )
        return ModelSpec("open_clip", model, name, str(path), "file")
    tags = open_clip.list_pretrained_tags_by_model(name)
    looks_like_path = any(sep in pretrained for sep in ("/", os.sep)) or pretrained.endswith(WEIGHT_SUFFIXES)
    if looks_like_path:
        raise BackboneError(f"--pretrained {pretrained!r}: no such weights file.")
    raise BackboneError(
        f"--pretrained {pretrained!r} is neither a weights file nor a tag of open_clip model {name!r}; "
        f"known tags: {', '.join(tags) or 'none'}."
    )


def _resolve_hf(model: str, pretrained: str | None) -> ModelSpec:
    paper = _paper_name(model)
    if paper:
        if paper not in HF_OPENAI_IDS:
            raise BackboneError(
                f"model {model!r} has no Hugging Face transformers version (transformers has no ResNet CLIP); "
                "use --backend open_clip."
            )
        if pretrained not in (None, "openai"):
            raise BackboneError(
                f"--pretrained {pretrained!r} with --backend hf: the weights come from the model id or folder; "
                f"drop --pretrained (model {model!r} means {HF_OPENAI_IDS[paper]})."
            )
        return ModelSpec("hf", model, HF_OPENAI_IDS[paper], None, "hf")
    if pretrained is not None:
        raise BackboneError(
            f"--pretrained {pretrained!r} with --backend hf: give the Hugging Face folder or id as --model "
            "and drop --pretrained."
        )
    ident = model[len("hf-hub:") :] if model.startswith("hf-hub:") else model
    folder = Path(ident).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise BackboneError(
                f"model folder {str(folder)!r} has no config.json; save the model with CLIPModel.save_pretrained."
            )
        return ModelSpec("hf", model, str(folder), None, "hf")
    return ModelSpec("hf", model, ident, None, "hf")
