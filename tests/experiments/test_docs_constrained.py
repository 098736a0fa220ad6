"""The examples of docs/constrained.md run, and their numbers are what the page says.

The page's ```python blocks are the imports and the QP example, then the simplex example
(which uses the first block's names); they run in one namespace, as a reader would run them,
under JAX's default dtype promotion (the page is user code), not the suite's strict one.
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import relerr

import bilevax as bx


PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "constrained.md"


def _namespace() -> dict:
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


@pytest.mark.slow  # a QP solve and its hypergradient compiled, and jaxopt's custom_root twice
def test_the_pages_numbers():
    with jax.numpy_dtype_promotion("standard"):
        _check_the_pages_numbers()


def _check_the_pages_numbers():
    ns = _namespace()
    sol = ns["fit"](jnp.asarray(1.0))
    assert sol.result == bx.RESULTS.successful
    assert int(sol.stats["num_steps"]) == 56
    assert int(jnp.sum(sol.primal <= 1e-9)) == 3 and int(jnp.sum(sol.dual_ineq > 0)) == 3
    grad = float(ns["grad"])
    assert abs(grad - -2.96549759e-3) < 1e-11
    eps = 1e-5
    validation = ns["validation"]
    fd = (validation(jnp.asarray(1.0 + eps)) - validation(jnp.asarray(1.0 - eps))) / (2 * eps)
    assert abs(grad - fd) <= 1e-7 * abs(fd)
    # The simplex: x, ν and the Jacobian's closed form on the support {0, 4}.
    assert np.allclose(ns["x"], [0.35, 0, 0, 0, 0.65]) and np.isclose(ns["nu"], 0.55)
    support = jnp.asarray([1.0, 0, 0, 0, 1.0])
    closed = jnp.diag(support) - jnp.outer(support, support) / 2
    assert float(jnp.max(jnp.abs(ns["jacobian"] - closed))) < 2e-13

    # jaxopt at a weakly active constraint: a finite Jacobian that is neither one-sided one.
    jaxopt = pytest.importorskip("jaxopt")
    from jaxopt._src.base import KKTSolution
    from jaxopt._src.implicit_diff import make_kkt_optimality_fun

    theta, a = jnp.asarray([0.3, -0.2, 0.8]), jnp.asarray([1.0, 0.5, -0.3])

    def project(init, theta, params_eq, params_ineq):
        a, b = params_ineq
        mu = jnp.maximum(a @ theta - b, 0.0) / (a @ a)
        return KKTSolution(theta - mu * a, None, mu)

    optimality = make_kkt_optimality_fun(
        lambda x, t: 0.5 * jnp.sum((x - t) ** 2), None, lambda x, p: p[0] @ x - p[1]
    )
    solvers = jaxopt.linear_solve
    jacobians = []
    for solve in (solvers.solve_normal_cg, solvers.solve_gmres):
        wrapped = jaxopt.implicit_diff.custom_root(
            optimality, solve=functools.partial(solve, tol=1e-12)
        )(project)
        jac = jax.jacobian(lambda t: wrapped(None, t, None, (a, a @ theta)).primal)(theta)
        jacobians.append(jac)
    normal_cg, gmres = jacobians
    outward = jnp.eye(3) - jnp.outer(a, a) / (a @ a)
    assert abs(float(normal_cg[0, 0]) - 0.573) < 5e-4 and abs(float(outward[0, 0]) - 0.254) < 5e-4
    assert relerr(normal_cg, jnp.eye(3)) > 0.1 and relerr(normal_cg, outward) > 0.1
    assert jnp.all(jnp.isnan(gmres))
