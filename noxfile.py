"""Sessions a user and CI run: `nox -s demo`, `nox -s tests`, `nox -s slow`, `nox -s lint`, ..."""

import os
import pathlib

import nox


nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint"]
# A second `nox -s tests` reuses its environment (as `nox -r` does): `uv pip install` then only
# checks what is there. `nox --no-reuse-existing-virtualenvs` starts afresh.
nox.options.reuse_existing_virtualenvs = True

ROOT = pathlib.Path(__file__).parent
CONTRACT = ROOT.parent / "shared" / "contract"
CPU_ENV = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def _pytest(session: nox.Session, *args: str) -> None:
    """pytest on every core (pytest-xdist), with one persistent compilation cache that the
    workers and the tests' subprocesses share: tests that build the same problem compile it
    once. The cache lives in the session's environment, so a repeat run reuses it; it is keyed
    by the program and the versions, so it is never stale."""
    env = dict(
        CPU_ENV,
        JAX_COMPILATION_CACHE_DIR=str(pathlib.Path(session.virtualenv.location) / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    # pytest exits 5 when it collects no test; that must fail the session, never pass.
    session.run("pytest", "-n", "auto", "--dist", "loadfile", *args, *session.posargs, env=env)


def _with_contract(session: nox.Session, *paths: str) -> list[str]:
    """`paths` and the shared contract tests (`../shared/contract`) where they are."""
    if CONTRACT.is_dir():
        return [*paths, str(CONTRACT)]
    session.warn(f"{CONTRACT} not found: running the project's own tests only.")
    return list(paths)


@nox.session
def tests(session: nox.Session) -> None:
    """The default test suite (`tests/core`, the library's; `tests/experiments`, the
    experiments' and the documentation's) and the shared contract tests (`../shared/contract`)."""
    session.install("-e", ".[test,experiments]")
    # The slowest tests are printed, so that a slow one is seen and marked `slow`.
    _pytest(session, "-q", "-ra", "--durations=15", *_with_contract(session, "tests"))


@nox.session(python="3.11")
def lowest(session: nox.Session) -> None:
    """The library's tests (`tests/core`) against the lower bounds in `pyproject.toml` (uv's
    lowest-direct resolution), so that the floors there are true."""
    if session.venv_backend != "uv":
        session.skip("the lowest-direct resolution needs nox's uv backend (`pip install uv`).")
    session.install("--resolution", "lowest-direct", "-e", ".[test]")
    session.run(
        "python",
        "-c",
        "import jax, equinox, lineax, optimistix, optax, numpy; "
        "print('lowest:', 'jax', jax.__version__, 'equinox', equinox.__version__, "
        "'lineax', lineax.__version__, 'optimistix', optimistix.__version__, "
        "'optax', optax.__version__, 'numpy', numpy.__version__)",
    )
    _pytest(session, "-q", "-ra", *_with_contract(session, "tests/core"))


@nox.session
def slow(session: nox.Session) -> None:
    """Tests marked `@pytest.mark.slow`: the experiments' `--quick` runs with accuracy targets,
    multi-device runs and the slowest variants of the library's tests."""
    session.install("-e", ".[test,experiments]")
    _pytest(session, "-q", "-ra", "-m", "slow", "tests")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff format --check and ruff check."""
    session.install("ruff>=0.6")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """pyright on the library."""
    session.install("-e", ".[dev]")
    session.run("pyright", "bilevax")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation in strict mode, then open it in headless Chromium: no raw TeX.

    The site serves its own MathJax, which the build takes from the npm registry with `npm pack`
    the first time (`docs/hooks/mathjax_vendor.py`; cached in `build/docs-vendor/`). The browser
    check (`.ci/check_docs_render.py`, arguments after `--` go to it) cuts off every host but
    127.0.0.1 and fails on maths left as TeX; it is skipped, saying so, where no Chromium is
    installed (`apt-get install -y chromium`)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict")
    session.run(
        "python", ".ci/check_docs_render.py", "site", "--skip-if-no-browser", *session.posargs
    )


@nox.session(venv_params=["--system-site-packages"])
def bench(session: nox.Session) -> None:
    """Benchmarks against peers (`experiments/benchmarks/`); pass `-- --full` for full size.

    The PyTorch peers (torch, torchopt: the `bench` extra) are not installed here: from PyPI
    `torch` is the CUDA build, gigabytes. The session's environment sees the system's
    site-packages instead, so a PyTorch installed there (e.g. the CPU-only wheel from PyTorch's
    CPU package index, then `pip install torchopt`) is used; without one, `against_torch`
    prints "skipped: torch not installed"."""
    session.install("-e", ".[test,experiments]")
    quick = [] if "--full" in session.posargs else ["--quick"]
    session.run("python", "-m", "experiments.benchmarks", *quick, env=CPU_ENV)


@nox.session
def demo(session: nox.Session) -> None:
    """The main demo: per-feature L2 hyperparameter optimisation for ridge regression."""
    session.install("-e", ".[experiments]")
    session.run("python", "-m", "experiments.ridge_l2", *(session.posargs or ["--quick"]))
