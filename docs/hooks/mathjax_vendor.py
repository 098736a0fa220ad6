"""MkDocs hook: the site serves its own MathJax, so its maths renders with no CDN in reach.

MathJax 3.2.2 comes from the npm registry (the `mathjax` package, fetched with `npm pack`),
is checked against the sha512 the registry publishes for it, unpacked once into
`build/docs-vendor/` (git-ignored) and copied into `site/vendor/mathjax/` after every build;
`mkdocs.yml` loads it from there. Nothing is fetched when the site is read, and nothing large is
kept in the repository.

Without npm, put the tarball at `build/docs-vendor/mathjax-3.2.2.tgz` by any other means
(`npm pack mathjax@3.2.2` on another machine): it is checked against the same hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

from mkdocs.exceptions import PluginError


VERSION = "3.2.2"
# `npm view mathjax@3.2.2 dist.integrity`, less its "sha512-"
SHA512 = "Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
INTEGRITY = "sha512-" + SHA512
# The one combined component that `mkdocs.yml` loads, and the folders it loads more from on demand
# (TeX extensions through autoload, fonts, the menu's accessibility and speech parts).
ENTRY = "tex-mml-chtml.js"
FOLDERS = ("a11y", "input", "output", "sre", "ui")
SITE_PATH = "vendor/mathjax"

_unpacked: pathlib.Path | None = None


def _integrity(path: pathlib.Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _npm_pack(dest: pathlib.Path) -> pathlib.Path:
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(
            f"MathJax {VERSION} is not in {dest} and npm is not installed to fetch it from the "
            "npm registry: install Node.js and npm (`apt-get install -y npm`), or put "
            f"mathjax-{VERSION}.tgz (`npm pack mathjax@{VERSION}`) into {dest}."
        )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [npm, "pack", f"mathjax@{VERSION}", "--json", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        if proc.returncode != 0:
            raise PluginError(f"`npm pack mathjax@{VERSION}` failed:\n{proc.stderr}")
        (packed,) = json.loads(proc.stdout)
        tgz = dest / f"mathjax-{VERSION}.tgz"
        shutil.move(pathlib.Path(tmp) / packed["filename"], tgz)
    return tgz


def _ensure(root: pathlib.Path) -> pathlib.Path:
    """The unpacked `es5/` folder of MathJax, fetched and checked if it is not there yet."""
    dest = root / "build" / "docs-vendor"
    unpacked = dest / f"mathjax-{VERSION}"
    if (unpacked / ENTRY).is_file():
        return unpacked
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / f"mathjax-{VERSION}.tgz"
    if not tgz.is_file():
        tgz = _npm_pack(dest)
    got = _integrity(tgz)
    if got != INTEGRITY:
        tgz.unlink()
        raise PluginError(f"{tgz.name}: integrity {got} is not the registry's {INTEGRITY}")
    staging = dest / f"mathjax-{VERSION}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(tgz) as tar:
        # The tarball is checked above; the data filter (Python >= 3.11.4) is a second guard.
        tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        es5 = pathlib.Path(tmp) / "package" / "es5"
        staging.mkdir()
        shutil.copy2(es5 / ENTRY, staging / ENTRY)
        shutil.copy2(pathlib.Path(tmp) / "package" / "LICENSE", staging / "LICENSE")
        for folder in FOLDERS:
            shutil.copytree(es5 / folder, staging / folder)
    shutil.rmtree(unpacked, ignore_errors=True)
    staging.rename(unpacked)
    return unpacked


def on_config(config, **kwargs):
    global _unpacked
    _unpacked = _ensure(pathlib.Path(config.config_file_path).resolve().parent)
    return config


def on_post_build(config, **kwargs):
    assert _unpacked is not None
    shutil.copytree(_unpacked, pathlib.Path(config.site_dir) / SITE_PATH, dirs_exist_ok=True)
