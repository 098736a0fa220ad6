"""Open the built documentation in headless Chromium and fail on maths left as raw TeX.

    python .ci/check_docs_render.py [SITE_DIR] [--skip-if-no-browser]

Serves SITE_DIR (default `site/`) on 127.0.0.1, loads every page whose HTML holds maths
(pymdownx.arithmatex's `class="arithmatex"`) in headless Chromium with every other host made
unresolvable, so that a page depending on a CDN fails here as it would for an offline reader,
and reads back the DOM after the page's scripts have run. A page fails when:

- its visible text still holds a TeX delimiter, `\\(`, `\\[` or `$$`;
- an arithmatex element holds no rendered maths (`mjx-container`);
- MathJax reported a TeX error (`mjx-merror`) or an undefined macro (shown as red `\\name`).

`docs/delta-stn.md` and `docs/math.md` must be among the pages with maths. The site's HTML and
CSS must also load nothing from another host (`src=`, `href=` of a stylesheet or script,
`url(...)`). Chromium: `$CHROMIUM`, else the first of chromium, chromium-browser,
google-chrome on PATH (Debian: `apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading


PAGES_WITH_MATHS = ("delta-stn/index.html", "math/index.html")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RAW_TEX = re.compile(r"\\\(|\\\[|\$\$")
HIDDEN = {"script", "style", "noscript", "template", "head", "title"}
VOID = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
    "track", "wbr",
}  # fmt: skip
EXTERNAL = re.compile(
    r"""<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc=["']?(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref=["']?(?:https?:)?//[^>]*>"""
    r"""|@import\s+(?:url\()?["']?(?:https?:)?//"""
    r"""|url\(["']?(?:https?:)?//""",
    re.IGNORECASE,
)


def find_browser() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next(filter(None, map(shutil.which, BROWSERS)), None)


class _Dom(html.parser.HTMLParser):
    """Visible text, arithmatex elements and whether each holds rendered maths."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.hidden = 0
        self.text: list[str] = []
        self.maths: list[dict] = []  # one per arithmatex element: {"depth", "rendered", "tex"}
        self.open_maths: list[dict] = []
        self.errors: list[str] = []
        self.red_depth = 0  # depth of the innermost red mtext: MathJax's undefined macro

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            return
        attrs = dict(attrs)
        self.stack.append(tag)
        if tag in HIDDEN:
            self.hidden += 1
        if "arithmatex" in (attrs.get("class") or "").split():
            item = {"depth": len(self.stack), "rendered": False, "tex": []}
            self.maths.append(item)
            self.open_maths.append(item)
        if tag == "mjx-container":
            for item in self.open_maths:
                item["rendered"] = True
        if tag == "mjx-merror" or "data-mjx-error" in attrs:
            self.errors.append(attrs.get("data-mjx-error") or "TeX error")
        # noundefined typesets `\\foo` in red: glyphs in the CHTML, text in the assistive MathML.
        if tag == "mjx-mtext" and "color: red" in (attrs.get("style") or ""):
            self.errors.append("undefined macro (red text)")
        if tag == "mtext" and attrs.get("mathcolor") == "red":
            self.red_depth = len(self.stack)

    def handle_endtag(self, tag):
        if tag in VOID or tag not in self.stack:
            return
        while self.stack:
            top = self.stack.pop()
            if top in HIDDEN:
                self.hidden -= 1
            if self.red_depth > len(self.stack):
                self.red_depth = 0
            while self.open_maths and self.open_maths[-1]["depth"] > len(self.stack):
                self.open_maths.pop()
            if top == tag:
                break

    def handle_data(self, data):
        if self.hidden:
            return
        self.text.append(data)
        if self.red_depth and data.lstrip().startswith("\\"):
            self.errors.append(f"undefined macro {data.strip()}")
        for item in self.open_maths:
            item["tex"].append(data)


def dump_dom(browser: str, url: str, budget_ms: int) -> str:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            # Every host but this one is unreachable: a CDN script fails as it would offline.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise RuntimeError(f"{browser} failed on {url} (exit {proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def check_page(browser: str, base: str, page: str, budget_ms: int) -> tuple[dict, list[str]]:
    dom = _Dom()
    dom.feed(dump_dom(browser, base + page.removesuffix("index.html"), budget_ms))
    text = "".join(dom.text)
    raw = [m.start() for m in RAW_TEX.finditer(text)]
    unrendered = [item for item in dom.maths if not item["rendered"]]
    stats = {
        "maths": len(dom.maths),
        "rendered": len(dom.maths) - len(unrendered),
        "raw_tex": len(raw),
        "tex_errors": len(set(dom.errors)),
    }
    problems = []
    if not dom.maths:
        problems.append("no arithmatex element in the rendered DOM")
    for pos in raw[:5]:
        problems.append(f"raw TeX in visible text: ...{text[max(0, pos - 40) : pos + 60]!r}...")
    for item in unrendered[:5]:
        problems.append(f"maths not rendered: {''.join(item['tex'])[:100]!r}")
    for error in sorted(set(dom.errors))[:5]:
        problems.append(f"MathJax: {error}")
    return stats, problems


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="site", type=pathlib.Path)
    parser.add_argument("--skip-if-no-browser", action="store_true")
    parser.add_argument("--budget-ms", type=int, default=15000, help="virtual time per page")
    parser.add_argument("--page", action="append", help="open only this page (repeatable)")
    args = parser.parse_args(argv)
    site: pathlib.Path = args.site.resolve()
    if not (site / "index.html").is_file():
        print(f"{site}/index.html not found: build the site first (mkdocs build).")
        return 2

    failures: list[str] = []
    for path in sorted(site.rglob("*")):
        if path.suffix in {".html", ".css"} and "vendor" not in path.relative_to(site).parts:
            for m in EXTERNAL.finditer(path.read_text(errors="replace")):
                failures.append(f"{path.relative_to(site)}: loads from another host: {m[0]!r}")

    pages = sorted(
        str(p.relative_to(site))
        for p in site.rglob("index.html")
        if 'class="arithmatex"' in p.read_text(errors="replace")
    )
    failures += [f"{p}: no maths in the built page" for p in PAGES_WITH_MATHS if p not in pages]
    if args.page:
        pages = [p for p in pages if p in args.page]

    browser = find_browser()
    if browser is None:
        msg = (
            "no Chromium found (tried $CHROMIUM, " + ", ".join(BROWSERS) + "): the pages were not "
            "opened in a browser. Install it with `apt-get install -y chromium` (Debian) and rerun."
        )
        if args.skip_if_no_browser and not failures:
            print("SKIPPED browser check: " + msg)
            return 0
        failures.append(msg)
    else:
        handler = functools.partial(_QuietHandler, directory=str(site))
        with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            base = f"http://127.0.0.1:{server.server_address[1]}/"
            for page in pages:
                stats, problems = check_page(browser, base, page, args.budget_ms)
                summary = ", ".join(f"{k} {v}" for k, v in stats.items())
                print(f"{'FAIL' if problems else 'ok  '} {page}: {summary}")
                failures += [f"{page}: {p}" for p in problems]
            server.shutdown()

    if failures:
        print(f"\n{len(failures)} problem(s):", *failures, sep="\n  ")
        return 1
    print(f"{len(pages)} page(s) with maths rendered in {browser}: no raw TeX left.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
