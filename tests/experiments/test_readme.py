"""The README's example runs, and computes the ridge hypergradient its text says it does."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

import bilevax as bx


README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _first_python_block() -> str:
    match = re.search(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert match is not None, "README.md has no ```python block"
    return match.group(1)


def _ridge_hypergrad(X, y, X_val, y_val, lam: float) -> float:
    """d/d(log λ) of the validation loss at the ridge solution, in closed form (float64 numpy).

    w*(λ) = A⁻¹ Xᵀy / n with A = XᵀX / n + λI, so dw*/d(log λ) = -λ A⁻¹ w*.
    """
    n, d = X.shape
    A = X.T @ X / n + lam * np.eye(d)
    w = np.linalg.solve(A, X.T @ y / n)
    dw = -lam * np.linalg.solve(A, w)
    return float((X_val.T @ (X_val @ w - y_val) / len(y_val)) @ dw)


def test_readme_example_matches_closed_form(capsys):
    namespace: dict = {}
    exec(compile(_first_python_block(), str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.strip(), "the README example should print its hypergradients"

    tasks = namespace["tasks"]
    hypergrads = np.asarray(namespace["hypergrad"](jnp.asarray(0.0), tasks))
    assert hypergrads.shape == (8,)
    assert hypergrads.dtype == np.float64

    arrays = [np.asarray(a, dtype=np.float64) for a in (*tasks["train"], *tasks["val"])]
    expected = np.array([_ridge_hypergrad(*(a[i] for a in arrays), 1.0) for i in range(8)])
    # The inner solve stops at ‖∇L‖ ≤ 1e-10; on these well-conditioned problems that, and the
    # CG solve, leave about 1e-10 relative error.
    np.testing.assert_allclose(hypergrads, expected, rtol=1e-8, atol=1e-12)
    # Not a vacuous check: the tasks differ, and some hypergradients are far from zero.
    assert np.ptp(expected) > 0.1 and np.max(np.abs(expected)) > 0.1


@pytest.mark.slow
def test_getting_started_page_runs_and_its_claims_hold():
    """Runs the getting-started page's code blocks in order, then checks what its text claims."""
    page = README.parent / "docs" / "getting-started.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(page), "exec"), namespace)
    relerr, log_lam = namespace["relerr"], namespace["log_lam"]
    assert float(relerr(namespace["hypergrad"])) < 1e-6  # default CG tolerance
    assert float(relerr(namespace["tight"])) < 1e-9  # tight CG tolerance
    train, val = namespace["train"], namespace["val"]
    assert float(namespace["value"]) < float(namespace["val_loss"](log_lam, train, val))
    assert namespace["hypergrads"].shape == (16, log_lam.shape[0])
    # Warm starts: the same outer path in fewer inner steps than cold solves (counted as the
    # cold solve at the last λ times 200; measured: 8,514 against 200 x 77 = 15,400).
    assert abs(float(namespace["warm_value"] - namespace["value"])) < 1e-8
    cold = bx.inner_solve(namespace["inner_loss"], jnp.zeros(8), namespace["h"], train,
                          solver=bx.GradientDescent(0.3), max_steps=2000, tol=1e-10)  # fmt: skip
    assert namespace["inner_steps"] < 0.6 * 200 * int(cold.stats["num_steps"])
    assert float(jnp.max(jnp.abs(namespace["g_rev"] - namespace["g_fwd"]))) < 1e-12
