"""`python -m experiments.benchmarks.accuracy`: the relative error of every hypergradient path
against the closed form, on per-feature ridge regression (diabetes, float64).

Not a timing: it records how exact each path is, so a regression in accuracy shows up next to
the speed figures."""

import jax
import jax.numpy as jnp
import lineax as lx
from sklearn.datasets import load_diabetes

import bilevax as bx

from .. import _cli
from ..problems import half_mse as outer, relerr, ridge_loss as inner
from ._timing import finish, format_table, outputs, parser


def _problem():
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    train = (jnp.asarray(X[:300]), jnp.asarray(y[:300]))
    val = (jnp.asarray(X[300:]), jnp.asarray(y[300:]))
    return train, val


def main(argv=None) -> list[dict]:
    args = parser("accuracy", __doc__.splitlines()[0]).parse_args(argv)
    out = outputs(args, "accuracy")
    jax.config.update("jax_enable_x64", True)
    train, val = _problem()
    d = train[0].shape[1]
    lam = jnp.linspace(-3.0, 0.0, d)

    def closed_form(lam):
        X, y = train
        n = X.shape[0]
        w = jnp.linalg.solve(X.T @ X / n + jnp.diag(jnp.exp(lam)), X.T @ y / n)
        return outer(w, lam, val)

    exact = jax.grad(closed_form)(lam)
    exact_hessian = jax.hessian(closed_form)(lam)
    lr = 1.0 / (float(jnp.linalg.eigvalsh(train[0].T @ train[0] / 300).max()) + 1.0)
    gd = bx.GradientDescent(lr)
    tight = lx.CG(rtol=1e-12, atol=1e-12)

    def solved(adjoint, steps, tol=1e-13):
        def E(lam):
            sol = bx.inner_solve(
                inner,
                jnp.zeros(d),
                lam,
                train,
                solver=gd,
                max_steps=steps,
                tol=tol,
                adjoint=adjoint,
            )
            return outer(sol.params, lam, val)

        return E

    w_star = bx.inner_solve(
        inner, jnp.zeros(d), lam, train, solver=gd, max_steps=200_000, tol=1e-13
    ).params
    E_implicit = solved(bx.ImplicitAdjoint(tight), 200_000)
    T = 20_000 if not args.quick else 8_000
    E_unrolled = solved(bx.UnrolledAdjoint(), T)
    direction = jnp.ones(d) / jnp.sqrt(d)
    eps = 1e-5
    fd = (E_implicit(lam + eps * direction) - E_implicit(lam - eps * direction)) / (2 * eps)

    def unrolled(**kwargs):
        return bx.unrolled_hypergrad(
            outer, inner, jnp.zeros(d), lam, train, val, solver=gd, num_steps=T, **kwargs
        )[1]

    paths = {
        "implicit_hypergrad, reverse (CG)": bx.implicit_hypergrad(
            outer, inner, w_star, lam, train, val, linear_solver=tight
        )[1],
        "implicit_hypergrad, forward (CG)": bx.implicit_hypergrad(
            outer, inner, w_star, lam, train, val, linear_solver=tight, mode="forward"
        )[1],
        "implicit_hypergrad, default CG(1e-6)": bx.implicit_hypergrad(
            outer, inner, w_star, lam, train, val
        )[1],
        "implicit_hypergrad, LU": bx.implicit_hypergrad(
            outer, inner, w_star, lam, train, val, linear_solver=lx.LU()
        )[1],
        "jax.grad(inner_solve, ImplicitAdjoint)": jax.grad(E_implicit)(lam),
        "jax.jacfwd(inner_solve, ImplicitAdjoint)": jax.jacfwd(E_implicit)(lam),
        "jax.grad(inner_solve, UnrolledAdjoint)": jax.grad(E_unrolled)(lam),
        f"unrolled_hypergrad reverse, T={T}": unrolled(),
        f"unrolled_hypergrad forward, T={T}": unrolled(mode="forward"),
        f"unrolled_hypergrad checkpoints=100, T={T}": unrolled(checkpoints=100),
    }
    rows = [{"path": name, "relerr": relerr(g, exact)} for name, g in paths.items()]
    rows.append(
        {
            "path": "jax.hessian(inner_solve, ImplicitAdjoint)",
            "relerr": relerr(jax.hessian(E_implicit)(lam), exact_hessian),
        }
    )
    rows.append(
        {
            "path": "central difference (eps=1e-5) vs directional closed form",
            "relerr": abs(float(fd) - float(exact @ direction)) / abs(float(exact @ direction)),
        }
    )
    print(format_table(rows, ["path", "relerr"]))
    finish(args, "accuracy", out, {"rows": rows})
    return rows


if __name__ == "__main__":
    _cli.cli(main)
