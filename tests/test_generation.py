"""generation/: description files and the language-model endpoint (against a fake server on 127.0.0.1), and the
Stable Diffusion store with a tiny random pipeline saved to disk and loaded back by path (offline, CPU)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewclip.cli.main import main
from fewclip.errors import DataError
from fewclip.generation import load_generated_set
from fewclip.generation.describe import (
    ChatClient,
    ChatEndpoint,
    EndpointError,
    describe_classes,
    load_descriptions,
    parse_sentences,
)
from fewclip.generation.diffusion import load_sampler, require_diffusers, resolve_model_folder, weights_identity
from fewclip.generation.settings import GenerationError, GenerationSettings, GenerationWarning, item_seed
from fewclip.generation.store import STORE_FOLDER, GenerationStore, generate
from fewclip.generation.tiny import save_tiny_stable_diffusion

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "sk-test-VERY-SECRET-0123456789"

# --------------------------------------------------------------------------- a fake OpenAI-compatible endpoint


class FakeEndpoint:
    """A chat-completions server on 127.0.0.1. ``script[class]`` is a list of replies used in turn (the last one
    repeats): ``(status, text)``, ``(status, text, headers)`` or ``"drop"`` (close the connection unanswered).
    The default reply is a JSON array of ``n`` sentences naming the class. ``requests`` records (headers, body)."""

    def __init__(self):
        self.script: dict[str, list] = {}
        self.requests: list[tuple[dict[str, str], dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((dict(self.headers), body))
                prompt = body["messages"][0]["content"]
                cls = prompt.split("what a ", 1)[1].split(" looks like", 1)[0]
                replies = outer.script.get(cls, [])
                seen = sum(1 for _, b in outer.requests if cls in b["messages"][0]["content"]) - 1
                reply = replies[min(seen, len(replies) - 1)] if replies else None
                if reply == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if reply is None:
                    reply = (200, json.dumps([f"A photo of a {cls}, sentence {i}." for i in range(3)]))
                status, text, headers = (*reply, {}) if len(reply) == 2 else reply
                payload = (
                    json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                    if status == 200
                    else text
                ).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    with FakeEndpoint() as fake:
        yield fake


def client_for(fake: FakeEndpoint, sleeps: list[float] | None = None, **kwargs) -> ChatClient:
    ep = ChatEndpoint.from_environment(base_url=fake.url, model="fake-gpt", api_key=KEY, environ={})
    return ChatClient(ep, sleep=(sleeps.append if sleeps is not None else lambda s: None), **kwargs)


def prompt_template() -> str:
    return "Describe what a {c} looks like in {n} sentences; answer with a JSON list."


def describe_argv(tmp_path: Path, *extra: str, out: str = "d.json") -> list[str]:
    """``fewclip describe`` over ``tmp_path``/classes.txt with the test prompt, 3 sentences, the cache in tmp_path."""
    return ["describe", "--classnames", str(tmp_path / "classes.txt"), "--out", str(tmp_path / out), "-n", "3",
            "--prompt", prompt_template(), "--cache-dir", str(tmp_path / "cache"), *extra]  # fmt: skip


def all_file_bytes(*roots: Path) -> bytes:
    return b"".join(p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- descriptions


def test_parse_sentences_reads_json_fences_objects_and_lists_and_rejects_prose():
    assert parse_sentences('["A red  bird.", "A small bird."]') == ["A red bird.", "A small bird."]
    assert parse_sentences('Sure!\n```json\n["One.", "Two."]\n```') == ["One.", "Two."]
    assert parse_sentences('{"sentences": ["One.", "Two."]}') == ["One.", "Two."]
    assert parse_sentences('Here you go: ["One.", "Two."] enjoy') == ["One.", "Two."]
    assert parse_sentences("1. A cat on a mat.\n2) A cat in a hat.\n- A cat.") == [
        "A cat on a mat.",
        "A cat in a hat.",
        "A cat.",
    ]
    assert parse_sentences("Sorry, I cannot help with that.") == []
    assert parse_sentences("1. only one numbered line") == []
    assert parse_sentences("[1, 2]") == []


def test_describe_caches_every_class_and_a_second_run_sends_no_request(endpoint, tmp_path):
    names = ["tabby cat", "beagle", "sea_lion"]
    first = describe_classes(names, client_for(endpoint), n=3, template=prompt_template(), cache_dir=tmp_path,
                             show_progress=False)  # fmt: skip
    assert first.requests == 3 and first.cached == 0 and not first.failed
    assert first.descriptions["sea_lion"][0] == "A photo of a sea lion, sentence 0."  # underscores read as spaces
    headers, body = endpoint.requests[0]
    assert headers["Authorization"] == f"Bearer {KEY}" and body["model"] == "fake-gpt"
    again = client_for(endpoint)
    second = describe_classes(names, again, n=3, template=prompt_template(), cache_dir=tmp_path, show_progress=False)
    assert again.requests == 0 and second.requests == 0 and second.cached == 3
    assert second.descriptions == first.descriptions
    assert len(endpoint.requests) == 3
    # another model, template or count is another cache entry
    third = describe_classes(["beagle"], again, n=2, template=prompt_template(), cache_dir=tmp_path,
                             show_progress=False)  # fmt: skip
    assert third.requests == 1 and third.descriptions["beagle"] == first.descriptions["beagle"][:2]


def test_transient_errors_are_retried_with_exponential_back_off_and_retry_after(endpoint, tmp_path):
    endpoint.script["beagle"] = [(429, "slow down"), (503, "busy"), "drop", (500, "oops", {"Retry-After": "7"}), None]
    sleeps: list[float] = []
    client = client_for(endpoint, sleeps, backoff=0.5)
    result = describe_classes(["beagle"], client, n=3, template=prompt_template(), cache_dir=tmp_path,
                              show_progress=False)  # fmt: skip
    assert result.descriptions["beagle"] and client.requests == 5
    assert sleeps == [0.5, 1.0, 2.0, 7.0]  # 0.5 * 2**attempt, then the server's Retry-After


def test_retries_give_up_with_the_last_error_and_an_interrupted_run_resumes(endpoint, tmp_path):
    endpoint.script["beagle"] = [(502, "bad gateway")]
    client = client_for(endpoint, retries=2)
    with pytest.raises(EndpointError, match=r"still failing after 3 attempts; last error: HTTP 502"):
        describe_classes(["abyssinian", "beagle", "chihuahua"], client, n=3, template=prompt_template(),
                         cache_dir=tmp_path, show_progress=False)  # fmt: skip
    assert client.requests == 1 + 3  # abyssinian answered (and cached), beagle tried three times
    endpoint.script["beagle"] = [None]
    resumed = client_for(endpoint)
    result = describe_classes(["abyssinian", "beagle", "chihuahua"], resumed, n=3, template=prompt_template(),
                              cache_dir=tmp_path, show_progress=False)  # fmt: skip
    assert resumed.requests == 2 and result.cached == 1 and len(result.descriptions) == 3


def test_a_refused_request_is_not_retried_and_its_message_masks_the_key(endpoint, tmp_path):
    endpoint.script["beagle"] = [(401, json.dumps({"error": f"Incorrect API key provided: {KEY}"}))]
    client = client_for(endpoint)
    with pytest.raises(EndpointError, match="HTTP 401") as err:
        describe_classes(["beagle"], client, n=3, template=prompt_template(), cache_dir=tmp_path, show_progress=False)
    assert client.requests == 1 and KEY not in str(err.value) and "***" in str(err.value)


def test_an_answer_that_does_not_parse_is_reported_by_class_name(endpoint, tmp_path, monkeypatch, capsys):
    endpoint.script["beagle"] = [(200, "I'd rather not describe dogs today.")]
    (tmp_path / "classes.txt").write_text("abyssinian\nbeagle\n")
    monkeypatch.setenv("MY_KEY", KEY)
    argv = describe_argv(tmp_path, "--base-url", endpoint.url, "--model", "fake-gpt", "--api-key-env", "MY_KEY")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'beagle'" in err and "I'd rather not describe dogs today." in err and "abyssinian" not in err.split("\n")[0]
    assert not (tmp_path / "d.json").exists()
    endpoint.script["beagle"] = [None]
    before = len(endpoint.requests)
    assert main(argv) == 0
    assert len(endpoint.requests) == before + 1  # only beagle was asked again
    out = json.loads((tmp_path / "d.json").read_text())
    assert list(out) == ["abyssinian", "beagle"] and len(out["beagle"]) == 3


def test_the_api_key_is_never_written_to_a_file_or_a_log(endpoint, tmp_path, monkeypatch, capsys, caplog):
    endpoint.script["beagle"] = [(500, f"internal error for key {KEY}"), None]
    (tmp_path / "classes.txt").write_text("abyssinian\nbeagle\n")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", endpoint.url)
    monkeypatch.setenv("FEWCLIP_DESCRIBE_MODEL", "fake-gpt")
    monkeypatch.setattr(time, "sleep", lambda s: None)
    caplog.set_level("DEBUG")
    argv = describe_argv(tmp_path, out="out/d.json")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert all(h["Authorization"] == f"Bearer {KEY}" for h, _ in endpoint.requests)  # it was used ...
    written = all_file_bytes(tmp_path)
    assert b"fake-gpt" in written and b"A photo of a beagle" in written  # ... the files were written ...
    assert KEY.encode() not in written  # ... and hold no trace of it, nor does any output or log line
    assert KEY not in captured.out + captured.err + caplog.text
    assert "***" in caplog.text  # the 500's body was logged, masked


def test_a_key_with_a_line_break_is_stripped_or_refused_and_never_shown(endpoint, tmp_path, monkeypatch, capsys):
    # the reviewer's scenario: a trailing newline pasted into the variable made http.client raise a ValueError
    # whose traceback showed b'Bearer <key>\n'; stripped, the key works
    (tmp_path / "classes.txt").write_text("beagle\n")
    monkeypatch.setenv("OPENAI_BASE_URL", endpoint.url)
    monkeypatch.setenv("FEWCLIP_DESCRIBE_MODEL", "fake-gpt")
    argv = describe_argv(tmp_path, "--retries", "0")
    monkeypatch.setenv("OPENAI_API_KEY", f" {KEY}\n")
    assert main(argv) == 0
    assert endpoint.requests[-1][0]["Authorization"] == f"Bearer {KEY}"
    # a control character inside the key: refused before any request, naming the variable and not the key
    for bad in (f"{KEY[:6]}\n{KEY[6:]}", f"{KEY[:6]}\x07{KEY[6:]}", f"{KEY[:6]} {KEY[6:]}", f"{KEY}\u00e9"):
        monkeypatch.setenv("OPENAI_API_KEY", bad)
        sent = len(endpoint.requests)
        assert main([*argv[:4], str(tmp_path / "e.json"), *argv[5:]]) == 2
        captured = capsys.readouterr()
        assert "OPENAI_API_KEY" in captured.err and "cannot be sent in an HTTP header" in captured.err
        assert KEY[6:] not in captured.out + captured.err and KEY[:6] + "\n" not in captured.err
        assert len(endpoint.requests) == sent and not (tmp_path / "e.json").exists()
    with pytest.raises(GenerationError, match="MY_KEY holds a line break") as err:
        ChatEndpoint.from_environment(model="m", api_key_env="MY_KEY", environ={"MY_KEY": f"{KEY}\r\nX-Evil: 1"})
    assert KEY not in str(err.value)
    with pytest.raises(GenerationError, match="api_key option holds a space") as err:
        ChatEndpoint.from_environment(model="m", api_key=f"Bearer {KEY}", environ={})
    assert KEY not in str(err.value)
    with pytest.raises(GenerationError, match="api_key given to ChatEndpoint holds a line break") as err:
        ChatEndpoint(endpoint.url, "m", f"{KEY}\nX")
    assert KEY not in str(err.value)
    assert ChatEndpoint(endpoint.url, "m", f"  {KEY}\n").api_key == KEY
    assert ChatEndpoint(endpoint.url, "m", " \n").api_key is None


def test_a_request_that_cannot_be_built_is_an_endpoint_error_with_the_key_masked(endpoint, monkeypatch):
    client = client_for(endpoint)

    # http.client's own check, made to refuse the Authorization value: it raises ValueError("Invalid header value
    # b'Bearer <key>'"), as it does for a key holding a line break
    monkeypatch.setattr(http.client, "_is_illegal_header_value", lambda value: value.startswith(b"Bearer"))
    with pytest.raises(EndpointError, match="could not be sent .ValueError: Invalid header value") as err:
        client.chat([{"role": "user", "content": "hi"}])
    assert KEY not in str(err.value) and "***" in str(err.value) and client.requests == 1  # not retried


class Recorder:
    """A server on 127.0.0.1 that records every request it gets (any method: method, path, headers) and answers
    ``reply(path)`` = (status, headers) with an empty body, or a chat completion when the status is 200."""

    def __init__(self, reply):
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                outer.seen.append((self.command, self.path, dict(self.headers)))
                if self.headers.get("Content-Length"):
                    self.rfile.read(int(self.headers["Content-Length"]))
                status, headers = reply(self.path)
                body = (
                    json.dumps({"choices": [{"message": {"content": '["a", "b"]'}}]}).encode() if status == 200 else b""
                )
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_so_the_key_never_reaches_another_host(status):
    other = Recorder(lambda path: (200, {}))  # the address a hostile or misconfigured endpoint points to
    first = Recorder(lambda path: (status, {"Location": f"{other.url}/steal"}))
    try:
        ep = ChatEndpoint.from_environment(base_url=f"{first.url}/v1", model="m", api_key=KEY, environ={})
        client = ChatClient(ep, retries=3, sleep=lambda s: None)
        with pytest.raises(EndpointError, match=rf"HTTP {status} .*a redirect to {other.url}/steal") as err:
            client.chat([{"role": "user", "content": "hi"}])
        assert "follows no redirect" in str(err.value) and KEY not in str(err.value)
        assert other.seen == []  # the other server received nothing, so not the key
        assert [(m, p) for m, p, _ in first.seen] == [("POST", "/v1/chat/completions")]  # asked once, not retried
        assert first.seen[0][2]["Authorization"] == f"Bearer {KEY}"
    finally:
        first.close()
        other.close()


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "null", "3", '{"format": "other"}'])
def test_a_cache_entry_that_is_not_a_record_is_asked_again_with_a_warning(endpoint, tmp_path, caplog, content):
    client = client_for(endpoint)
    first = describe_classes(["beagle"], client, n=3, template=prompt_template(), cache_dir=tmp_path,
                             show_progress=False)  # fmt: skip
    (entry,) = (tmp_path / "descriptions").glob("*.json")
    entry.write_text(content)  # valid JSON, not a description record: AttributeError on a list before
    caplog.set_level("WARNING", logger="fewclip.generation")
    again = describe_classes(["beagle"], client, n=3, template=prompt_template(), cache_dir=tmp_path,
                             show_progress=False)  # fmt: skip
    assert again.requests == 1 and again.cached == 0 and again.descriptions == first.descriptions
    assert str(entry) in caplog.text and "not a fewclip description record" in caplog.text
    assert json.loads(entry.read_text())["sentences"] == first.descriptions["beagle"]  # rewritten


def test_an_unparsed_answer_that_echoes_the_key_is_shown_masked(endpoint, tmp_path, monkeypatch, capsys):
    endpoint.script["beagle"] = [(200, f"Cannot comply; your key {KEY} is logged.")]
    client = client_for(endpoint)
    result = describe_classes(["beagle"], client, n=3, template=prompt_template(), cache_dir=tmp_path,
                              show_progress=False)  # fmt: skip
    assert KEY not in result.failed["beagle"] and "your key *** is logged" in result.failed["beagle"]
    (tmp_path / "classes.txt").write_text("beagle\n")
    monkeypatch.setenv("MY_KEY", KEY)
    argv = describe_argv(tmp_path, "--base-url", endpoint.url, "--model", "fake-gpt", "--api-key-env", "MY_KEY")
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "'beagle'" in captured.err and "***" in captured.err and KEY not in captured.out + captured.err
    # an answer that parses but echoes the key is cached with the key masked
    endpoint.script["beagle"] = [(200, json.dumps(["A dog.", "A hound.", f"Key {KEY}."]))]
    assert main(argv) == 0
    assert KEY.encode() not in all_file_bytes(tmp_path) and KEY not in capsys.readouterr().out


def test_a_description_file_missing_classes_is_an_error_listing_every_one(tmp_path):
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps({"Abyssinian": ["A slender cat."], "great pyrenees": ["A big white dog."]}))
    classes = ["abyssinian", "great_pyrenees", "beagle", "sphynx"]
    with pytest.raises(GenerationError) as err:
        load_descriptions(path, classes)
    message = str(err.value)
    assert str(path) in message and "2 of 4 classes" in message
    assert "'beagle'" in message and "'sphynx'" in message and "abyssinian" not in message.split(":")[2]
    filled = load_descriptions(path, classes, missing="template", template="a photo of a {}, a type of pet.")
    assert filled == {
        "abyssinian": ["A slender cat."],  # case-insensitive match
        "great_pyrenees": ["A big white dog."],  # underscores match spaces
        "beagle": ["a photo of a beagle, a type of pet."],
        "sphynx": ["a photo of a sphynx, a type of pet."],
    }
    with pytest.warns(GenerationWarning, match="match no class: 'great pyrenees'"):
        load_descriptions(path, ["abyssinian"])


def test_describe_from_a_file_asks_only_for_the_missing_classes(endpoint, tmp_path, monkeypatch):
    src = tmp_path / "cupl.json"
    src.write_text(json.dumps({"abyssinian": ["A slender cat.", "A ticked coat."]}))
    (tmp_path / "classes.txt").write_text("abyssinian\nbeagle\n")
    base = ["describe", "--from", str(src), "--classnames", str(tmp_path / "classes.txt")]
    assert main([*base, "--out", str(tmp_path / "a.json")]) == 2  # beagle is missing
    assert main([*base, "--out", str(tmp_path / "b.json"), "--missing", "template"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["beagle"] == ["a photo of a beagle."]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ask = [*base, "--out", str(tmp_path / "c.json"), "--missing", "ask", "--base-url", endpoint.url, "--model", "m",
           "-n", "3", "--prompt", prompt_template(), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(ask) == 0
    assert len(endpoint.requests) == 1 and "Authorization" not in endpoint.requests[0][0]
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["abyssinian"] == ["A slender cat.", "A ticked coat."] and len(out["beagle"]) == 3


# --------------------------------------------------------------------------- the tiny pipeline and the store
# Pipeline calls are what costs here (tens of ms each on an idle core): the tests share one reference generation
# (copied where a test changes the store) and keep their own calls to one or two.


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


def tiny_settings(tiny_sd: Path, **kw) -> GenerationSettings:
    values = dict(model=str(tiny_sd), steps=2, resolution=32, images_per_prompt=2, batch_size=4, device="cpu")
    return GenerationSettings(**{**values, **kw})


@pytest.fixture(scope="module")
def sampler(tiny_sd):
    return load_sampler(tiny_settings(tiny_sd))


class Counting:
    """Wraps a sampler: counts the images sampled, and raises after ``fail_after`` calls when set."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after = inner, fail_after
        self.calls = self.sampled = 0

    def __getattr__(self, name):  # identity, sampling, settings, device, describe: the wrapped sampler's
        return getattr(self.inner, name)

    def sample(self, prompts, seeds):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.sampled += len(prompts)
        return self.inner.sample(prompts, seeds)


PROMPTS = {"cat": ["a photo of a cat", "a small cat"], "dog": ["a photo of a dog", "a big dog"]}


def run(prompts, out, settings, cache, sampler):
    return generate(prompts, out, settings, cache_dir=cache, sampler=sampler, show_progress=False)


@pytest.fixture(scope="module")
def reference(tiny_sd, sampler, tmp_path_factory):
    """PROMPTS generated once (8 images in 2 calls): (cache folder, output folder, the generated set, the report)."""
    root = tmp_path_factory.mktemp("reference")
    counting = Counting(sampler)
    report = run(PROMPTS, root / "out", tiny_settings(tiny_sd), root / "cache", counting)
    assert counting.sampled == 8
    return root / "cache", root / "out", load_generated_set(root / "out"), report


def copied_cache(reference, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(reference[0], tmp_path / "cache"))


def test_generated_set_holds_each_image_with_the_latent_it_was_decoded_from(tiny_sd, sampler, reference):
    cache, out, gen, report = reference
    assert (report.samples, report.generated, report.reused) == (8, 8, 0)
    assert gen.classnames == ("cat", "dog") and gen.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert gen.latent_shape == (4, 16, 16) and gen.prompts[2] == "a small cat"
    # the image is the VAE decoding of its stored latent (one sampling call gave both)
    vae = sampler.pipe.vae
    with torch.no_grad():
        decoded = vae.decode(gen.latents / vae.config.scaling_factor).sample
    expected = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in gen.images])
    assert pixels.shape == (8, 32, 32, 3) and np.abs(pixels - expected).max() <= 1.0
    # the images are hard links into the shared store, and the folder is a dataset of the folder kind
    store = GenerationStore(cache / STORE_FOLDER)
    index = json.loads((out / ".fewclip-generated" / "index.json").read_text())
    first = index["samples"][0]
    assert os.path.samefile(gen.images[0], store.image_path(first["key"]))
    assert first["seed"] == item_seed(42, "a photo of a cat", 0) and first["image_index"] == 0
    assert index["pipeline"]["weights_identity"] == sampler.identity and index["pipeline"]["scaling_factor"] == 0.18215
    from fewclip.data import load_dataset

    splits = load_dataset("folder", path=out)
    assert splits.classnames == ["cat", "dog"] and len(splits.train) + len(splits.val) + len(splits.test) == 8


def test_same_seed_same_latents_whatever_the_batch_and_another_seed_differs(tiny_sd, sampler, reference, tmp_path):
    again = run(PROMPTS, tmp_path / "a", tiny_settings(tiny_sd), tmp_path / "c1", sampler)
    assert again.generated == 8 and torch.equal(load_generated_set(again.out).latents, reference[2].latents)
    # other batches change the order of float sums only (an image's noise is its own)
    cats = {"cat": PROMPTS["cat"]}
    rebatched = run(cats, tmp_path / "b", tiny_settings(tiny_sd, batch_size=3), tmp_path / "c2", sampler)
    assert torch.allclose(load_generated_set(rebatched.out).latents, reference[2].latents[:4], atol=1e-4)
    other = run({"cat": ["a photo of a cat"]}, tmp_path / "o", tiny_settings(tiny_sd, seed=7), tmp_path / "c3", sampler)
    assert (load_generated_set(other.out).latents - reference[2].latents[:2]).abs().amax() > 0.1
    assert len(set(reference[2].latents.flatten(1).sum(1).tolist())) == 8  # every item has its own noise


def test_an_interrupted_run_resumes_without_sampling_finished_items_twice(tiny_sd, sampler, reference, tmp_path):
    settings = tiny_settings(tiny_sd)
    broken = Counting(sampler, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        run(PROMPTS, tmp_path / "out", settings, tmp_path / "cache", broken)
    assert broken.sampled == 4 and not (tmp_path / "out").exists()
    store = GenerationStore(tmp_path / "cache" / STORE_FOLDER)
    assert len(store.index()) == 4  # the finished batch was stored before the interruption propagated
    resumed = Counting(sampler)
    report = run(PROMPTS, tmp_path / "out", settings, tmp_path / "cache", resumed)
    assert resumed.sampled == 4 and (report.generated, report.reused) == (4, 4)
    assert torch.equal(load_generated_set(tmp_path / "out").latents, reference[2].latents)
    again = Counting(sampler)
    assert run(PROMPTS, tmp_path / "out", settings, tmp_path / "cache", again).generated == 0 and again.calls == 0


def test_the_store_is_shared_across_datasets_and_only_new_prompts_are_sampled(tiny_sd, sampler, reference, tmp_path):
    settings, cache = tiny_settings(tiny_sd), copied_cache(reference, tmp_path)
    counting = Counting(sampler)
    prompts = {"kitten": ["a photo of a cat"], "puppy": ["a new dog"], "twin": ["a new dog"]}
    report = run(prompts, tmp_path / "b", settings, cache, counting)
    assert counting.sampled == 2 and report.reused == 2  # the cat prompt's two images come from the reference
    gen = load_generated_set(tmp_path / "b")
    assert torch.equal(gen.latents[:2], reference[2].latents[:2])
    assert torch.equal(gen.latents[2:4], gen.latents[4:]) and gen.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # other settings are other images: a sampler loaded for other settings is refused, and nothing is reused
    other = tiny_settings(tiny_sd, steps=1)
    with pytest.raises(GenerationError, match="load it with these settings"):
        run({"cat": ["a photo of a cat"]}, tmp_path / "c", other, cache, sampler)
    fresh = Counting(load_sampler(other))
    run({"cat": ["a photo of a cat"]}, tmp_path / "c", other, cache, fresh)
    assert fresh.sampled == 2


def test_rewriting_a_set_for_fewer_classes_removes_the_old_images(tiny_sd, sampler, reference, tmp_path):
    import shutil

    cache, out = copied_cache(reference, tmp_path), Path(shutil.copytree(reference[1], tmp_path / "out"))
    counting = Counting(sampler)
    run({"dog": PROMPTS["dog"]}, out, tiny_settings(tiny_sd), cache, counting)
    assert counting.calls == 0
    assert not any((out / "cat").glob("*.png")) and len(list((out / "dog").glob("*.png"))) == 4
    assert len(list((out / ".fewclip-generated").glob("*.safetensors"))) == 1
    assert load_generated_set(out).classnames == ("dog",)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "image"])
def test_a_corrupt_shard_or_image_is_detected_and_regenerated(tiny_sd, sampler, reference, tmp_path, damage):
    settings, cache = tiny_settings(tiny_sd), copied_cache(reference, tmp_path)
    store = GenerationStore(cache / STORE_FOLDER)
    shard = store.shard_paths()[1]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF  # one latent value changes: only the checksum can tell
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) - 100]))
    elif damage == "header":
        shard.write_bytes(b"\x00" * 8 + bytes(data[8:]))
    else:
        key = next(iter(store.index()))
        store.image_path(key).write_bytes(b"not a png")
    counting = Counting(sampler)
    if damage == "image":
        run(PROMPTS, tmp_path / "out", settings, cache, counting)
        assert counting.sampled == 1  # sampled alone, not in its batch of 4: the same up to float summation order
        assert torch.allclose(load_generated_set(tmp_path / "out").latents, reference[2].latents, atol=1e-4)
    else:
        with pytest.warns(GenerationWarning, match="corrupt"):
            report = run(PROMPTS, tmp_path / "out", settings, cache, counting)
        assert counting.sampled == 4 and report.set_aside == [store.corrupt_dir / shard.name]
        assert not shard.exists()
        assert torch.equal(load_generated_set(tmp_path / "out").latents, reference[2].latents)


def test_a_damaged_set_shard_is_refused_and_rewritten_from_the_store(tiny_sd, sampler, reference, tmp_path):
    import shutil

    from fewclip.errors import DataError

    cache, out = copied_cache(reference, tmp_path), Path(shutil.copytree(reference[1], tmp_path / "out"))
    shard = next((out / ".fewclip-generated").glob("latents-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="fail their SHA-256 checksum"):
        load_generated_set(out)
    counting = Counting(sampler)
    run(PROMPTS, out, tiny_settings(tiny_sd), cache, counting)
    assert counting.calls == 0 and torch.equal(load_generated_set(out).latents, reference[2].latents)


def test_write_generated_set_round_trips_and_its_checksum_catches_a_flipped_byte(tmp_path):
    from fewclip.errors import DataError
    from fewclip.generation import GeneratedSet, write_generated_set

    images = []
    for i in range(3):
        images.append(tmp_path / "src" / f"{i}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(images[-1])
    latents = torch.randn(3, 4, 2, 2).to(torch.bfloat16)
    gen = GeneratedSet(("a/b", "c"), tuple(images), torch.tensor([0, 1, 0]), latents, ("p0", "p1", "p2"))
    write_generated_set(tmp_path / "set", gen)
    back = load_generated_set(tmp_path / "set")
    assert torch.equal(back.latents, latents.float()) and back.labels.tolist() == [0, 1, 0]
    shard = next((tmp_path / "set" / ".fewclip-generated").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum"):
        load_generated_set(tmp_path / "set")


def test_a_class_name_listed_twice_gets_the_samples_of_that_name_for_each_label(tmp_path):
    from fewclip.generation import GeneratedSet

    # ImageNet names two classes 'missile' (and two 'sunglasses'): the set holds the name once, both labels need it
    images = tuple(Path(f"/gen/{n}.png") for n in ("m0", "m1", "c0", "c1", "m2"))
    latents = torch.arange(5.0)[:, None, None, None].expand(5, 4, 2, 2).clone()
    gen = GeneratedSet(("missile", "cat"), images, torch.tensor([0, 0, 1, 1, 0]), latents, ("pm0", "pm1", "pc0",
                       "pc1", "pm2"))  # fmt: skip
    sub = gen.for_classes(["missile", "cat", "missile"])
    assert torch.bincount(sub.labels, minlength=3).tolist() == [3, 2, 3]  # before: [0, 2, 3], the first missile lost
    # each row once per label, in the set's order; images, latents and prompts stay aligned with the labels
    assert [(p.stem, y) for p, y in zip(sub.images, sub.labels.tolist())] == [
        ("m0", 0), ("m0", 2), ("m1", 0), ("m1", 2), ("c0", 1), ("c1", 1), ("m2", 0), ("m2", 2),
    ]  # fmt: skip
    assert [int(z[0, 0, 0]) for z in sub.latents] == [0, 0, 1, 1, 2, 3, 4, 4]
    assert all(prompt == "p" + path.stem for prompt, path in zip(sub.prompts, sub.images))
    # a name the set lacks is still named, once per class of that name; missing_ok keeps the others
    with pytest.raises(DataError, match="no generated samples for 2 class.*'dog', 'dog'"):
        gen.for_classes(["dog", "cat", "dog"])
    partial = gen.for_classes(["dog", "missile", "dog", "missile"], missing_ok=True)
    assert torch.bincount(partial.labels, minlength=4).tolist() == [0, 3, 0, 3]
    # without repeated names nothing changes: each row once, in order
    assert [p.stem for p in gen.for_classes(["cat", "missile"]).images] == ["m0", "m1", "c0", "c1", "m2"]
    assert gen.for_classes(["cat", "missile"]).labels.tolist() == [1, 1, 0, 0, 1] and len(gen.for_classes([])) == 0


def test_model_loading_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(GenerationError, match="no such folder"):
        resolve_model_folder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenerationError, match="no model_index.json"):
        resolve_model_folder(str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(GenerationError, match=r"pip install 'fewclip\[generate\]'"):
        require_diffusers()
    with pytest.raises(GenerationError, match="steps=0"):
        GenerationSettings(steps=0).validate()


def test_weights_identity_follows_the_bytes_not_the_folder(tiny_sd, tmp_path):
    import shutil

    copy = Path(shutil.copytree(tiny_sd, tmp_path / "copy"))
    assert weights_identity(copy) == weights_identity(tiny_sd)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_identity(copy) != weights_identity(tiny_sd)


def test_generate_command_end_to_end_with_descriptions(tiny_sd, tmp_path, capsys):
    (tmp_path / "d.json").write_text(json.dumps({"tabby cat": ["A striped cat.", "A cat.", "A third."], "dog": ["A"]}))
    (tmp_path / "classes.txt").write_text("tabby_cat\ndog\nbird\n")
    argv = ["generate", "--descriptions", str(tmp_path / "d.json"), "--classnames", str(tmp_path / "classes.txt"),
            "--out", str(tmp_path / "out"), "--model", str(tiny_sd), "--steps", "2", "--resolution", "32",
            "--images-per-prompt", "1", "--prompts-per-class", "2", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 2
    assert "no descriptions for 1 of 3 classes: 'bird'" in capsys.readouterr().err
    assert main([*argv, "--missing", "template", "--template", "a photo of a {}, a bird."]) == 0
    assert "4 images (4 generated" in capsys.readouterr().out
    gen = load_generated_set(tmp_path / "out")
    assert gen.prompts == ("A striped cat.", "A cat.", "A", "a photo of a bird, a bird.")
    assert gen.classnames == ("tabby_cat", "dog", "bird")


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_without_regenerating(tiny_sd, sampler, tmp_path):
    prompts = {f"class {c}": [f"prompt {c} {p}" for p in range(6)] for c in range(4)}  # 48 images
    (tmp_path / "d.json").write_text(json.dumps(prompts))
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "FEWCLIP_PROGRESS_SECONDS": "0"}
    cmd = [sys.executable, "-m", "fewclip", "generate", "--descriptions", str(tmp_path / "d.json"),
           "--out", str(tmp_path / "out"), "--model", str(tiny_sd), "--steps", "2", "--resolution", "32",
           "--batch-size", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = GenerationStore(tmp_path / "cache" / STORE_FOLDER)
    deadline = time.monotonic() + 300
    while len(store.shard_paths()) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(store.index())
    assert 3 <= done < 48
    counting = Counting(sampler)
    report = run(prompts, tmp_path / "out", tiny_settings(tiny_sd, batch_size=16), tmp_path / "cache", counting)
    assert counting.sampled == 48 - done and report.reused == done
    rows = sum(len(json.loads(GenerationStore._header(p)[2]["ids"])) for p in store.shard_paths())
    assert rows == 48  # nothing was sampled twice
    assert len(load_generated_set(tmp_path / "out")) == 48
