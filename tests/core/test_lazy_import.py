"""`import bilevax` loads the core only: optax and optimistix (imported by whoever passes their
solvers), and the optional layers `bx.contrib`, `bx.diagnostics` and `bx.nn` (imported on first
use, as attributes or by name), are left for later, and every public name still resolves."""

import subprocess
import sys
import textwrap

import pytest


def test_import_is_lazy_and_the_public_api_resolves():
    script = textwrap.dedent(
        """
        import sys, types
        import bilevax as bx

        deferred = ["optax", "optimistix", "bilevax.contrib", "bilevax.diagnostics", "bilevax.nn"]
        print(sorted(name for name in deferred if name in sys.modules))
        for name in dir(bx):
            if not name.startswith("_"):
                getattr(bx, name)
        for name in ("contrib", "diagnostics", "nn"):
            module = getattr(bx, name)
            assert isinstance(module, types.ModuleType) and module is sys.modules[f"bilevax.{name}"]
            assert all(getattr(module, n) is not None for n in dir(module) if not n.startswith("_"))
        from bilevax.contrib import HOAG
        assert HOAG is bx.contrib.HOAG
        assert isinstance(bx.__version__, str) and bx.__version__
        try:
            bx.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("a missing attribute must raise AttributeError")
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    deferred_loaded, ok = result.stdout.splitlines()
    assert deferred_loaded == "[]"
    assert ok == "ok"


def test_optax_and_optimistix_solvers_are_recognised_once_imported():
    import optax
    import optimistix as optx

    from bilevax._solver import as_inner_solver, check_solver

    assert type(as_inner_solver(optax.sgd(0.1), None)).__name__ == "_OptaxSolver"
    assert type(as_inner_solver(optx.BFGS(1e-6, 1e-6), None)).__name__ == "_OptimistixSolver"
    # A factory passed uncalled is still refused by name.
    with pytest.raises(TypeError, match="optax.adam"):
        check_solver(optax.adam)
