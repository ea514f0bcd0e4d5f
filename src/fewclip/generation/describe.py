"""Class descriptions (CuPL style): read from a description file, or written by a language model through an
OpenAI-compatible chat endpoint, cached per class.

A description file is one JSON object, class name -> list of sentences (CuPL's, CaFo's, APE's files, or the output of
``fewclip describe``). :func:`load_descriptions` matches its keys to a dataset's class names (as written, with
underscores as spaces, or case- and space-insensitively); a class it lacks is an error that lists every missing name,
or, with ``missing="template"``, gets the dataset's prompt template as its one sentence.

:func:`describe_classes` asks an endpoint (``POST {base_url}/chat/completions``) for ``n`` sentences per class. Each
class's answer is cached in ``<cache>/descriptions/<key>.json``, key = SHA-256 of (class, model, prompt template, n,
temperature, max_tokens), as soon as it arrives: a rerun asks nothing twice and an interrupted run resumes where it
stopped. 429, 5xx and dropped connections are retried with exponential back-off (``Retry-After`` is honoured). The
API key is sent in the ``Authorization`` header and nowhere else: it is not part of any cache key or file, and any
text from the server that is shown in an error has it masked. A key with a line break or other character that cannot
go in a header is refused naming its variable, not the key.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.classnames import prompt_name
from ..data.prompts import fill_template, has_placeholder
from ..data.readers import decode_text
from ..io import atomic_write_text, default_cache_dir
from ..progress import progress
from .settings import GenerationError, GenerationWarning

logger = logging.getLogger("fewclip.generation")

DESCRIPTIONS_FORMAT = "fewclip-descriptions/1"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: CuPL's questions asked of a chat model in one request per class; ``{c}`` the class name, ``{n}`` the count
DEFAULT_PROMPT = (
    "Write {n} different sentences that describe what a {c} looks like in a photo. Each sentence must be a complete, "
    "visual description of a {c} (shape, colour, texture, parts, typical surroundings), like a caption of an image "
    "from the internet. Answer with a JSON array of {n} strings and nothing else."
)
DEFAULT_TEMPERATURE = 0.99  # CuPL's sampling temperature
MISSING_MODES = ("error", "template")
_TRANSIENT_STATUS = {408, 425, 429}


# --------------------------------------------------------------------------- description files


def _norm(name: str) -> str:
    return " ".join(prompt_name(name).lower().split())


def read_description_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """The ``{class name: [sentences]}`` object of a description file, checked; errors name the file and the key."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GenerationError(f"{path}: cannot read the description file ({exc.strerror or exc}).") from None
    try:
        obj = json.loads(decode_text(raw, path))
    except json.JSONDecodeError as exc:
        raise GenerationError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(obj, dict) or not obj:
        raise GenerationError(f"{path}: expected a JSON object mapping each class name to a list of sentences.")
    for key, value in obj.items():
        if not isinstance(value, list) or not value or not all(isinstance(s, str) and s.strip() for s in value):
            raise GenerationError(f"{path}: the value of {key!r} must be a non-empty list of non-empty sentences.")
    return {k: [s.strip() for s in v] for k, v in obj.items()}


def _names_list(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def split_described(
    descriptions: Mapping[str, Sequence[str]], classnames: Sequence[str]
) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(class -> sentences for the classes that have a key, the classes without one, the keys matching no class).

    A key matches a class as written, with underscores read as spaces, or ignoring case and repeated spaces."""
    by_norm: dict[str, str] = {}
    for key in descriptions:
        by_norm.setdefault(_norm(key), key)
    out: dict[str, list[str]] = {}
    absent: list[str] = []
    used: set[str] = set()
    for c in dict.fromkeys(classnames):
        key = c if c in descriptions else prompt_name(c) if prompt_name(c) in descriptions else by_norm.get(_norm(c))
        if key is None:
            absent.append(c)
            continue
        used.add(key)
        out[c] = list(descriptions[key])
    return out, absent, [k for k in descriptions if k not in used]


def match_descriptions(
    descriptions: Mapping[str, Sequence[str]],
    classnames: Sequence[str],
    *,
    where: str = "descriptions",
    missing: str = "error",
    template: str | None = None,
) -> dict[str, list[str]]:
    """Class name -> sentences for every class of ``classnames`` (in order; duplicated names share an entry).

    Keys match classes as in :func:`split_described`. Classes without a key raise :class:`GenerationError`
    listing them (``missing="error"``) or get ``template`` filled with their name (``missing="template"``). Keys
    matching no class give a :class:`GenerationWarning`."""
    if missing not in MISSING_MODES:
        raise GenerationError(f"missing={missing!r}: use one of {', '.join(MISSING_MODES)}.")
    out, absent, extra = split_described(descriptions, classnames)
    if absent:
        if missing == "error":
            raise GenerationError(
                f"{where}: no descriptions for {len(absent)} of {len(out) + len(absent)} classes: "
                f"{_names_list(absent)}. Add them to the file (fewclip describe --from {where} --missing ask "
                "--out NEW.json asks a language model for just these), or pass --missing template to use the "
                "dataset's prompt template for them."
            )
        if not template or not has_placeholder(template):
            raise GenerationError(
                f"{where}: missing='template' needs a prompt template with a {{}} placeholder, got {template!r}."
            )
        logger.warning("%s: %d class(es) without descriptions use the template %r: %s", where, len(absent), template,
                       _names_list(absent, 5))  # fmt: skip
        filled = {c: [fill_template(template, c)] for c in absent}
        out = {c: out[c] if c in out else filled[c] for c in dict.fromkeys(classnames)}
    if extra:
        warnings.warn(
            f"{where}: {len(extra)} description key(s) match no class: {_names_list(extra, 5)}.",
            GenerationWarning,
            stacklevel=2,
        )
    return out


def load_descriptions(
    path: str | os.PathLike,
    classnames: Sequence[str] | None = None,
    *,
    missing: str = "error",
    template: str | None = None,
) -> dict[str, list[str]]:
    """Read a description file; with ``classnames``, matched to them (:func:`match_descriptions`)."""
    descriptions = read_description_file(path)
    if classnames is None:
        return descriptions
    return match_descriptions(descriptions, classnames, where=str(path), missing=missing, template=template)


def write_descriptions(path: str | os.PathLike, descriptions: Mapping[str, Sequence[str]]) -> Path:
    """Write a CuPL-format description file (atomically)."""
    text = json.dumps({k: list(v) for k, v in descriptions.items()}, indent=1, ensure_ascii=False)
    return atomic_write_text(Path(path).expanduser(), text + "\n")


# --------------------------------------------------------------------------- the chat endpoint


def clean_api_key(key: str | None, source: str) -> str | None:
    """``key`` without surrounding whitespace (None when that leaves nothing). A key holding anything but visible
    ASCII characters (a line break, another control character, a space, a non-ASCII letter: a copy-paste accident)
    cannot go in an HTTP header and is refused with a :class:`GenerationError` naming ``source`` (where the key
    came from) and the position of the first such character, never the key itself."""
    if key is None:
        return None
    key = key.strip()
    for position, char in enumerate(key, 1):
        if not "!" <= char <= "~":
            if char == " ":
                kind = "a space"
            elif char.isascii():
                kind = "a line break or other control character"
            else:
                kind = "a non-ASCII character"
            raise GenerationError(
                f"the API key in {source} holds {kind} (character {position}), which cannot be sent in an HTTP "
                "header; set it to the key alone, without quotes, spaces or line breaks pasted in."
            )
    return key or None


@dataclass(frozen=True)
class ChatEndpoint:
    """Where and how to ask: an OpenAI-compatible ``/chat/completions`` endpoint. ``api_key`` is never shown."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key", clean_api_key(self.api_key, "the api_key given to ChatEndpoint"))

    @classmethod
    def from_environment(
        cls,
        *,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        environ: Mapping[str, str] = os.environ,
        **options: Any,
    ) -> ChatEndpoint:
        """Options first, then ``OPENAI_BASE_URL`` (default the OpenAI API), ``FEWCLIP_DESCRIBE_MODEL`` or
        ``OPENAI_MODEL``, and the key from the variable ``api_key_env`` (none: no Authorization header, as local
        servers accept), checked by :func:`clean_api_key` (an error names the variable, never the key)."""
        url = base_url or environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        name = model or environ.get("FEWCLIP_DESCRIBE_MODEL") or environ.get("OPENAI_MODEL")
        if not name:
            raise GenerationError(
                "no language model named: pass --model (e.g. gpt-4o-mini) or set FEWCLIP_DESCRIBE_MODEL."
            )
        if not url.startswith(("http://", "https://")):
            raise GenerationError(f"base URL {url!r} must start with http:// or https:// (e.g. {DEFAULT_BASE_URL}).")
        if api_key is not None:
            key = clean_api_key(api_key, "the api_key option")
        else:
            key = clean_api_key(environ.get(api_key_env), f"the environment variable {api_key_env}")
        return cls(url.rstrip("/"), name, key, **options)


class EndpointError(GenerationError):
    """The endpoint refused a request, or kept failing after every retry."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: urllib would re-send a redirected POST as a GET to the new address with every header,
    the API key's ``Authorization`` included, to whatever host the ``Location`` names. Returning None leaves the
    3xx answer to be raised as an :class:`urllib.error.HTTPError`, which :meth:`ChatClient.chat` reports."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature
        return None


class ChatClient:
    """POSTs chat requests with urllib, following no redirect (an :class:`EndpointError` naming the status and the
    ``Location``: the key is never sent to another address); transient failures (429, 408, 5xx, dropped or refused
    connections, timeouts) are retried up to ``retries`` times, waiting ``backoff * 2**attempt`` seconds (at most
    ``max_backoff``; a server's ``Retry-After`` when it says so). ``sleep`` is injectable for tests; ``requests``
    counts HTTP requests sent."""

    def __init__(
        self,
        endpoint: ChatEndpoint,
        *,
        retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] | None = None,
    ):
        self.endpoint = endpoint
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.sleep = sleep if sleep is not None else time.sleep
        self.requests = 0
        self._opener = urllib.request.build_opener(_RefuseRedirects)

    def redact(self, text: str) -> str:
        """``text`` with the API key masked, as written and as Python shows it escaped in a str or bytes repr."""
        key = self.endpoint.api_key
        if not key:
            return text
        forms = {key, repr(key)[1:-1], repr(key.encode("utf-8", "backslashreplace"))[2:-1]}
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, "***")
        return text

    def _send(self, request: urllib.request.Request) -> bytes:
        """The body of the answer to ``request`` (urllib's exceptions propagate; a redirect is an HTTPError)."""
        with self._opener.open(request, timeout=self.endpoint.timeout) as response:
            return response.read()

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.backoff * 2**attempt, self.max_backoff)
        if retry_after:
            try:
                delay = min(max(float(retry_after), 0.0), self.max_backoff)
            except ValueError:
                pass
        return delay

    def chat(self, messages: list[dict[str, str]], *, n: int = 1) -> list[str]:
        """The texts of the endpoint's ``n`` choices for ``messages``."""
        ep = self.endpoint
        body: dict[str, Any] = {"model": ep.model, "messages": messages, "temperature": ep.temperature}
        if n != 1:
            body["n"] = n
        if ep.max_tokens is not None:
            body["max_tokens"] = ep.max_tokens
        data = json.dumps(body).encode()
        url = f"{ep.base_url}/chat/completions"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if ep.api_key:
            headers["Authorization"] = f"Bearer {ep.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            self.requests += 1
            retry_after = None
            try:
                payload = self._send(request)
            except urllib.error.HTTPError as exc:
                if 300 <= exc.code < 400:
                    location = self.redact(str(exc.headers.get("Location", "")) if exc.headers else "")
                    raise EndpointError(
                        f"{url}: the endpoint answered HTTP {exc.code} {exc.reason}, a redirect to "
                        f"{location or '(no Location given)'}. fewclip follows no redirect, so that the API key is "
                        "never sent to another address; if that address is the endpoint you mean, pass it as "
                        "--base-url (or OPENAI_BASE_URL)."
                    ) from None
                detail = self.redact(_error_body(exc))
                last = f"HTTP {exc.code} {exc.reason}: {detail}".strip()
                if exc.code not in _TRANSIENT_STATUS and exc.code < 500:
                    hint = " (check the API key variable)" if exc.code in (401, 403) else ""
                    raise EndpointError(f"{url}: {last}{hint}") from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(exc).__name__}: {self.redact(str(reason))}"
            except ValueError as exc:  # the request could not be built (a bad header or URL): not transient
                raise EndpointError(
                    f"{url}: the request could not be sent ({type(exc).__name__}: {self.redact(str(exc))})."
                ) from None
            else:
                return self._choices(payload, url)
            if attempt < self.retries:
                delay = self._wait(attempt, retry_after)
                logger.warning("%s: %s; retrying in %.1f s (%d/%d)", url, last, delay, attempt + 1, self.retries)
                self.sleep(delay)
        raise EndpointError(f"{url}: still failing after {self.retries + 1} attempts; last error: {last}")

    def _choices(self, payload: bytes, url: str) -> list[str]:
        try:
            obj = json.loads(payload)
            return [str(c["message"]["content"] or "") for c in obj["choices"]]
        except (ValueError, KeyError, TypeError) as exc:
            shown = self.redact(payload[:200].decode("utf-8", "replace"))
            reason = self.redact(str(exc))
            raise EndpointError(
                f"{url}: the answer is not an OpenAI chat completion ({type(exc).__name__}: {reason}); it starts "
                f"{shown!r}."
            ) from None


def _error_body(exc: urllib.error.HTTPError) -> str:
    """The start of an error response's body ('' when it cannot be read)."""
    try:
        return exc.read()[:300].decode("utf-8", "replace") if exc.fp else ""
    except (OSError, http.client.HTTPException):
        return ""


# --------------------------------------------------------------------------- parsing answers

_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)
_ITEM = re.compile(r"^\s*(?:\d+[.):]|[-*\u2022])\s+(.+?)\s*$")


def parse_sentences(answer: str) -> list[str]:
    """The sentences of a model's answer: a JSON array of strings (possibly inside a code fence, or an object
    holding one), else a numbered or bulleted list of at least two lines. ``[]`` when neither is found."""
    text = answer.strip()
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1).strip()] if fenced else []
    candidates.append(text)
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            obj = lists[0] if len(lists) == 1 else None
        if isinstance(obj, list) and obj and all(isinstance(s, str) for s in obj):
            out = [" ".join(s.split()) for s in obj if s.strip()]
            if out:
                return out
    items = [m.group(1).strip().strip('"') for line in text.splitlines() if (m := _ITEM.match(line))]
    return items if len(items) >= 2 else []


# --------------------------------------------------------------------------- describing classes


def fill_prompt(template: str, classname: str, n: int) -> str:
    """``template`` with ``{c}`` (the class name, underscores as spaces) and ``{n}`` filled; braces in the class
    name are kept as they are."""
    return template.replace("{n}", str(n)).replace("{c}", prompt_name(classname))


def description_key(classname: str, endpoint: ChatEndpoint, template: str, n: int) -> str:
    """Hex SHA-256 naming one class's cached answer: (class, model, prompt template, n, sampling settings)."""
    payload = {
        "class": classname,
        "model": endpoint.model,
        "template": template,
        "n": n,
        "temperature": endpoint.temperature,
        "max_tokens": endpoint.max_tokens,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class DescribeResult:
    """Sentences per class (in class order, only those that parsed), classes whose answer did not parse (class ->
    the start of the answer), requests sent and classes served from the cache."""

    descriptions: dict[str, list[str]]
    failed: dict[str, str]
    requests: int
    cached: int


def describe_classes(
    classnames: Sequence[str],
    client: ChatClient,
    *,
    n: int = 10,
    template: str = DEFAULT_PROMPT,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> DescribeResult:
    """Ask ``client`` for ``n`` sentences per class (one request per class not in the cache); each answer is
    cached as soon as it arrives. Answers that do not parse are reported in ``failed`` (and not cached, so a rerun
    asks again); an answer with fewer than ``n`` sentences is kept, with a warning naming the class."""
    if n < 1:
        raise GenerationError(f"n={n}: ask for at least one sentence per class.")
    if "{c}" not in template:
        raise GenerationError(f"prompt template {template!r} has no {{c}} placeholder for the class name.")
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "descriptions"
    out: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    cached = 0
    sent_before = client.requests
    unique = list(dict.fromkeys(classnames))
    with progress(len(unique), "describing classes", "class", enabled=show_progress) as bar:
        for c in unique:
            path = folder / f"{description_key(c, client.endpoint, template, n)}.json"
            hit = _read_cached(path)
            if hit is not None:
                out[c] = hit
                cached += 1
                bar.update(1)
                continue
            prompt = fill_prompt(template, c, n)
            # the key masked at once: an answer echoing it shows it nowhere (errors, sentences, the cache)
            answer = client.redact(client.chat([{"role": "user", "content": prompt}])[0])
            sentences = parse_sentences(answer)
            if not sentences:
                failed[c] = " ".join(answer.split())[:120]
                bar.update(1)
                continue
            if len(sentences) < n:
                warnings.warn(
                    f"describe: the answer for {c!r} has {len(sentences)} sentences, fewer than the {n} asked; kept.",
                    GenerationWarning,
                    stacklevel=2,
                )
            out[c] = sentences[:n]
            record = {
                "format": DESCRIPTIONS_FORMAT,
                "class": c,
                "model": client.endpoint.model,
                "template": template,
                "n": n,
                "temperature": client.endpoint.temperature,
                "max_tokens": client.endpoint.max_tokens,
                "prompt": prompt,
                "sentences": out[c],
                "answer": answer,
            }
            atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False))
            bar.update(1)
    return DescribeResult(out, failed, client.requests - sent_before, cached)


def _read_cached(path: Path) -> list[str] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("description cache %s is unreadable (%s); asking again", path, exc)
        return None
    if not isinstance(record, dict):  # valid JSON, but not a record (a list, a number, null)
        record = {}
    sentences = record.get("sentences")
    if record.get("format") != DESCRIPTIONS_FORMAT or not isinstance(sentences, list) or not sentences:
        logger.warning("description cache %s is not a fewclip description record; asking again", path)
        return None
    return [str(s) for s in sentences]


def failed_error(failed: Mapping[str, str], done: int) -> GenerationError:
    """The error for classes whose answers did not parse: names them and shows how each answer began."""
    lines = "\n".join(f"  {c!r}: {start!r}" for c, start in list(failed.items())[:20])
    more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
    return GenerationError(
        f"the language model's answer could not be read as sentences for {len(failed)} class(es): "
        f"{_names_list(list(failed))}.\n{lines}{more}\nThe {done} other class(es) are cached; run the same command "
        "again to ask only for these (or change --prompt so the model answers with a JSON list)."
    )
