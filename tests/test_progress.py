"""Progress bars of long work: shown on a terminal, silent otherwise or when switched off."""

import io

import pytest
import torch

import offloadkit.progress as progress
from offloadkit.runtime import disk_store


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def stderr(monkeypatch):
    stream = Terminal()
    monkeypatch.setattr(progress, "_stream", lambda: stream)
    monkeypatch.setattr(progress, "enabled", None)
    monkeypatch.delenv("OFFLOADKIT_PROGRESS", raising=False)
    return stream


def test_the_synthesis_search_counts_the_policies_it_predicts(stderr):
    import offloadkit
    from offloadkit.testing import tiny_pipeline

    result = offloadkit.synthesize(tiny_pipeline("sd"), budget="64MiB", device="cpu")
    shown = stderr.getvalue()
    assert "searching policies" in shown
    assert f"{result.candidates} policies" in shown and f"{result.fitting} fit" in shown


def test_disk_writes_show_bytes_when_large(stderr, tmp_path, monkeypatch):
    disk_store.store("small", {"w": torch.zeros(256)}, tmp_path)
    assert stderr.getvalue() == ""  # under the threshold: nothing
    monkeypatch.setattr(disk_store, "PROGRESS_FROM", 1)
    disk_store.store("unet", {"w": torch.zeros(1000, 1000)}, tmp_path)
    assert "writing unet-" in stderr.getvalue()


def test_calibrate_shows_its_steps(stderr, tmp_path):
    from offloadkit.prediction.calibrate import calibrate

    calibrate("cpu", quick=True, folder=tmp_path)
    assert "calibrating" in stderr.getvalue() and "4/4" in stderr.getvalue()


@pytest.mark.parametrize("switch", ["environment", "code", "not a terminal"])
def test_progress_is_silent_when_switched_off_or_not_on_a_terminal(stderr, monkeypatch, switch, tmp_path):
    if switch == "environment":
        monkeypatch.setenv("OFFLOADKIT_PROGRESS", "0")
    elif switch == "code":
        monkeypatch.setattr(progress, "enabled", False)
    else:
        stderr = io.StringIO()
        monkeypatch.setattr(progress, "_stream", lambda: stderr)
    monkeypatch.setattr(disk_store, "PROGRESS_FROM", 1)
    disk_store.store("unet", {"w": torch.zeros(1000, 1000)}, tmp_path)
    assert stderr.getvalue() == ""
