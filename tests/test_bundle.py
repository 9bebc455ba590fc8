"""What `edgecc build` leaves for the board, and the HTML report."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from edgecc.bundle import write_board_files
from edgecc.check import assess


def test_run_py_reproduces_the_builds_predictions_from_the_bundle_alone(default_build, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    out, manifest, _ = default_build
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("run.py", "preprocess.py", "model.tflite", "manifest.json", "labels.txt", "requirements.txt"):
        shutil.copy(out / name, bundle / name)
    raw = load_digits().images[manifest["data"]["test_indices"]]
    np.save(tmp_path / "raw.npy", raw)
    result = subprocess.run([sys.executable, str(bundle / "run.py"), str(tmp_path / "raw.npy"), "--json"],
                            capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    import json

    predictions = json.loads(result.stdout)["predictions"]
    assert predictions == manifest["data"]["int8_test_predictions"]
    labels = (bundle / "labels.txt").read_text().splitlines()
    assert labels == manifest["preprocessing"]["label_names"]
    assert "ai-edge-litert" in (bundle / "requirements.txt").read_text()


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("src", "href"):
            if values.get(key) and not values[key].startswith("data:"):
                self.references.append(values[key])


def test_html_report_is_self_contained_with_its_plots(default_build) -> None:
    out, manifest, _ = default_build
    text = (out / "report.html").read_text()
    page = _Page()
    page.feed(text)
    assert page.references == []
    assert len(page.images) == 5  # accuracy vs size, confusion matrix, latency, memory, error per operator
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{manifest['metrics']['int8_accuracy']:.4f}" in text


def test_html_report_renders_in_headless_chromium(default_build, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'); the self-contained check above still ran")
    out, _, _ = default_build
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,1500",
         (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("target", "resolver_call"), [("stm32h7", "AddUnpack"), ("ethos-u55", "AddEthosU")])
def test_microcontroller_targets_get_firmware_sources(tiny_models, tmp_path: Path, target: str, resolver_call: str) -> None:
    content = tiny_models["vit_int8"].read_bytes()
    fit = assess(content, target)
    written = write_board_files(tmp_path, content, fit, [str(i) for i in range(10)])
    assert sorted(written) == ["main.cc", "model_data.cc", "model_data.h", "model_settings.h", "op_resolver.h"]
    assert resolver_call in (tmp_path / "op_resolver.h").read_text()
