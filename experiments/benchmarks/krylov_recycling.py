"""How much could Krylov recycling save the outer loop's adjoint solves? An upper bound.

Recycling (Ehrhardt, Gazzola & Scott 2024; deflated CG, Saad et al. 2000) keeps a few of the
last adjoint solve's Ritz vectors `W` and deflates them from the next solve `H v = ∇_w E`,
which pays when `H` has a few small, separated eigenvalues that slow CG down. Recycled Ritz
vectors only approximate eigenvectors, and at a new λ `H W` costs `k` Hessian-vector products
(HVPs). So the best any recycling can do is deflated CG with the *exact* `k` smallest
eigenvectors of the new `H`, for `k` HVPs: this script counts its HVPs against plain CG's, on
`ho_loop`'s d = 2,000 problem, at λ after one outer step from `ho_loop`'s start (its first
Adam step moves every log λ by the learning rate), from a zero start and from the adjoint at
the start (the loop's warm start), to HOAG's tolerances `ε max(1, ‖∇_w E‖)`. It also counts
the eigenvectors of the *last* λ, what a recycler could really hold.

    python -m experiments.benchmarks.krylov_recycling [--quick]
"""

import jax
import jax.numpy as jnp
import numpy as np

from .. import _cli
from ..problems import logistic_loss as inner_loss, logistic_outer as outer_loss
from . import ho_loop
from ._problems import newton_cg
from ._timing import finish, format_table, outputs, parser


jax.config.update("jax_enable_x64", True)

NAME = "krylov_recycling"
DEFLATED = (5, 10, 20, 40, 80)
TOLERANCES = (1e-7, 1e-8)  # HOAG's schedule in `ho_loop`, from its start to its floor


def deflated_cg(matrix, b, x, basis, tol, max_steps=10_000):
    """`(x, hvps)`: CG on `matrix @ x = b` from `x` to `‖b − matrix x‖ ≤ tol`, with the columns
    of `basis` deflated (Saad et al. 2000, Algorithm 3.6; plain CG when `basis` is None).
    `hvps` counts every product with `matrix`: the `k` of `matrix @ basis` included."""
    hvps = 0
    if basis is not None:
        image = matrix @ basis
        hvps += basis.shape[1]
        coarse = np.linalg.cholesky(basis.T @ image)
        coarse_solve = lambda z: np.linalg.solve(coarse.T, np.linalg.solve(coarse, z))
        project = lambda r: basis @ coarse_solve(image.T @ r)
        x = x + basis @ coarse_solve(basis.T @ (b - matrix @ x))
        hvps += 1
    r = b - matrix @ x
    hvps += 1
    p = r if basis is None else r - project(r)
    steps = 0
    while np.linalg.norm(r) > tol and steps < max_steps:
        product = matrix @ p
        hvps += 1
        steps += 1
        alpha = (r @ r) / (p @ product)
        x = x + alpha * p
        r_next = r - alpha * product
        beta = (r_next @ r_next) / (r @ r)
        p = r_next + beta * p - (0.0 if basis is None else project(r_next))
        r = r_next
    return x, hvps


def _adjoint_system(lam, train, val):
    """The dense Hessian `H` of the inner loss at the inner solution and `∇_w E` there."""
    w, _ = newton_cg(jnp.zeros(lam.shape[0], lam.dtype), lam, train)
    hessian = np.asarray(jax.hessian(inner_loss)(w, lam, train))
    return hessian, np.asarray(jax.grad(outer_loss)(w, lam, val))


def bound(lam0, train, val) -> tuple[dict, list[dict]]:
    """`(spectrum, rows)`: `H`'s extreme eigenvalues at the new λ, and per tolerance and start
    the HVPs of plain CG and of CG deflated by `k` exact eigenvectors (new λ, last λ)."""
    lam1 = lam0 - ho_loop.OUTER_LR * jnp.sign(jax.random.normal(jax.random.key(0), lam0.shape))
    h0, g0 = _adjoint_system(lam0, train, val)
    h1, g1 = _adjoint_system(lam1, train, val)
    eigenvalues, new = np.linalg.eigh(h1)
    last = np.linalg.eigh(h0)[1]
    spectrum = {
        "smallest": eigenvalues[:3].tolist(),
        "largest": eigenvalues[-3:].tolist(),
        "condition": float(eigenvalues[-1] / eigenvalues[0]),
    }
    starts = {"zero": np.zeros_like(g1), "last adjoint": np.linalg.solve(h0, g0)}
    rows = []
    for tol in TOLERANCES:
        absolute = tol * max(1.0, float(np.linalg.norm(g1)))
        for name, start in starts.items():
            _, plain = deflated_cg(h1, g1, start, None, absolute)
            for k in DEFLATED:
                _, exact = deflated_cg(h1, g1, start, new[:, :k], absolute)
                _, recycled = deflated_cg(h1, g1, start, last[:, :k], absolute)
                rows.append(
                    {
                        "tol": tol,
                        "start": name,
                        "k": k,
                        "plain_hvps": plain,
                        "exact_hvps": exact,
                        "last_lambda_hvps": recycled,
                        "saved": plain - exact,
                    }
                )
    return spectrum, rows


def main(argv=None) -> dict:
    cli = parser(NAME, "an upper bound on what Krylov recycling saves ho_loop's adjoint solves")
    args = cli.parse_args(argv)
    out = outputs(args, NAME)
    # --quick: the same problem; the run takes a minute either way (2,000 × 2,000 Hessians).
    (name, lam0, train, val), *_ = ho_loop.make_problems(True, ["synthetic_d2000"])
    spectrum, rows = bound(lam0, train, val)
    print(f"{name}: H's eigenvalues {spectrum}")
    print(format_table(rows, list(rows[0])))
    payload = {"problem": name, "spectrum": spectrum, "rows": rows}
    finish(args, NAME, out, payload)
    return payload


if __name__ == "__main__":
    _cli.cli(main)
