"""Developer tool: screenshot pages of the built site and check they really rendered.

    python docs/dev/screenshot_site.py HTML_DIR [PAGE ...] [--out DIR]

    python docs/dev/screenshot_site.py _build/site-cpu/_build/html \\
        index.html notebooks/02_single_site_baseline.html --out _build/screenshots

For each page (a path relative to ``HTML_DIR``; default ``index.html``) it runs a
headless Chromium (``chromium --headless --no-sandbox --disable-gpu
--screenshot=OUT.png --window-size=1280,2000 file://...``) and then checks the PNG:
it must decode, have the requested size, and not be blank (grey-level standard deviation
and the share of pixels that differ from the background colour above thresholds). A
blank or broken page exits with status 1 and says which check failed.

``make screenshot`` runs it on the site built by ``make book`` and writes
``_build/screenshots/*.png``. The browser is ``--browser``, else ``$CHROMIUM``, else the
first of chromium, chromium-browser, google-chrome, google-chrome-stable on ``PATH``.
The checker (:func:`check_png`) needs no browser and is unit-tested on synthetic images
(``tests/test_screenshot_tool.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BROWSERS",
    "ScreenshotCheck",
    "ScreenshotError",
    "browser_command",
    "check_png",
    "find_browser",
    "main",
    "page_url",
    "resolve_redirect",
    "screenshot_name",
    "take_screenshot",
]

#: Browser executables tried in this order when none is given.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: A grey level this far from the background colour counts as "ink".
INK_DELTA = 16
# jupyter-book's top-level index.html is only `<meta http-equiv="Refresh" ...>`; headless
# Chromium never finishes a screenshot of such a page, so redirects are followed here.
_REFRESH_RE = re.compile(
    r"""<meta[^>]+http-equiv=["']?refresh["']?[^>]+content=["']?\s*\d+\s*;\s*"""
    r"""url=([^"'>\s]+)""",
    re.IGNORECASE,
)


class ScreenshotError(RuntimeError):
    """No browser, a missing page, or a browser run that produced no image."""


@dataclass
class ScreenshotCheck:
    """What :func:`check_png` measured on one image, and what is wrong with it."""

    path: Path
    width: int = 0
    height: int = 0
    std: float = 0.0
    ink_fraction: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the image passed every check."""
        return not self.problems

    def summary(self) -> str:
        """One line: size, grey-level spread, share of ink, and the problems if any."""
        head = (
            f"{self.width}x{self.height}, std {self.std:.1f}, "
            f"ink {100 * self.ink_fraction:.2f} %"
        )
        return head if self.ok else f"{head}: " + "; ".join(self.problems)


def check_png(
    path: str | Path,
    expected_size: tuple[int, int] | None = None,
    min_std: float = 5.0,
    min_ink: float = 0.002,
) -> ScreenshotCheck:
    """Check that ``path`` is a PNG of a real rendering, not a blank or broken page.

    Args:
        path: the image file.
        expected_size: ``(width, height)`` it must have, or None to accept any size.
        min_std: minimum standard deviation of the grey levels (0-255); a blank page
            has 0.
        min_ink: minimum share of pixels whose grey level differs from the background
            (the most common grey level) by more than :data:`INK_DELTA`.

    Returns:
        A :class:`ScreenshotCheck`; ``check.ok`` is False and ``check.problems`` says
        why when the image fails.
    """
    import numpy as np

    path = Path(path)
    check = ScreenshotCheck(path=path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        check.problems.append(f"cannot read {path} ({exc})")
        return check
    if not data.startswith(PNG_SIGNATURE):
        check.problems.append(f"{path} is not a PNG file (wrong signature)")
        return check
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow comes with matplotlib
        raise ScreenshotError(
            "Pillow is needed to decode the screenshots; install the project "
            "(`make install`) or `pip install pillow`"
        ) from exc
    try:
        with Image.open(path) as img:
            img.load()
            check.width, check.height = img.size
            grey = np.asarray(img.convert("L"), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a broken image
        check.problems.append(f"{path} does not decode as an image ({exc})")
        return check
    if expected_size is not None and (check.width, check.height) != tuple(
        expected_size
    ):
        check.problems.append(
            f"size {check.width}x{check.height}, expected "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    if grey.size == 0:
        check.problems.append("empty image")
        return check
    check.std = float(grey.std())
    background = int(np.bincount(grey.astype(np.uint8).ravel(), minlength=256).argmax())
    check.ink_fraction = float((np.abs(grey - background) > INK_DELTA).mean())
    if check.std < min_std:
        check.problems.append(
            f"blank: grey-level std {check.std:.2f} is below {min_std}"
        )
    if check.ink_fraction < min_ink:
        check.problems.append(
            f"almost empty: {100 * check.ink_fraction:.3f} % of the pixels differ from "
            f"the background, fewer than {100 * min_ink:.2f} %"
        )
    return check


def find_browser(explicit: str | None = None) -> str:
    """The headless browser to use (path or name on ``PATH``).

    Raises:
        ScreenshotError: none found (the message says how to install one).
    """
    candidates = [explicit] if explicit else []
    if not explicit and os.environ.get("CHROMIUM"):
        candidates.append(os.environ["CHROMIUM"])
    if not candidates:
        candidates = list(BROWSERS)
    for name in candidates:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    raise ScreenshotError(
        f"no headless browser found (tried {', '.join(candidates)}); install one, e.g. "
        "`apt-get install -y chromium` on Debian (`make screenshot` does this), or "
        "pass --browser PATH"
    )


def page_url(html_dir: str | Path, page: str) -> str:
    """The ``file://`` URL of ``page`` inside ``html_dir``.

    Raises:
        ScreenshotError: the page does not exist.
    """
    path = (Path(html_dir) / page).resolve()
    if not path.is_file():
        raise ScreenshotError(
            f"{path} does not exist; build the site first (`make book`) or name a page "
            f"relative to {html_dir}"
        )
    return path.as_uri()


def resolve_redirect(html_dir: str | Path, page: str, max_hops: int = 5) -> str:
    """Follow ``<meta http-equiv="Refresh">`` redirects between local pages.

    Returns:
        The page (relative to ``html_dir``) that is finally shown; ``page`` itself when
        it does not redirect or redirects outside ``html_dir``.
    """
    root = Path(html_dir).resolve()
    current = page
    for _ in range(max_hops):
        path = (root / current).resolve()
        if not path.is_file():
            return current
        m = _REFRESH_RE.search(path.read_text(errors="replace")[:4096])
        if m is None or re.match(r"^[a-z]+:", m.group(1)):
            return current
        target = (path.parent / m.group(1).split("#")[0]).resolve()
        try:
            current = target.relative_to(root).as_posix()
        except ValueError:
            return current
    return current


def screenshot_name(page: str) -> str:
    """File name of a page's screenshot: ``notebooks/02_x.html`` -> ``notebooks__02_x.png``."""
    stem = page[:-5] if page.endswith(".html") else page
    return stem.strip("/").replace("/", "__") + ".png"


def browser_command(
    browser: str,
    url: str,
    out_png: str | Path,
    width: int = 1280,
    height: int = 2000,
    user_data_dir: str | Path | None = None,
) -> list[str]:
    """The headless-browser command line that writes a screenshot of ``url``."""
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",  # needed as root and in containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--no-default-browser-check",
        f"--screenshot={out_png}",
        f"--window-size={width},{height}",
    ]
    if user_data_dir is not None:
        cmd.append(f"--user-data-dir={user_data_dir}")
    cmd.append(url)
    return cmd


def take_screenshot(
    browser: str,
    url: str,
    out_png: str | Path,
    width: int = 1280,
    height: int = 2000,
    timeout: float = 120.0,
) -> Path:
    """Run the browser once and return the PNG it wrote.

    Raises:
        ScreenshotError: the browser failed, timed out or wrote no file.
    """
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="medlora-chromium-") as profile:
        cmd = browser_command(browser, url, out_png, width, height, profile)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ScreenshotError(
                f"{Path(browser).name} did not finish within {timeout:.0f} s for {url}"
            ) from exc
    if proc.returncode != 0 or not out_png.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-8:]
        raise ScreenshotError(
            f"{Path(browser).name} exited with status {proc.returncode} and "
            f"{'wrote' if out_png.is_file() else 'did not write'} {out_png}:\n  "
            + "\n  ".join(tail)
        )
    return out_png


def main(argv: list[str] | None = None) -> int:
    """Command line: screenshot each page and check it; exit 1 if any page fails."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html_dir", type=Path, help="the built site's HTML folder")
    ap.add_argument(
        "pages",
        nargs="*",
        default=["index.html"],
        help="pages relative to HTML_DIR (default: index.html)",
    )
    ap.add_argument("--out", type=Path, default=Path("_build/screenshots"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--browser", default=None, help="browser executable")
    ap.add_argument("--min-std", type=float, default=5.0)
    ap.add_argument("--min-ink", type=float, default=0.002)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    try:
        browser = find_browser(args.browser)
        urls = []
        for page in args.pages:
            shown = resolve_redirect(args.html_dir, page)
            if shown != page:
                print(f"{page} redirects to {shown}")
            urls.append((page, page_url(args.html_dir, shown)))
    except ScreenshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for page, url in urls:
        out = args.out / screenshot_name(page)
        try:
            take_screenshot(browser, url, out, args.width, args.height, args.timeout)
        except ScreenshotError as exc:
            print(f"FAIL {page}: {exc}")
            failed += 1
            continue
        check = check_png(out, (args.width, args.height), args.min_std, args.min_ink)
        print(f"{'ok  ' if check.ok else 'FAIL'} {page} -> {out} ({check.summary()})")
        failed += not check.ok
    if failed:
        print(f"{failed} of {len(urls)} page(s) failed the screenshot check")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
