"""The screenshot checker of docs/dev/screenshot_site.py, on synthetic images.

No browser is started: blank, near-blank, wrong-size and non-PNG images must be
rejected, a page-like rendering accepted; redirects and the command line are checked
as data.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIZE = (320, 500)  # (width, height): small keeps the test fast


@pytest.fixture(scope="module")
def tool():
    path = ROOT / "docs" / "dev" / "screenshot_site.py"
    spec = importlib.util.spec_from_file_location("screenshot_site", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations via sys.modules
    spec.loader.exec_module(module)
    return module


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _page_like(width: int, height: int) -> np.ndarray:
    """White page, blue header bar, grey sidebar and lines of dark "text"."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    img[:40] = (31, 78, 121)  # header
    img[40:, : width // 5] = (245, 245, 245)  # sidebar
    rng = np.random.default_rng(0)
    for y in range(60, height - 20, 18):
        x0 = width // 5 + 10
        x1 = int(rng.integers(x0 + 60, width - 10))
        img[y : y + 8, x0:x1] = (40, 40, 40)  # one line of text
    return img


def test_rendered_page_is_accepted(tool, tmp_path):
    path = _png(tmp_path / "page.png", _page_like(*SIZE))
    check = tool.check_png(path, expected_size=SIZE)
    assert check.ok, check.problems
    assert (check.width, check.height) == SIZE
    assert check.std > 20 and 0.05 < check.ink_fraction < 0.9


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (200, 220, 240)])
def test_blank_image_is_rejected(tool, tmp_path, colour):
    pixels = np.empty((SIZE[1], SIZE[0], 3))
    pixels[:] = colour
    check = tool.check_png(_png(tmp_path / "blank.png", pixels), expected_size=SIZE)
    assert not check.ok
    assert check.std == pytest.approx(0.0)
    assert any(p.startswith("blank") for p in check.problems)


def test_a_few_stray_pixels_are_still_blank(tool, tmp_path):
    pixels = np.full((SIZE[1], SIZE[0]), 255)
    pixels[10:14, 10:14] = 0  # 16 dark pixels: a favicon, not a page
    check = tool.check_png(_png(tmp_path / "dot.png", pixels), expected_size=SIZE)
    assert not check.ok
    assert check.ink_fraction == pytest.approx(16 / (SIZE[0] * SIZE[1]))
    assert any("almost empty" in p for p in check.problems)


def test_wrong_size_is_rejected(tool, tmp_path):
    path = _png(tmp_path / "small.png", _page_like(200, 300))
    check = tool.check_png(path, expected_size=SIZE)
    assert not check.ok
    assert check.problems == ["size 200x300, expected 320x500"]
    assert tool.check_png(path).ok  # any size accepted when none is expected


def test_not_a_png_is_rejected(tool, tmp_path):
    path = tmp_path / "fake.png"
    path.write_bytes(b"<html>not an image</html>")
    assert "not a PNG" in tool.check_png(path).problems[0]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(tool.PNG_SIGNATURE + b"\x00" * 20)
    assert "does not decode" in tool.check_png(truncated).problems[0]
    assert "cannot read" in tool.check_png(tmp_path / "missing.png").problems[0]


def test_redirect_pages_are_followed(tool, tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "index.html").write_text("<html><body>page</body></html>")
    (tmp_path / "index.html").write_text(
        '<meta http-equiv="Refresh" content="0; url=book/index.html" />\n'
    )
    (tmp_path / "away.html").write_text(
        '<meta http-equiv="refresh" content="0; url=https://example.org/" />'
    )
    assert tool.resolve_redirect(tmp_path, "index.html") == "book/index.html"
    assert tool.resolve_redirect(tmp_path, "book/index.html") == "book/index.html"
    assert tool.resolve_redirect(tmp_path, "away.html") == "away.html"


def test_browser_command_and_names(tool, tmp_path):
    page = tmp_path / "index.html"
    page.write_text("<html></html>")
    url = tool.page_url(tmp_path, "index.html")
    assert url.startswith("file://") and url.endswith("/index.html")
    cmd = tool.browser_command("chromium", url, tmp_path / "o.png", 1280, 2000)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,2000",
    ):
        assert flag in cmd
    assert f"--screenshot={tmp_path / 'o.png'}" in cmd and cmd[-1] == url
    assert (
        tool.screenshot_name("notebooks/02_single_site_baseline.html")
        == "notebooks__02_single_site_baseline.png"
    )
    with pytest.raises(tool.ScreenshotError, match="does not exist"):
        tool.page_url(tmp_path, "nope.html")
    with pytest.raises(tool.ScreenshotError, match="no headless browser"):
        tool.find_browser(str(tmp_path / "no-such-browser"))
