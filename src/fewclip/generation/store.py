"""The generation store: every image a pipeline sampled, with its final denoised latent, content-addressed and shared
by every dataset and run; and :func:`generate`, which fills it and builds a dataset's generated set from it.

Layout of the store (``<cache>/generations/`` by default)::

    images/<key[:2]>/<key>.png        the decoded image of item <key>
    shards/shard-<ns>-<pid>-<rand>.safetensors
                                      append-only: tensor ``latents`` [n, c, h, w] and metadata ``format``
                                      (STORE_FORMAT), ``ids`` (the n keys), ``records`` (prompt, seed, PNG SHA-256 per
                                      row), ``pipeline`` (weights identity, settings, versions), ``latents_sha256``
    corrupt/                          shards found unreadable or failing their checksum, set aside (never read)
    .lock                             held by the one process writing to the store

An item is *done* when a shard that passes its checksum holds its latent and its image exists with the SHA-256 the
shard recorded. A batch's images are written first and its shard last, each atomically (temporary file, then
rename), so a kill at any point loses at most the batches not yet in a shard, and a rerun regenerates exactly the
items that are not done. Keys hash (weights identity, prompt, item seed, sampling settings) (:mod:`.settings`), so the
same image asked for by two datasets, or by a rerun, is sampled once.

The per-dataset output folder (the generated-set layout of :mod:`.types`) is rebuilt from the store after
generation: images hard-linked from the store (copied where links are impossible), the latents of the set in one
shard, the index last.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hashing import MEMO_NAME, HashMemo
from ..io import atomic_write, default_cache_dir
from ..progress import progress
from .settings import GenerationError, GenerationSettings, GenerationWarning, item_key, item_seed
from .types import GENERATED_FORMAT, INDEX_FILE, INDEX_FOLDER, class_folder, tensor_sha256

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .diffusion import Sampler

logger = logging.getLogger("fewclip.generation")

STORE_FORMAT = "fewclip-generation-store/1"
STORE_FOLDER = "generations"
_STALE_TMP_SECONDS = 3600.0


@dataclass(frozen=True)
class Item:
    """One image to generate: image ``image_index`` of prompt ``prompt_index`` of ``classname``."""

    key: str
    classname: str
    prompt: str
    prompt_index: int
    image_index: int
    seed: int


@dataclass(frozen=True)
class Stored:
    """Where an item's latent lives: row ``row`` of ``shard``, with the shard's record of it."""

    shard: Path
    row: int
    record: dict[str, Any]


class CorruptShard(Exception):
    """Internal: a shard that cannot be trusted (the message says why)."""


class GenerationStore:
    """The content-addressed store under ``root`` (layout in the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.shards_dir = self.root / "shards"
        self.images_dir = self.root / "images"
        self.corrupt_dir = self.root / "corrupt"
        self.set_aside: list[Path] = []

    def image_path(self, key: str) -> Path:
        return self.images_dir / key[:2] / f"{key}.png"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's write lock (another ``fewclip generate`` on the same store waits for it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock; concurrent runs may sample an item twice
            yield
            return
        with open(self.root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning("another process is generating into %s; waiting for it to finish", self.root)
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ----------------------------------------------------------------- reading
    def shard_paths(self) -> list[Path]:
        """Shards oldest first (their names start with the creation time in nanoseconds)."""
        if not self.shards_dir.is_dir():
            return []
        return sorted(p for p in self.shards_dir.glob("shard-*.safetensors") if p.is_file())

    @staticmethod
    def _header(path: Path) -> tuple[list[str], list[dict[str, Any]], dict[str, str]]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                names = list(f.keys())
        except Exception as exc:
            raise CorruptShard(f"unreadable safetensors header ({exc})") from None
        if meta.get("format") != STORE_FORMAT:
            raise CorruptShard(f"metadata format {meta.get('format')!r}, expected {STORE_FORMAT!r}")
        try:
            ids = json.loads(meta["ids"])
            records = json.loads(meta["records"])
        except (KeyError, ValueError) as exc:
            raise CorruptShard(f"metadata ids/records unreadable ({exc})") from None
        if names != ["latents"] or len(ids) != len(records) or "latents_sha256" not in meta:
            raise CorruptShard("expected one tensor 'latents', one record per id and a latents_sha256")
        return ids, records, meta

    def _set_aside(self, path: Path, why: str) -> None:
        self.corrupt_dir.mkdir(parents=True, exist_ok=True)
        target = self.corrupt_dir / path.name
        try:
            os.replace(path, target)
        except OSError:
            target = path
        self.set_aside.append(target)
        message = (
            f"generation store: shard {path} is corrupt ({why}); set aside as {target}, its images are generated again"
        )
        logger.warning(message)
        warnings.warn(message, GenerationWarning, stacklevel=3)

    def index(self) -> dict[str, Stored]:
        """key -> where its latent is, from every shard's header (a later shard wins); shards whose header cannot be
        read are set aside."""
        out: dict[str, Stored] = {}
        for path in self.shard_paths():
            try:
                ids, records, _ = self._header(path)
            except CorruptShard as exc:
                self._set_aside(path, str(exc))
                continue
            for row, (key, record) in enumerate(zip(ids, records)):
                out[key] = Stored(path, row, record)
        return out

    def _read_latents(self, path: Path) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                latents = f.get_tensor("latents")
        except Exception as exc:
            raise CorruptShard(f"unreadable tensor data ({exc})") from None
        ids = json.loads(meta["ids"])
        if latents.dim() != 4 or latents.shape[0] != len(ids):
            raise CorruptShard(f"latents {list(latents.shape)} for {len(ids)} ids")
        if tensor_sha256(latents) != meta.get("latents_sha256"):
            raise CorruptShard("latents fail their SHA-256 checksum")
        return latents

    def verify(self, shards: set[Path]) -> set[Path]:
        """Read each shard in ``shards`` whole and check its checksum; corrupt ones are set aside and returned."""
        bad = set()
        for path in sorted(shards):
            try:
                self._read_latents(path)
            except CorruptShard as exc:
                self._set_aside(path, str(exc))
                bad.add(path)
        return bad

    def latents(self, stored: Sequence[Stored]) -> torch.Tensor:
        """[n, c, h, w] latents of ``stored``, in order (each shard read once and checked)."""
        import torch

        by_shard: dict[Path, torch.Tensor] = {}
        rows = []
        for s in stored:
            if s.shard not in by_shard:
                try:
                    by_shard[s.shard] = self._read_latents(s.shard)
                except CorruptShard as exc:
                    raise GenerationError(f"generation store: shard {s.shard} became unreadable ({exc}).") from None
            rows.append(by_shard[s.shard][s.row])
        return torch.stack(rows) if rows else torch.zeros(0)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files an earlier killed run left (older than an hour); returns how many."""
        now, removed = time.time(), 0
        for folder in (self.shards_dir, *self.images_dir.glob("*")):
            if not folder.is_dir():
                continue
            for tmp in folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                        tmp.unlink()
                        removed += 1
        return removed

    # ----------------------------------------------------------------- writing
    def append(
        self,
        items: Sequence[Item],
        latents: torch.Tensor,
        images: Sequence[Image.Image],
        pipeline: Mapping[str, Any],
        pool: ThreadPoolExecutor | None = None,
    ) -> Path:
        """Write one batch: the images (atomically, in ``pool``), then one new shard holding their latents. Returns
        the shard."""
        from safetensors.torch import save_file

        if not (len(items) == len(images) == latents.shape[0]):
            raise GenerationError(f"append: {len(items)} items, {len(images)} images, latents {list(latents.shape)}.")

        def write_image(item_image: tuple[Item, Image.Image]) -> str:
            item, image = item_image
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
            atomic_write(self.image_path(item.key), lambda tmp: tmp.write_bytes(data))
            return hashlib.sha256(data).hexdigest()

        pairs = list(zip(items, images))
        digests = list(pool.map(write_image, pairs)) if pool is not None else [write_image(p) for p in pairs]
        records = [
            {
                "class": it.classname,
                "prompt": it.prompt,
                "seed": it.seed,
                "image_index": it.image_index,
                "image_sha256": d,
            }
            for it, d in zip(items, digests)
        ]
        latents = latents.detach().cpu().contiguous()
        meta = {
            "format": STORE_FORMAT,
            "ids": json.dumps([it.key for it in items]),
            "records": json.dumps(records),
            "pipeline": json.dumps(dict(pipeline), sort_keys=True),
            "latents_sha256": tensor_sha256(latents),
        }
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        return atomic_write(
            self.shards_dir / name, lambda tmp: save_file({"latents": latents}, str(tmp), metadata=meta)
        )


# --------------------------------------------------------------------------- planning and generation


def plan_items(
    prompts: Mapping[str, Sequence[str]], settings: GenerationSettings, identity: str, sampling: Mapping[str, Any]
) -> list[Item]:
    """Every item of a generation: for each class (in order), each prompt, ``settings.images_per_prompt`` images."""
    items = []
    for classname, sentences in prompts.items():
        for p, prompt in enumerate(sentences):
            for j in range(settings.images_per_prompt):
                seed = item_seed(settings.seed, prompt, j)
                key = item_key(identity, prompt, seed, dict(sampling))
                items.append(Item(key, classname, prompt, p, j, seed))
    return items


@dataclass
class GenerationReport:
    """What :func:`generate` did."""

    out: Path
    store: Path
    samples: int  # items in the generated set
    generated: int  # images sampled by this run
    reused: int  # items found done in the store
    seconds: float  # sampling time of this run
    set_aside: list[Path] = field(default_factory=list)

    @property
    def images_per_second(self) -> float | None:
        return self.generated / self.seconds if self.generated and self.seconds > 0 else None


def _done_items(store: GenerationStore, keys: Sequence[str], memo: HashMemo) -> dict[str, Stored]:
    """The items among ``keys`` that are done: latent in a shard that passes its checksum, image with the recorded
    SHA-256."""
    wanted = set(keys)
    index = {k: v for k, v in store.index().items() if k in wanted}
    bad = store.verify({s.shard for s in index.values()})
    if bad:
        index = {k: v for k, v in store.index().items() if k in wanted}
    keys_list = list(index)
    digests = memo.sha256_many([store.image_path(k) for k in keys_list])
    done = {}
    for key, digest in zip(keys_list, digests):
        if digest is not None and digest == index[key].record.get("image_sha256"):
            done[key] = index[key]
    lost = len(index) - len(done)
    if lost:
        logger.warning("generation store %s: %d image(s) missing or changed; they are generated again", store.root,
                       lost)  # fmt: skip
    return done


def generate(
    prompts: Mapping[str, Sequence[str]],
    out: str | os.PathLike,
    settings: GenerationSettings | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    sampler: Sampler | None = None,
    memo: HashMemo | None = None,
    show_progress: bool = True,
    write_pool: int = 4,
    compile_unet: bool = False,
    source: Mapping[str, Any] | None = None,
) -> GenerationReport:
    """Generate ``settings.images_per_prompt`` images for every prompt of every class in ``prompts`` (class name ->
    prompts, in label order) and write the generated set to ``out`` (the layout of :mod:`.types`).

    Items already in the store (``<cache_dir>/generations``) are reused, not sampled; a run killed at any point and
    started again samples only what is missing. ``sampler``: a loaded :class:`~.diffusion.Sampler` (else
    ``settings.model`` is loaded, its UNet compiled with ``compile_unet``). ``source`` (e.g. the description file
    and its SHA-256) is recorded in the set's index."""
    settings = (settings or GenerationSettings()).validate()
    if not prompts or any(not list(v) for v in prompts.values()):
        empty = [c for c, v in prompts.items() if not list(v)]
        raise GenerationError(f"generate: no prompts for class(es) {empty[:10]}; every class needs at least one.")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    memo = memo or HashMemo(cache_root / MEMO_NAME)
    if sampler is None:
        from .diffusion import load_sampler

        sampler = load_sampler(settings, memo=memo, compile_unet=compile_unet)
    elif sampler.sampling != settings.sampling_identity(sampler.device) or sampler.settings.model != settings.model:
        raise GenerationError(
            f"generate: the sampler was loaded for {sampler.settings.model} with {sampler.sampling}, but the settings "
            f"ask for {settings.model} with {settings.sampling_identity(sampler.device)}; load it with these settings."
        )
    store = GenerationStore(cache_root / STORE_FOLDER)
    items = plan_items(prompts, settings, sampler.identity, sampler.sampling)
    pipeline_info = {**sampler.describe(), "settings": settings.to_dict(), "sampling": sampler.sampling}
    with store.lock():
        store.remove_stale_temporaries()
        done = _done_items(store, [it.key for it in items], memo)
        todo = list({it.key: it for it in items if it.key not in done}.values())
        seconds = _sample_into(store, sampler, todo, settings.batch_size, pipeline_info, show_progress, write_pool)
        stored = _done_items(store, [it.key for it in items], memo)
    missing = [it for it in items if it.key not in stored]
    if missing:
        raise GenerationError(
            f"generation store {store.root}: {len(missing)} item(s) still missing after generation (e.g. "
            f"{missing[0].classname!r}: {missing[0].prompt!r}); run fewclip generate again."
        )
    export_generated_set(out, items, store, stored, pipeline_info, source)
    return GenerationReport(
        out=Path(out),
        store=store.root,
        samples=len(items),
        generated=len(todo),
        reused=sum(1 for it in items if it.key in done),
        seconds=seconds,
        set_aside=list(store.set_aside),
    )


def _sample_into(
    store: GenerationStore,
    sampler: Sampler,
    todo: Sequence[Item],
    batch_size: int,
    pipeline_info: Mapping[str, Any],
    show_progress: bool,
    write_pool: int,
) -> float:
    """Sample ``todo`` in batches; a writer thread stores each batch while the next one samples. Batches sampled
    before an error or interruption are stored before it propagates. Returns the seconds spent."""
    if not todo:
        return 0.0
    start = time.perf_counter()
    pending: list[Future] = []
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewclip-store") as writer,
        ThreadPoolExecutor(max_workers=write_pool, thread_name_prefix="fewclip-png") as pngs,
        progress(len(todo), "generating images", "img", enabled=show_progress) as bar,
    ):
        try:
            for s in range(0, len(todo), batch_size):
                batch = list(todo[s : s + batch_size])
                latents, images = sampler.sample([it.prompt for it in batch], [it.seed for it in batch])
                pending.append(writer.submit(store.append, batch, latents, images, pipeline_info, pngs))
                while len(pending) > 2 or (pending and pending[0].done()):
                    pending.pop(0).result()
                bar.update(len(batch))
        finally:
            for fut in pending:  # keep every sampled batch, then let the original error (if any) propagate
                with contextlib.suppress(Exception):
                    fut.result()
    for fut in pending:
        fut.result()  # surface a writer error when sampling itself succeeded
    return time.perf_counter() - start


# --------------------------------------------------------------------------- the per-dataset generated set


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source``: a hard link where possible, else an atomic copy."""
    if target.exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(source, target):
                return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(target, lambda t: shutil.copyfile(source, t))


def _previous_index(folder: Path) -> dict[str, Any] | None:
    path = folder / INDEX_FOLDER / INDEX_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def export_generated_set(
    out: str | os.PathLike,
    items: Sequence[Item],
    store: GenerationStore,
    stored: Mapping[str, Stored],
    pipeline_info: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write the generated set of ``items`` to ``out`` from the store: images linked in, the latents in one shard,
    the index last (each atomically). Files of an earlier set in ``out`` that the new one does not list (its
    images, its shards) are removed afterwards. Returns the index file."""
    from safetensors.torch import save_file

    folder = Path(out).expanduser()
    hidden = folder / INDEX_FOLDER
    classnames = list(dict.fromkeys(it.classname for it in items))
    ids, entries, seen = [], [], set()
    for it in items:
        sid = it.key[:32]
        if sid in seen:  # the same prompt text (so the same image) in two classes
            sid = f"{sid}-{class_folder(it.classname)}"
        seen.add(sid)
        image = Path(class_folder(it.classname)) / f"{sid}.png"
        _link_or_copy(store.image_path(it.key), folder / image)
        ids.append(sid)
        entries.append(
            {
                "id": sid,
                "class": it.classname,
                "image": image.as_posix(),
                "prompt": it.prompt,
                "key": it.key,
                "seed": it.seed,
                "prompt_index": it.prompt_index,
                "image_index": it.image_index,
            }
        )
    latents = store.latents([stored[it.key] for it in items]).contiguous()
    digest = tensor_sha256(latents)
    shard = f"latents-{hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:8]}-{digest[:8]}.safetensors"
    for e in entries:
        e["shard"] = shard
    meta = {"format": GENERATED_FORMAT, "ids": json.dumps(ids), "latents_sha256": digest}
    atomic_write(hidden / shard, lambda tmp: save_file({"latents": latents}, str(tmp), metadata=meta))
    previous = _previous_index(folder)
    index = {
        "format": GENERATED_FORMAT,
        "classnames": classnames,
        "samples": entries,
        "pipeline": dict(pipeline_info),
        "source": dict(source or {}),
        "store": str(store.root),
    }
    text = json.dumps(index, indent=1)
    index_path = atomic_write(hidden / INDEX_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    if previous and isinstance(previous.get("samples"), list):
        keep_images = {e["image"] for e in entries}
        for old in previous["samples"]:
            rel = old.get("image") if isinstance(old, dict) else None
            if rel and rel not in keep_images and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
                (folder / rel).unlink(missing_ok=True)
    for old_shard in hidden.glob("latents-*.safetensors"):
        if old_shard.name != shard:
            old_shard.unlink(missing_ok=True)
    return index_path


def prompts_per_class(sentences: Mapping[str, Sequence[str]], limit: int | None = None) -> dict[str, list[str]]:
    """Class -> its first ``limit`` sentences (all when None), duplicates within a class dropped."""
    out = {}
    for classname, values in sentences.items():
        unique = list(dict.fromkeys(s.strip() for s in values if s.strip()))
        out[classname] = unique[:limit] if limit is not None else unique
    return out
