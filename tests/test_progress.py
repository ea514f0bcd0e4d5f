"""The progress helper: tqdm on a terminal, timed log lines elsewhere (a fake stream and a fake clock)."""

from __future__ import annotations

import io

import pytest

from fewclip.errors import ProgressError
from fewclip.progress import LogProgress, format_duration, format_line, log_interval, progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.9, 75.2, 3725, -1)] == ["0:00", "0:59", "1:15", "1:02:05", "0:00"]


def test_format_line_counts_rate_and_eta():
    line = format_line("encoding images", 1200, 5000, "img", 30.0, {"loss": "0.12"})
    assert line == "fewclip: encoding images 1200/5000 img (24%), 40.0 img/s, elapsed 0:30, ETA 1:35, loss=0.12"
    assert format_line("fits", 1, 4, "fit", 20.0) == "fewclip: fits 1/4 fit (25%), 20.0 s/fit, elapsed 0:20, ETA 1:00"
    assert format_line("steps", 7, None, "step", 0.0) == "fewclip: steps 7 step, elapsed 0:00"


def test_log_lines_every_interval_and_a_last_line(monkeypatch):
    monkeypatch.setenv("FEWCLIP_PROGRESS_SECONDS", "30")
    stream, clock = io.StringIO(), Clock()
    with progress(10, "encoding images", "img", stream=stream, clock=clock) as bar:
        assert isinstance(bar, LogProgress)
        for _ in range(10):
            clock.now += 10.0
            bar.update(1)
    lines = stream.getvalue().splitlines()
    # written at 30, 60 and 90 s; then the last line at close (10/10 at 100 s)
    assert [line.split(" (")[0] for line in lines] == [f"fewclip: encoding images {n}/10 img" for n in (3, 6, 9, 10)]
    assert lines[0].endswith("elapsed 0:30, ETA 1:10") and "100%" in lines[-1] and "ETA" not in lines[-1]


def test_short_steps_stay_silent_and_disabled_shows_nothing(monkeypatch):
    monkeypatch.delenv("FEWCLIP_PROGRESS_SECONDS", raising=False)
    stream, clock = io.StringIO(), Clock()
    with progress(5, "fits", "fit", stream=stream, clock=clock) as bar:
        clock.now += 29.0
        bar.update(5)
    with progress(5, "fits", "fit", enabled=False, stream=stream, clock=clock) as bar:
        clock.now += 1000.0
        bar.update(5)
    assert stream.getvalue() == ""


def test_zero_interval_writes_every_update_with_postfix(monkeypatch):
    monkeypatch.setenv("FEWCLIP_PROGRESS_SECONDS", "0")
    stream, clock = io.StringIO(), Clock()
    with progress(None, "clip-ft train", "epoch", stream=stream, clock=clock) as bar:
        for loss in ("0.5", "0.25"):
            clock.now += 2.0
            bar.set_postfix({"loss": loss})
            bar.update()
    assert stream.getvalue().splitlines() == [
        "fewclip: clip-ft train 1 epoch, 2.0 s/epoch, elapsed 0:02, loss=0.5",
        "fewclip: clip-ft train 2 epoch, 2.0 s/epoch, elapsed 0:04, loss=0.25",
    ]


def test_a_terminal_gets_tqdm():
    stream = Terminal()
    with progress(3, "fits", "fit", stream=stream) as bar:
        assert not isinstance(bar, LogProgress)
        bar.update(3)
    assert "3/3" in stream.getvalue()


@pytest.mark.parametrize("raw", ["abc", "-1", "nan", "inf"])
def test_bad_interval_names_the_value_and_the_fix(raw):
    with pytest.raises(ProgressError, match=f"FEWCLIP_PROGRESS_SECONDS='{raw}' is not a number of seconds >= 0; set"):
        log_interval({"FEWCLIP_PROGRESS_SECONDS": raw})
    assert log_interval({}) == 30.0 and log_interval({"FEWCLIP_PROGRESS_SECONDS": " 2.5 "}) == 2.5
