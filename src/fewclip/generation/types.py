"""A generated set: images a diffusion model decoded, each with its final denoised latent and its class.

On disk a generated set is a folder ``DIR``:

- ``DIR/<class folder>/<sample id>.png``: the decoded images, one sub-folder per class, so that ``DIR`` is a dataset
  of the ``folder`` kind (``fewclip run --dataset folder --path DIR``) like any other. The class folder is the class
  name with ``/`` and ``\\`` replaced by ``_``.
- ``DIR/.fewclip-generated/index.json``: ``{"format": GENERATED_FORMAT, "classnames": [...], "samples": [{"id",
  "class", "image", "prompt", "shard"}, ...]}``, ``image`` relative to ``DIR``, ``shard`` a file name in the same
  hidden folder (hidden, so the folder dataset reader skips it).
- ``DIR/.fewclip-generated/<shard>.safetensors``: a tensor ``latents [n, c, h, w]`` (float32 or bfloat16/float16) and
  metadata ``format`` (:data:`GENERATED_FORMAT`) and ``ids``: the JSON list of the n sample ids in row order; and,
  optionally, ``latents_sha256`` (:func:`tensor_sha256` of the tensor), checked when present.

Every file is written atomically (temporary file, then rename), the index last, so a reader sees a complete set of
samples or the previous one. :func:`load_generated_set` checks that every sample's image and latent row exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..io import atomic_write, read_safetensors

GENERATED_FORMAT = "fewclip-generated/1"
INDEX_FOLDER = ".fewclip-generated"
INDEX_FILE = "index.json"


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's dtype, shape and bytes (any dtype): the checksum of a latent shard."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(f"{t.dtype}:{list(t.shape)}:".encode() + data.tobytes()).hexdigest()


def class_folder(classname: str) -> str:
    """The sub-folder name of a class: its name with path separators replaced."""
    return classname.replace("/", "_").replace("\\", "_")


@dataclass(frozen=True, eq=False)
class GeneratedSet:
    """Generated samples for a list of classes.

    - ``classnames``: the classes, in label order.
    - ``images``: absolute paths of the decoded images, one per sample.
    - ``labels`` [n] int64: each sample's index into ``classnames``.
    - ``latents`` [n, c, h, w] float32: the final denoised latent each image was decoded from (the diffusion model's
      scaled latent space, before the VAE decoder).
    - ``prompts``: the text each sample was generated from.
    """

    classnames: tuple[str, ...]
    images: tuple[Path, ...]
    labels: torch.Tensor
    latents: torch.Tensor
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.labels.shape != (n,) or self.latents.dim() != 4 or self.latents.shape[0] != n or len(self.prompts) != n:
            raise DataError(
                f"generated set: {n} images, labels {list(self.labels.shape)}, latents {list(self.latents.shape)} and "
                f"{len(self.prompts)} prompts do not line up (expected [n], [n, c, h, w] and n)."
            )
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classnames)):
            raise DataError(f"generated set: labels outside 0..{len(self.classnames) - 1}.")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of one latent: (4, 64, 64) for Stable Diffusion at 512 px."""
        return tuple(int(s) for s in self.latents.shape[1:])  # type: ignore[return-value]

    def for_classes(self, classnames: Sequence[str], *, missing_ok: bool = False) -> GeneratedSet:
        """The samples of ``classnames``, relabelled to their order there; a name listed twice (two classes of that
        name) gives both labels the same samples, each sample once per label. A class with no sample is an error
        naming the classes (or, with ``missing_ok``, simply has none)."""
        own = {name: i for i, name in enumerate(self.classnames)}
        counts = torch.bincount(self.labels, minlength=len(self.classnames))
        missing = [c for c in classnames if c not in own or int(counts[own[c]]) == 0]
        if missing and not missing_ok:
            shown = ", ".join(repr(c) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise DataError(
                f"generated set: no generated samples for {len(missing)} class(es): {shown}{more}. Generate them "
                "(fewclip generate) for these classes, or pass the generated set made for this dataset."
            )
        # a name may label several classes (ImageNet has two 'missile's, two 'sunglasses'): each gets every sample
        # of that name, its rows repeated once per label, in the set's row order then label order
        source = torch.tensor([own[name] for name in classnames if name in own], dtype=torch.long)
        target = torch.tensor([j for j, name in enumerate(classnames) if name in own], dtype=torch.long)
        rows, labels = _repeat_per_label(self.labels, source, target, len(self.classnames))
        return GeneratedSet(
            classnames=tuple(classnames),
            images=tuple(self.images[i] for i in rows.tolist()),
            labels=labels,
            latents=self.latents[rows],
            prompts=tuple(self.prompts[i] for i in rows.tolist()),
        )


def _repeat_per_label(
    labels: torch.Tensor, source: torch.Tensor, target: torch.Tensor, num_source: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, new labels): each row i of ``labels`` [n] (classes 0..num_source-1) once for every pair k with
    ``source[k] == labels[i]``, labelled ``target[k]``; rows in order, a row's copies in the order of the pairs. Rows of
    a class in no pair are dropped. O(n + pairs) memory."""
    count = torch.bincount(source, minlength=num_source)  # labels each class of the set goes to
    grouped = target[torch.argsort(source, stable=True)]  # the pairs' targets, grouped by source class
    first = torch.cumsum(count, 0) - count  # where a source class's targets start in ``grouped``
    copies = count[labels]
    rows = torch.repeat_interleave(torch.arange(labels.numel()), copies)
    nth = torch.arange(rows.numel()) - torch.repeat_interleave(torch.cumsum(copies, 0) - copies, copies)
    return rows, grouped[first[labels[rows]] + nth]


def _index_path(folder: Path) -> Path:
    return folder / INDEX_FOLDER / INDEX_FILE


def load_generated_set(folder: str | os.PathLike, classnames: Sequence[str] | None = None) -> GeneratedSet:
    """Read the generated set in ``folder`` (layout in the module docstring); restricted and relabelled to
    ``classnames`` when given (every one of them must have samples)."""
    folder = Path(folder).expanduser()
    index_file = _index_path(folder)
    if not index_file.is_file():
        raise DataError(
            f"{folder} is not a generated set: {index_file} is missing. Make one with `fewclip generate --out "
            f"{folder}`."
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{index_file}: cannot be read as JSON ({exc}); run `fewclip generate` again to rewrite it."
        ) from exc
    if index.get("format") != GENERATED_FORMAT:
        raise DataError(f"{index_file}: format {index.get('format')!r}; expected {GENERATED_FORMAT!r}.")
    names = list(index["classnames"])
    label_of = {c: i for i, c in enumerate(names)}
    samples = index["samples"]
    rows: dict[str, torch.Tensor] = {}
    for shard in sorted({s["shard"] for s in samples}):
        path = folder / INDEX_FOLDER / shard
        meta, tensors = read_safetensors(
            path, expected_format=GENERATED_FORMAT, what="generated latents", error=DataError
        )
        ids = json.loads(meta.get("ids", "[]"))
        latents = tensors.get("latents")
        if latents is None or latents.dim() != 4 or latents.shape[0] != len(ids):
            raise DataError(f"{path}: expected a tensor 'latents' [n, c, h, w] with one row per id in its metadata.")
        if "latents_sha256" in meta and tensor_sha256(latents) != meta["latents_sha256"]:
            raise DataError(
                f"{path}: the latents fail their SHA-256 checksum (the file is damaged); run `fewclip generate` again "
                f"on {folder}: it rewrites the set from the generation store."
            )
        rows.update({sid: latents[i] for i, sid in enumerate(ids)})
    images, labels, latents, prompts, absent = [], [], [], [], []
    for s in samples:
        image = folder / s["image"]
        if s["id"] not in rows or not image.is_file():
            absent.append(str(image))
            continue
        images.append(image)
        labels.append(label_of[s["class"]])
        latents.append(rows[s["id"]].float())
        prompts.append(s.get("prompt", ""))
    if absent:
        raise DataError(
            f"{folder}: {len(absent)} generated sample(s) listed in {index_file} lack their image or latent (e.g. "
            f"{absent[:3]}); run `fewclip generate` again on this folder: it regenerates what is missing."
        )
    shape = latents[0].shape if latents else (0, 0, 0)
    out = GeneratedSet(
        classnames=tuple(names),
        images=tuple(images),
        labels=torch.tensor(labels, dtype=torch.long),
        latents=torch.stack(latents) if latents else torch.zeros(0, *shape),
        prompts=tuple(prompts),
    )
    return out if classnames is None else out.for_classes(classnames)


def write_generated_set(folder: str | os.PathLike, generated: GeneratedSet, shard: str = "latents-00000") -> Path:
    """Write ``generated`` into ``folder`` in the layout above, as one shard: images are copied in only when they
    are not already there (their bytes unchanged). Used by tests and by exports; the generation store appends
    shards itself."""
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    ids, entries = [], []
    for i, (image, label, prompt) in enumerate(zip(generated.images, generated.labels.tolist(), generated.prompts)):
        name = generated.classnames[label]
        sid = f"{class_folder(name)}-{i:06d}"
        target = folder / class_folder(name) / f"{sid}{Path(image).suffix or '.png'}"
        if Path(image).resolve() != target.resolve():
            data = Path(image).read_bytes()
            atomic_write(target, lambda tmp, data=data: tmp.write_bytes(data))
        ids.append(sid)
        entries.append(
            {
                "id": sid,
                "class": name,
                "image": str(target.relative_to(folder)),
                "prompt": prompt,
                "shard": f"{shard}.safetensors",
            }
        )
    hidden = folder / INDEX_FOLDER
    latents = generated.latents.float().contiguous()
    atomic_write(
        hidden / f"{shard}.safetensors",
        lambda tmp: save_file(
            {"latents": latents},
            str(tmp),
            metadata={"format": GENERATED_FORMAT, "ids": json.dumps(ids), "latents_sha256": tensor_sha256(latents)},
        ),
    )
    index = {"format": GENERATED_FORMAT, "classnames": list(generated.classnames), "samples": entries}
    text = json.dumps(index, indent=1)
    return atomic_write(_index_path(folder), lambda tmp: tmp.write_text(text, encoding="utf-8"))
