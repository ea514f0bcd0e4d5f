"""``fewclip describe`` (class descriptions from a file or a language model) and ``fewclip generate`` (Stable
Diffusion images with their latents, as a generated set)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import CLIError


def _read_classnames_file(path: str) -> list[str]:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CLIError(f"--classnames {path}: cannot be read ({exc.strerror or exc}).") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise CLIError(f"--classnames {path}: no class names (one per line expected).")
    return names


def _classes_and_template(args: argparse.Namespace, fallback: list[str] | None = None) -> tuple[list[str], str]:
    """(class names, the dataset's prompt template): from --dataset, --classnames, or ``fallback``."""
    template = args.template
    if args.name and args.classnames:
        raise CLIError("pass --dataset or --classnames, not both.")
    if args.name:
        from .datasets import load_from_args

        splits = load_from_args(args, check_files=False, warn=False)
        return list(splits.classnames), template or splits.template
    if args.classnames:
        return _read_classnames_file(args.classnames), template or "a photo of a {}."
    if fallback is not None:
        return fallback, template or "a photo of a {}."
    raise CLIError("name the classes: --dataset NAME (with --data-root or --path) or --classnames FILE.")


def _add_class_arguments(parser: argparse.ArgumentParser) -> None:
    from .datasets import add_data_arguments

    add_data_arguments(parser, as_option=True, required=False)
    parser.add_argument("--classnames", metavar="FILE", help="class names, one per line (instead of --dataset)")
    parser.add_argument(
        "--template",
        help="prompt template with {} for classes without descriptions (default: the dataset's, else "
        "'a photo of a {}.')",
    )


# --------------------------------------------------------------------------- describe


def cmd_describe(args: argparse.Namespace) -> int:
    from ..generation.describe import (
        ChatClient,
        ChatEndpoint,
        describe_classes,
        failed_error,
        match_descriptions,
        read_description_file,
        split_described,
        write_descriptions,
    )

    given = read_description_file(args.source) if args.source else None
    classnames, template = _classes_and_template(args, list(given) if given is not None else None)
    if given is not None and args.missing != "ask":
        result = match_descriptions(given, classnames, where=args.source, missing=args.missing, template=template)
        path = write_descriptions(args.out, result)
        print(f"wrote {path}: {len(result)} classes from {args.source} (no language model asked)")
        return 0
    if given is not None:  # --missing ask: the endpoint writes only the classes the file lacks
        have, ask, _ = split_described(given, classnames)
    else:
        have, ask = {}, list(dict.fromkeys(classnames))
    endpoint = ChatEndpoint.from_environment(
        base_url=args.base_url,
        model=args.model,
        api_key_env=args.api_key_env,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
    )
    client = ChatClient(endpoint, retries=args.retries)
    asked = describe_classes(ask, client, n=args.sentences, template=args.prompt, cache_dir=args.cache_dir)
    if asked.failed:
        raise failed_error(asked.failed, len(asked.descriptions))
    result = {c: asked.descriptions[c] if c in asked.descriptions else have[c] for c in dict.fromkeys(classnames)}
    path = write_descriptions(args.out, result)
    print(
        f"wrote {path}: {len(result)} classes; asked {endpoint.model} at {endpoint.base_url} for {len(ask)} "
        f"({asked.requests} request(s) sent, {asked.cached} answer(s) from the cache)"
    )
    return 0


# --------------------------------------------------------------------------- generate


def settings_from_args(args: argparse.Namespace):
    from ..generation.settings import GenerationSettings

    return GenerationSettings(
        model=args.model,
        scheduler=args.scheduler,
        steps=args.steps,
        guidance_scale=args.guidance,
        resolution=args.resolution,
        images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        eta=args.eta,
        negative_prompt=args.negative_prompt,
    ).validate()


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generation.describe import match_descriptions, read_description_file
    from ..generation.store import generate, prompts_per_class

    settings = settings_from_args(args)
    if args.prompts_per_class is not None and args.prompts_per_class < 1:
        raise CLIError(f"--prompts-per-class {args.prompts_per_class}: must be >= 1.")
    given = read_description_file(args.descriptions) if args.descriptions else None
    classnames, template = _classes_and_template(args, list(given) if given is not None else None)
    if given is not None:
        sentences = match_descriptions(
            given, classnames, where=args.descriptions, missing=args.missing, template=template
        )
    else:
        from ..data.prompts import fill_template

        sentences = {c: [fill_template(template, c)] for c in dict.fromkeys(classnames)}
    prompts = prompts_per_class(sentences, args.prompts_per_class)
    total = sum(len(v) for v in prompts.values()) * settings.images_per_prompt
    print(
        f"generating {total} images for {len(prompts)} classes ({settings.images_per_prompt} per prompt) with "
        f"{settings.model}: {settings.scheduler} {settings.steps} steps, guidance {settings.guidance_scale}, "
        f"{settings.resolution} px, seed {settings.seed}",
        flush=True,
    )
    source: dict[str, Any] = {"prompts_per_class": args.prompts_per_class, "missing": args.missing}
    if args.descriptions:
        from ..io import file_sha256

        source.update(descriptions=str(Path(args.descriptions).expanduser().resolve()))
        source.update(descriptions_sha256=file_sha256(Path(args.descriptions).expanduser()))
    else:
        source.update(template=template)
    report = generate(prompts, args.out, settings, cache_dir=args.cache_dir, compile_unet=args.compile, source=source)
    rate = report.images_per_second
    speed = f", {rate:.2f} images/s" if rate else ""
    print(
        f"wrote {report.out}: {report.samples} images ({report.generated} generated{speed}, {report.reused} reused "
        f"from the store {report.store})"
    )
    for path in report.set_aside:
        print(f"note: set aside corrupt shard {path}; its images were generated again")
    return 0


# --------------------------------------------------------------------------- parsers


def add_parsers(subparsers: Any) -> None:
    from ..generation.describe import DEFAULT_BASE_URL, DEFAULT_PROMPT, DEFAULT_TEMPERATURE
    from ..generation.settings import DEFAULT_MODEL, PRECISIONS, SCHEDULERS

    d = subparsers.add_parser(
        "describe",
        help="class descriptions (CuPL-style JSON) from a file or a language model (OpenAI-compatible endpoint)",
        description="Write a description file {class: [sentences]} for a dataset's classes. With --from, the "
        "sentences come from an existing file (checked against the classes); otherwise, or for the classes the "
        "file lacks with --missing ask, an OpenAI-compatible chat endpoint writes them. Every answer is cached "
        "per (class, model, prompt template): a rerun asks nothing twice. The API key is read from an "
        "environment variable (--api-key-env) and never written anywhere.",
    )
    _add_class_arguments(d)
    d.add_argument("--out", required=True, help="the description file to write (JSON)")
    d.add_argument("--from", dest="source", metavar="FILE", help="an existing description file (CuPL, CaFo, APE)")
    d.add_argument(
        "--missing",
        choices=["error", "template", "ask"],
        default="error",
        help="with --from: a class the file lacks is an error listing them (default), gets the prompt template "
        "(template), or is described by the language model (ask)",
    )
    d.add_argument("--base-url", help=f"endpoint base URL (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})")
    d.add_argument("--model", help="language model name (default: $FEWCLIP_DESCRIBE_MODEL, else $OPENAI_MODEL)")
    d.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY; unset: no key is sent)",
    )
    d.add_argument("-n", "--sentences", type=int, default=10, help="sentences per class (default 10, as CaFo)")
    d.add_argument("--prompt", default=DEFAULT_PROMPT, help="request template with {c} (class) and {n} (count)")
    d.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="sampling temperature (0.99)")
    d.add_argument("--max-tokens", type=int, help="answer length limit (default: the endpoint's)")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds per request (120)")
    d.add_argument("--retries", type=int, default=6, help="retries of 429/5xx/connection errors, with back-off (6)")
    d.add_argument(
        "--cache-dir", metavar="DIR", help="fewclip cache folder (default: $FEWCLIP_CACHE or ~/.cache/fewclip)"
    )
    d.set_defaults(func=cmd_describe)

    g = subparsers.add_parser(
        "generate",
        help="Stable Diffusion images and their latents for a dataset's classes (a generated set, for FLIER)",
        description="Generate images per class prompt with Stable Diffusion, keeping each image's final denoised "
        "latent, into a content-addressed store in the cache folder (shared by datasets and runs; resumable "
        "after a kill), and write the generated set to --out: a folder dataset of the images plus the latents.",
    )
    _add_class_arguments(g)
    g.add_argument("--out", required=True, help="the generated-set folder to write")
    g.add_argument("--descriptions", metavar="FILE", help="description file (class -> sentences); without it, "
                   "each class's one prompt is the template")  # fmt: skip
    g.add_argument(
        "--missing",
        choices=["error", "template"],
        default="error",
        help="a class the description file lacks: an error listing them (default), or the prompt template",
    )
    g.add_argument("--prompts-per-class", type=int, help="use the first N sentences of each class (default all)")
    s = g.add_argument_group("sampling (defaults: FLIER's inferred settings, spec flier.md §8.1)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local diffusers folder ({DEFAULT_MODEL})")
    s.add_argument("--scheduler", choices=list(SCHEDULERS), default="ddim")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (9)")
    s.add_argument("--resolution", type=int, default=512, help="image height and width in pixels (512)")
    s.add_argument("--images-per-prompt", type=int, default=2)
    s.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (8)")
    s.add_argument(
        "--seed", type=int, default=42, help="base seed; each image's seed derives from (seed, prompt, index)"
    )
    s.add_argument("--precision", choices=list(PRECISIONS), default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0)")
    s.add_argument("--negative-prompt", default="")
    s.add_argument("--compile", action="store_true", help="torch.compile the UNet (faster on GPU for long runs)")
    g.add_argument("--cache-dir", metavar="DIR", help="fewclip cache folder holding the store (default: $FEWCLIP_CACHE "
                   "or ~/.cache/fewclip)")  # fmt: skip
    g.set_defaults(func=cmd_generate)
