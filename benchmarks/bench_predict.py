"""Images per second of ``Classifier.predict_images`` against the backbone alone on the same images.

    python benchmarks/bench_predict.py                              # CPU: tiny random ViT at 224 px, 256 JPEGs
    python benchmarks/bench_predict.py --model ViT-B/16 --images 256  # random full-size ViT-B/16
    python benchmarks/bench_predict.py --model ViT-B/16 --device cuda --images 4096

JPEGs as in ``bench_extract.py`` (random sizes 320x240 to 500x375). The backbone is randomly initialised, saved to
a temporary file and loaded through its :class:`~fewclip.models.BackboneSpec`, as a classifier file names it.
A Tip-Adapter (the heaviest feature head here: a cache of keys) is fitted on a synthetic bundle of the backbone's
dimension and saved as a classifier file, then loaded back with :func:`fewclip.load_classifier`.

* backbone: :func:`fewclip.features.extract.extract` of the clean view with ``store=None`` (decode, transform,
  encode), no method;
* predict: ``predict_images`` on the same paths, the same batch size (extract + the method's logits, softmax, top-k
  rows).

Both run ``--repeats`` interleaved rounds after one warm-up; each figure is the best round. "ratio" is
predict / backbone (target >= 90 %). Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import TINY_CONFIGS, make_jpegs  # noqa: E402


def build_spec(name: str, folder: Path, device: str, precision: str):
    """The :class:`BackboneSpec` of a randomly initialised backbone saved under ``folder``."""
    from fewclip.models import BackboneSpec

    if name == "tiny":
        from fewclip.models.tiny import save_tiny_openclip

        cfg = dict(TINY_CONFIGS["tiny-vit"])
        arch = cfg.pop("arch")
        tiny = save_tiny_openclip(folder / name, arch, name="bench-predict-tiny", seed=0, **cfg)
        return BackboneSpec(f"local-dir:{tiny.folder}", device=device, precision=precision)
    from fewclip.models.tiny import save_random_openclip

    return BackboneSpec(name, str(save_random_openclip(name, folder)), device=device, precision=precision)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (default) or an open_clip architecture, e.g. ViT-B/16")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: extract's choice)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from fewclip import load_classifier
    from fewclip.features.extract import extract
    from fewclip.features.synthetic import make_synthetic_bundle
    from fewclip.methods import create
    from fewclip.protocols.deploy import save_classifier

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [str(root / "img" / p) for p in make_jpegs(root / "img", args.images, seed=0)]
        spec = build_spec(args.model, root, args.device, args.precision)
        backbone = spec.load()
        bundle = make_synthetic_bundle(classes=8, shots=16, dim=backbone.embed_dim, views=2, seed=0)
        model = create("tip-adapter").fit(bundle)
        path = save_classifier(
            root / "bench.classifier.safetensors",
            model,
            backbone_spec=spec,
            classnames=[f"class_{i}" for i in range(8)],
            prompts_record={"name": "synthetic", "templates": []},
            text_weights=bundle.text_weights,
            weights_identity=backbone.identity["weights"],
            preprocess=backbone.identity["preprocess_description"],
        )
        clf = load_classifier(path)
        clf._backbone = backbone  # the same loaded backbone for both, so neither pays for loading it
        opts = {"batch_size": args.batch_size, "num_workers": args.workers, "progress": False}

        def backbone_only() -> None:
            extract(backbone, Path("/"), paths, store=None, **opts)

        def predict() -> None:
            clf.predict_images(paths, top_k=5, **opts)

        best = {"backbone": 0.0, "predict": 0.0}
        predict()  # warm-up (and the hash check of the weights)
        for _ in range(args.repeats):
            for name, fn in (("backbone", backbone_only), ("predict", predict)):
                t0 = time.perf_counter()
                fn()
                best[name] = max(best[name], len(paths) / (time.perf_counter() - t0))
    print(f"model {args.model}  device {args.device}  {args.precision}  images {args.images}  batch {args.batch_size}")
    print(f"{'backbone alone':>16}  {best['backbone']:8.1f} images/s")
    print(f"{'predict_images':>16}  {best['predict']:8.1f} images/s")
    print(f"{'ratio':>16}  {100 * best['predict'] / best['backbone']:8.1f} %")


if __name__ == "__main__":
    main()
