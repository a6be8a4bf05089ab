"""Headless Chromium for the report page: find it, load a page with no network, and return the
DOM after the page's scripts ran (and, if asked, a screenshot). The browser test and
``make screenshot`` use it; gradcouple itself never needs a browser.

    python -m gradcouple.stages.report.browser runs/demo/report/index.html --screenshot docs/report.png
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

INSTALL_HINT = "apt-get install -y chromium"
NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0")
SELFTEST = re.compile(r'<pre id="selftest"[^>]*>(.*?)</pre>', re.S)


def find_chromium() -> Optional[str]:
    """Path of a Chromium binary: ``$GRADCOUPLE_CHROMIUM``, else the first of :data:`NAMES` on PATH; None when absent."""
    named = os.environ.get("GRADCOUPLE_CHROMIUM")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    return next((p for p in map(shutil.which, NAMES) if p), None)


@dataclass
class Rendered:
    """What a headless load gave: the DOM after the scripts ran, the console lines Chromium
    logged (``...:CONSOLE...`` on stderr, uncaught errors included), the page's self-check result
    (the JSON of ``<pre id="selftest">``, None when absent or empty) and the wall time in seconds."""

    dom: str
    console: list[str] = field(default_factory=list)
    selftest: Optional[dict] = None
    seconds: float = 0.0


def render_page(page: str | Path, *, fragment: str = "", screenshot: Optional[str | Path] = None,
                size: tuple[int, int] = (1280, 2000), budget_ms: int = 20000, timeout: float = 180,
                chromium: Optional[str] = None) -> Rendered:
    """Load ``page`` (its file URL plus ``#fragment``) in headless Chromium with every host
    unresolvable, give its scripts ``budget_ms`` of virtual time, and return the DOM; with
    ``screenshot``, also write a PNG of the top ``size`` (width, height) pixels there.

    Chromium runs with a throwaway profile and HOME, so nothing is written outside a temporary
    directory (and ``screenshot``).

    Raises:
        FileNotFoundError: no Chromium (:func:`find_chromium`); the message gives the install command.
        RuntimeError: Chromium exited with an error (the message holds its last stderr lines).
        subprocess.TimeoutExpired: it ran longer than ``timeout`` seconds.
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError(f"headless Chromium not found (tried {', '.join(NAMES)}); install it: {INSTALL_HINT}")
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradcouple-chromium-") as home:
        cmd = [exe, *FLAGS, f"--user-data-dir={home}/profile", f"--virtual-time-budget={budget_ms}",
               f"--window-size={size[0]},{size[1]}", "--dump-dom"]
        if screenshot is not None:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            cmd.append(f"--screenshot={Path(screenshot).resolve()}")
        env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": f"{home}/config", "XDG_CACHE_HOME": f"{home}/cache"}
        proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"{exe} exited with status {proc.returncode}:\n{tail}")
    m = SELFTEST.search(proc.stdout)
    result = json.loads(html.unescape(m.group(1))) if m and m.group(1).strip() else None
    return Rendered(dom=proc.stdout, console=[line for line in proc.stderr.splitlines() if ":CONSOLE" in line],
                    selftest=result, seconds=time.perf_counter() - t0)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m gradcouple.stages.report.browser PAGE [--screenshot PNG] [--size WxH] [--selftest]``."""
    ap = argparse.ArgumentParser(prog="python -m gradcouple.stages.report.browser", description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("--screenshot", type=Path, help="write a PNG of the top of the page here")
    ap.add_argument("--size", default="1280x2000", help="window width x height in pixels (default 1280x2000)")
    ap.add_argument("--selftest", action="store_true", help="run the page's self-check and print its JSON result")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    try:
        res = render_page(args.page, fragment="selftest" if args.selftest else "", screenshot=args.screenshot, size=(w, h))
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.selftest:
        print(json.dumps(res.selftest, indent=2))
    if args.screenshot:
        print(args.screenshot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
