"""Sessions a user and CI run: `nox -s demo`, `nox -s tests`, `nox -s slow`, `nox -s lint`, ..."""

import os
import pathlib
import shutil
import sys

import nox


nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint"]
# A second run reuses its environment (as `nox -r` does): `uv pip install` then only checks what
# is there. `nox --no-reuse-existing-virtualenvs` starts `lint`, `lowest` and `bench` afresh;
# deleting `.nox/shared` does the same for the shared environment (below).
nox.options.reuse_existing_virtualenvs = True

ROOT = pathlib.Path(__file__).parent
CONTRACT = ROOT.parent / "shared" / "contract"
CPU_ENV = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
# One environment, with every extra but the PyTorch peers, for the sessions that need the JAX
# stack (demo, tests, slow, long, docs, typecheck): nox would build one per session, each a
# near-identical copy of JAX (4 GB for six). `lint` (ruff alone), `lowest` (other versions) and
# `bench` (the system's PyTorch) keep their own.
SHARED_ENV = ROOT / ".nox" / "shared"
SHARED_EXTRAS = "test,experiments,docs,dev,flax"


def _shared(program: str) -> str:
    """The path of `program` in the shared environment (nox looks programs up on its own
    `PATH`, not on the one a command is given)."""
    return str(SHARED_ENV / "bin" / program)


def _shared_env(session: nox.Session) -> dict[str, str]:
    """Creates or updates the shared environment (`.nox/shared`), and returns the variables
    that run a command in it: its `bin/` first on `PATH`, and `VIRTUAL_ENV` (which pyright
    reads). With uv on `PATH` (`pip install uv`) it is built by uv, else by venv and pip."""
    python = _shared("python")
    install = ["-e", f".[{SHARED_EXTRAS}]"]
    if shutil.which("uv"):
        if not os.path.exists(python):
            session.run_install("uv", "venv", "--python", sys.executable, str(SHARED_ENV))
        session.run_install("uv", "pip", "install", "--python", python, *install)
    else:
        session.warn("uv not found (`pip install uv`): building the environment with pip.")
        if not os.path.exists(python):
            session.run_install(sys.executable, "-m", "venv", str(SHARED_ENV))
        session.run_install(python, "-m", "pip", "install", "--quiet", *install)
    path = os.pathsep.join([str(SHARED_ENV / "bin"), os.environ.get("PATH", "")])
    return {"PATH": path, "VIRTUAL_ENV": str(SHARED_ENV)}


def _pytest(session: nox.Session, *args: str) -> None:
    """pytest on every core (pytest-xdist), in the shared environment, with one persistent
    compilation cache that every session, worker and test subprocess shares: tests that build
    the same problem compile it once, and `nox -s slow` reuses what `nox -s tests` compiled.
    The cache is keyed by the program and the versions, so it is never stale. A test that
    hangs fails after `--timeout` seconds (pytest-timeout), with its traceback, instead of
    stalling the session; `tests/conftest.py` keeps each worker under Linux's limit of memory
    maps, which a long session once reached (the worker died inside XLA)."""
    env = dict(
        _shared_env(session),
        **CPU_ENV,
        JAX_COMPILATION_CACHE_DIR=str(SHARED_ENV / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    # pytest exits 5 when it collects no test; that must fail the session, never pass.
    session.run(
        _shared("pytest"), "-n", "auto", "--dist", "loadfile", *args, *session.posargs, env=env
    )


def _with_contract(session: nox.Session, *paths: str) -> list[str]:
    """`paths` and the shared contract tests (`../shared/contract`) where they are."""
    if CONTRACT.is_dir():
        return [*paths, str(CONTRACT)]
    session.warn(f"{CONTRACT} not found: running the project's own tests only.")
    return list(paths)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The default test suite (`tests/core`, the library's; `tests/experiments`, the
    experiments' and the documentation's) and the shared contract tests (`../shared/contract`)."""
    # The slowest tests are printed, so that a slow one is seen and marked `slow`.
    _pytest(
        session, "-q", "-ra", "--durations=15", "--timeout=300", *_with_contract(session, "tests")
    )


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


@nox.session(venv_backend="none")
def slow(session: nox.Session) -> None:
    """Tests marked `@pytest.mark.slow`: the experiments' `--quick` runs with accuracy targets,
    multi-device runs and the slowest variants of the library's tests. CI runs them
    (`.ci/run`); their twenty slowest are printed."""
    _pytest(
        session, "-q", "-ra", "-m", "slow and not long", "--durations=20", "--timeout=900", "tests"
    )


@nox.session(venv_backend="none")
def long(session: nox.Session) -> None:
    """Tests marked `@pytest.mark.long`, too long for CI: the experiments' runs that take
    minutes each. Run them before a release, or after changing what they cover."""
    _pytest(session, "-q", "-ra", "-m", "long", "--durations=20", "--timeout=1800", "tests")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff format --check and ruff check."""
    session.install("ruff>=0.6")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """pyright on the library."""
    session.run(_shared("pyright"), "bilevax", env=_shared_env(session))


@nox.session(venv_backend="none")
def docs(session: nox.Session) -> None:
    """Build the documentation in strict mode, then open it in headless Chromium: no raw TeX.

    The site serves its own MathJax, which the build takes from the npm registry with `npm pack`
    the first time (`docs/hooks/mathjax_vendor.py`; cached in `build/docs-vendor/`). The browser
    check (`.ci/check_docs_render.py`, arguments after `--` go to it) cuts off every host but
    127.0.0.1 and fails on maths left as TeX; it is skipped, saying so, where no Chromium is
    installed (`apt-get install -y chromium`)."""
    env = _shared_env(session)
    session.run(_shared("mkdocs"), "build", "--strict", env=env)
    session.run(
        _shared("python"),
        ".ci/check_docs_render.py",
        "site",
        "--skip-if-no-browser",
        *session.posargs,
        env=env,
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


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """The main demo: per-feature L2 hyperparameter optimisation for ridge regression."""
    env = dict(_shared_env(session), **CPU_ENV)
    session.run(
        _shared("python"), "-m", "experiments.ridge_l2", *(session.posargs or ["--quick"]), env=env
    )
