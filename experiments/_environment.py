"""The environment a run or benchmark records beside its numbers."""

import pathlib
import platform
import subprocess
from typing import Any

import jax


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def environment() -> dict[str, Any]:
    """What the numbers were computed with: versions, the git commit, the devices."""
    import importlib.metadata as metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in (
        "bilevax",
        "jax",
        "jaxlib",
        "numpy",
        "equinox",
        "lineax",
        "optimistix",
        "optax",
        "optuna",
        "scikit-learn",
        "jaxopt",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    devices = jax.devices()
    return {
        "versions": versions,
        "git": commit or None,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "devices": {
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "count": len(devices),
            "processes": jax.process_count(),
            "list": [str(d) for d in devices],
        },
        "x64": bool(jax.config.read("jax_enable_x64")),
    }
