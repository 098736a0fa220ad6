r"""Lasso and elastic-net hyperparameter optimisation, and data re-weighting on the simplex.

Diabetes data (bundled with scikit-learn), standardised, split 242/100/100. Three problems:

- **Lasso**: $L(w, \lambda) = \tfrac1{2n}\|X w - y\|^2 + e^{\lambda}\|w\|_1$, solved by
  [`bx.ProximalGradient`][bilevax.ProximalGradient] (FISTA) and differentiated through its fixed
  point. The hypergradient is checked against central finite differences and against the closed
  form on the active set, $\mathrm{d}w_S/\mathrm{d}\lambda_1 = -(X_S^\top X_S/n)^{-1}
  \operatorname{sign}(w_S)$; the unrolled hypergradient of the same solver is shown to converge
  to it as $T$ grows; Adam on $\lambda$ is compared with a fine grid.
- **Elastic net**: $e^{\lambda_1}\|w\|_1 + \tfrac12 e^{\lambda_2}\|w\|^2$, two hyperparameters,
  the same checks, Adam against a 2-D grid.
- **Data re-weighting**: a third of the training labels are corrupted; one weight per training
  example, $p \in \Delta^{n-1}$ (the simplex), in a weighted ridge regression whose solution
  comes from a closed-form solve wrapped with [`bx.implicit_diff`][bilevax.implicit_diff];
  projected gradient descent on $p$ (`optax.projections.projection_simplex`).

In `results.json`, `log_hparams` fields hold log strengths ($\lambda_1$, or $(\lambda_1,
\lambda_2)$); the strengths are their exponentials.

    python -m experiments.lasso_ho [--quick] [--out DIR] [--seed S] [--resume | --overwrite]
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax

import bilevax as bx

from . import _cli, _console, _harness, _outputs, problems
from ._optax import optax_step
from .problems import half_mse as mse, relerr as _relerr


SPLIT = problems.DIABETES_SPLIT
TOL = 1e-12  # the gradient-mapping norm at which an inner solve stops
MAX_STEPS = 50_000
CORRUPTED = 1 / 3  # the fraction of training labels replaced by noise in the re-weighting task


class Data(eqx.Module):
    train: tuple[jax.Array, jax.Array]
    val: tuple[jax.Array, jax.Array]
    test: tuple[jax.Array, jax.Array]
    step: float = eqx.field(static=True)  # 1/L for the inner solver


def load(seed: int) -> Data:
    train, val, test = problems.diabetes(seed, SPLIT)
    lipschitz = float(problems.gram_eigenvalues(train[0]).max())
    return Data(train, val, test, 1 / lipschitz)


def lasso_prox(w, log_l1, scaling):
    return bx.prox_lasso(w, jnp.exp(log_l1), scaling)


def enet_prox(w, log_reg, scaling):
    return bx.prox_elastic_net(w, (jnp.exp(log_reg[0]), jnp.exp(log_reg[1])), scaling)


PROX = {"lasso": lasso_prox, "elastic_net": enet_prox}


@eqx.filter_jit
def validation(hparams, init, data: Data, kind: str):
    """The validation loss at the inner solution, and the solution (to warm-start from)."""
    solver = bx.ProximalGradient(data.step, PROX[kind])
    sol = bx.inner_solve(
        mse, init, hparams, data.train, solver=solver, tol=TOL, max_steps=MAX_STEPS,
        adjoint=bx.ImplicitAdjoint(lx.LU()),
    )  # fmt: skip
    return mse(sol.params, hparams, data.val), sol


@eqx.filter_jit
def value_and_hypergrad(hparams, init, data: Data, kind: str):
    (value, sol), grad = jax.value_and_grad(
        lambda h: validation(h, init, data, kind), has_aux=True
    )(hparams)
    return value, grad, sol


@eqx.filter_jit
def unrolled(hparams, data: Data, kind: str, num_steps: int):
    solver = bx.ProximalGradient(data.step, PROX[kind])
    return bx.unrolled_hypergrad(
        mse, mse, jnp.zeros(10), hparams, data.train, data.val, solver=solver,
        num_steps=num_steps,
    )  # fmt: skip


def closed_form_hypergrad(hparams, w, data: Data, kind: str) -> np.ndarray:
    r"""The hypergradient from the active-set closed form, in NumPy: on the support $S$,
    $A\,\mathrm{d}w_S = -\operatorname{sign}(w_S)\,\mathrm{d}\lambda_1 - w_S\,\mathrm{d}\lambda_2$
    with $A = X_S^\top X_S/n + \lambda_2 I$ (and $\lambda_2 = 0$ for the lasso)."""
    hparams, w = np.atleast_1d(np.asarray(hparams)), np.asarray(w)
    X, y = map(np.asarray, data.train)
    Xv, yv = map(np.asarray, data.val)
    support = w != 0
    reg = np.exp(hparams)
    l2 = reg[1] if kind == "elastic_net" else 0.0
    XS = X[:, support]
    A = XS.T @ XS / len(y) + l2 * np.eye(support.sum())
    columns = [-np.sign(w[support]) * reg[0]]
    if kind == "elastic_net":
        columns.append(-w[support] * reg[1])
    dw = np.zeros((10, len(columns)))
    dw[support] = np.linalg.solve(A, np.stack(columns, 1))
    grad_val = Xv.T @ (Xv @ w - yv) / len(yv)
    out = grad_val @ dw
    return out if kind == "elastic_net" else out[0]


def finite_difference(hparams, data: Data, kind: str, eps=1e-6) -> np.ndarray:
    hparams = jnp.asarray(hparams)
    init = jnp.zeros(10)
    out = []
    for i in range(hparams.size):
        e = jnp.zeros_like(hparams).at[i].set(eps) if hparams.ndim else jnp.asarray(eps)
        plus, _ = validation(hparams + e, init, data, kind)
        minus, _ = validation(hparams - e, init, data, kind)
        out.append(float(plus - minus) / (2 * eps))
    return np.asarray(out) if hparams.ndim else np.asarray(out[0])


def check_hypergradients(data: Data, kind: str, points) -> list[dict]:
    """At each point: the implicit hypergradient against finite differences and the closed
    form, the support size, and the inner solve's steps."""
    rows = []
    for hparams in points:
        hparams = jnp.asarray(hparams)
        value, grad, sol = value_and_hypergrad(hparams, jnp.zeros(10), data, kind)
        rows.append(
            dict(
                log_hparams=np.asarray(hparams),
                val_loss=float(value),
                support=int(np.sum(np.asarray(sol.params) != 0)),
                inner_steps=int(sol.stats["num_steps"]),
                relerr_fd=_relerr(grad, finite_difference(hparams, data, kind)),
                relerr_closed_form=_relerr(
                    grad, closed_form_hypergrad(hparams, sol.params, data, kind)
                ),
            )
        )
    return rows


def unrolled_convergence(data: Data, hparams, steps) -> list[dict]:
    """The unrolled hypergradient of T FISTA steps against the implicit one, T in `steps`."""
    hparams = jnp.asarray(hparams)
    _, implicit, _ = value_and_hypergrad(hparams, jnp.zeros(10), data, "lasso")
    rows = []
    for num_steps in steps:
        _, grad = unrolled(hparams, data, "lasso", num_steps)
        rows.append(dict(num_steps=num_steps, relerr=_relerr(grad, implicit)))
    return rows


def grid(data: Data, kind: str, axes) -> dict:
    """The validation loss on a grid of log strengths (1-D for the lasso, 2-D for the
    elastic net), warm-started along the grid."""
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))
    w = jnp.zeros(10)
    losses = []
    for point in points:
        hparams = jnp.asarray(point[0] if kind == "lasso" else point)
        value, sol = validation(hparams, w, data, kind)
        w = sol.params
        losses.append(float(value))
    losses = np.asarray(losses)
    best = int(np.argmin(losses))
    return dict(axes=[np.asarray(a) for a in axes], val_loss=losses.reshape(*map(len, axes)),
                best_log_hparams=points[best], best_val_loss=float(losses[best]))  # fmt: skip


def hypergradient_descent(
    data: Data, kind: str, start, steps: int, lr: float, run: _harness.Run
) -> dict:
    """Adam on the log strengths with one warm-started inner solve per step."""
    optimizer = optax.adam(lr)

    def fresh():
        hparams = jnp.asarray(start, jnp.float64)
        history = dict(log_hparams=[], val_loss=[], support=[])
        return dict(hparams=hparams, w=jnp.zeros(10), opt_state=optimizer.init(hparams),
                    history=history)  # fmt: skip

    def step(k, state):
        history = state["history"]
        value, grad, sol = value_and_hypergrad(state["hparams"], state["w"], data, kind)
        state["w"] = sol.params
        history["log_hparams"].append(np.asarray(state["hparams"]))
        history["val_loss"].append(float(value))
        history["support"].append(int(np.sum(np.asarray(state["w"]) != 0)))
        state["hparams"], state["opt_state"] = optax_step(
            optimizer, grad, state["opt_state"], state["hparams"]
        )
        return state, f"val {float(value):.5f}  best {min(history['val_loss']):.5f}"

    state = run.loop(f"hgd_{kind}", steps, fresh, step, description=f"HGD ({kind})")
    hparams, w = state["hparams"], state["w"]
    value, sol = validation(hparams, w, data, kind)
    test_value = mse(sol.params, None, data.test)
    return dict(history=state["history"], final_log_hparams=np.asarray(hparams),
                val_loss=float(value), test_loss=float(test_value))  # fmt: skip


# Data re-weighting: one weight per training example on the simplex.
RIDGE = 1e-2


def weighted_loss(w, weights, X, y):
    return 0.5 * jnp.sum(weights * (X @ w - y) ** 2) + 0.5 * RIDGE * jnp.sum(w**2)


def weighted_ridge(init, weights, X, y):
    """Any solver will do: here the normal equations, solved in closed form."""
    del init
    A = X.T @ (weights[:, None] * X) + RIDGE * jnp.eye(X.shape[1])
    return jnp.linalg.solve(A, X.T @ (weights * y))


weighted_ridge_implicit = bx.implicit_diff(
    weighted_ridge, jax.grad(weighted_loss), linear_solver=lx.CG(1e-12, 1e-12), symmetric=True
)


def corrupt(data: Data, seed: int):
    X, y = data.train
    n = len(y)
    rng = np.random.default_rng(seed + 1)
    bad = rng.permutation(n)[: int(CORRUPTED * n)]
    y = np.asarray(y).copy()
    y[bad] = 3 * rng.normal(size=len(bad))
    mask = np.zeros(n, bool)
    mask[bad] = True
    return X, jnp.asarray(y), mask


@jax.jit
def reweighting_value_and_grad(weights, X, y, val):
    def objective(weights):
        return mse(weighted_ridge_implicit(None, weights, X, y), None, val)

    return jax.value_and_grad(objective)(weights)


def reweighting(data: Data, steps: int, lr: float, seed: int, run: _harness.Run) -> dict:
    X, y, mask = corrupt(data, seed)
    n = len(y)
    weights0 = jnp.full(n, 1 / n)
    # The hypergradient along a direction in the simplex's tangent space, against central
    # differences of the closed form (no implicit differentiation in the reference).
    direction = jnp.asarray(np.random.default_rng(seed).normal(size=n))
    direction = direction - direction.mean()
    exact = lambda p: mse(weighted_ridge(None, p, X, y), None, data.val)
    eps = 1e-7
    fd = float(exact(weights0 + eps * direction) - exact(weights0 - eps * direction)) / (2 * eps)
    _, grad = reweighting_value_and_grad(weights0, X, y, data.val)
    relerr_fd = abs(float(grad @ direction) - fd) / abs(fd)
    relerr_exact = _relerr(grad, jax.grad(exact)(weights0))

    # Projected gradient descent on the simplex.
    optimizer, simplex = optax.sgd(lr), optax.projections.projection_simplex
    stateless = optimizer.init(weights0)  # plain SGD keeps no state

    def step(k, state):
        weights, history = state["weights"], state["history"]
        value, grad = reweighting_value_and_grad(weights, X, y, data.val)
        history["val_loss"].append(float(value))
        history["corrupted_mass"].append(float(jnp.sum(jnp.where(mask, weights, 0))))
        state["weights"], _ = optax_step(optimizer, grad, stateless, weights, project=simplex)
        return state, f"val {float(value):.5f}  best {min(history['val_loss']):.5f}"

    fresh = lambda: dict(weights=weights0, history=dict(val_loss=[], corrupted_mass=[]))
    state = run.loop("reweighting", steps, fresh, step, description="re-weighting")
    weights, history = state["weights"], state["history"]
    w_uniform = weighted_ridge(None, weights0, X, y)
    w_final = weighted_ridge(None, weights, X, y)
    w_clean = weighted_ridge(None, jnp.asarray(~mask / np.sum(~mask)), X, y)
    loss = lambda w, split: float(mse(w, None, split))
    return dict(
        hypergrad_relerr_fd=relerr_fd,
        hypergrad_relerr_exact=relerr_exact,
        history=history,
        corrupted_fraction=float(mask.mean()),
        corrupted_mass_final=float(jnp.sum(jnp.where(mask, weights, 0))),
        val_loss=dict(uniform=loss(w_uniform, data.val), learned=loss(w_final, data.val),
                      clean_only=loss(w_clean, data.val)),
        test_loss=dict(uniform=loss(w_uniform, data.test), learned=loss(w_final, data.test),
                       clean_only=loss(w_clean, data.test)),
    )  # fmt: skip


def plot(results: dict, path):
    plt = _outputs.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    lasso, enet = results["lasso"], results["elastic_net"]
    ax = axes[0]
    ax.plot(lasso["grid"]["axes"][0], lasso["grid"]["val_loss"], color="0.5", label="grid")
    hist = lasso["hgd"]["history"]
    ax.plot(np.ravel(hist["log_hparams"]), hist["val_loss"], "o-", ms=3, label="Adam (implicit)")
    ax.set(xlabel=r"$\log \lambda_1$", ylabel="validation loss", title="Lasso HO")
    ax.legend()
    ax = axes[1]
    rows = lasso["unrolled_vs_implicit"]
    ax.loglog([r["num_steps"] for r in rows], [r["relerr"] for r in rows], "o-")
    ax.set(xlabel="unrolled FISTA steps T", ylabel="relative error vs implicit",
           title="Unrolled → implicit")  # fmt: skip
    ax = axes[2]
    g = enet["grid"]
    contour = ax.contourf(g["axes"][0], g["axes"][1], np.asarray(g["val_loss"]).T, levels=30)
    fig.colorbar(contour, ax=ax)
    path_h = np.asarray(enet["hgd"]["history"]["log_hparams"])
    ax.plot(path_h[:, 0], path_h[:, 1], "w.-")
    ax.set(xlabel=r"$\log \lambda_1$", ylabel=r"$\log \lambda_2$", title="Elastic net HO")
    ax = axes[3]
    rw = results["reweighting"]
    ax.plot(rw["history"]["val_loss"], label="validation loss")
    ax.set(xlabel="outer step", title="Re-weighting on the simplex")
    twin = ax.twinx()
    twin.plot(rw["history"]["corrupted_mass"], color="C3", label="weight on corrupted")
    twin.set_ylabel("weight on corrupted examples", color="C3")
    ax.legend(loc="upper center")
    return _outputs.save_figure(fig, path)


def main(argv=None) -> dict:
    p = _cli.parser("lasso_ho", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="outer steps per problem")
    args = p.parse_args(argv)
    args.steps = steps = args.steps or (30 if args.quick else 100)
    # More steps continue a run: the checks and grids do not depend on them.
    run = _harness.start(args, may_grow=("steps",))
    data = load(args.seed)
    results: dict = dict(seed=args.seed, steps=steps, quick=args.quick)

    lasso_points = [np.log(0.005), np.log(0.02), np.log(0.05), np.log(0.1)]
    enet_points = [np.log([0.01, 0.1]), np.log([0.05, 0.5]), np.log([0.02, 2.0])]
    num_grid = 41 if args.quick else 201
    unrolled_steps = [3, 10, 30, 100, 300, 1000] + ([] if args.quick else [3000])
    results["lasso"] = dict(
        checks=run.stage("lasso_checks", lambda: check_hypergradients(data, "lasso", lasso_points)),
        unrolled_vs_implicit=run.stage(
            "lasso_unrolled", lambda: unrolled_convergence(data, np.log(0.02), unrolled_steps)
        ),
        grid=run.stage("lasso_grid", lambda: grid(data, "lasso", [np.linspace(-8, 0, num_grid)])),
        hgd=hypergradient_descent(data, "lasso", np.log(0.2), steps, 0.2, run),
    )
    num_grid = 13 if args.quick else 41
    enet_axes = [np.linspace(-8, 0, num_grid)] * 2
    results["elastic_net"] = dict(
        checks=run.stage(
            "elastic_net_checks", lambda: check_hypergradients(data, "elastic_net", enet_points)
        ),
        grid=run.stage("elastic_net_grid", lambda: grid(data, "elastic_net", enet_axes)),
        hgd=hypergradient_descent(data, "elastic_net", np.log([0.2, 0.2]), steps, 0.2, run),
    )
    results["reweighting"] = reweighting(data, steps * 2, 3e-4, args.seed, run)

    rows = [
        (kind, np.array2string(np.exp(row["log_hparams"]), precision=3), str(row["support"]),
         f"{row['relerr_fd']:.1e}", f"{row['relerr_closed_form']:.1e}")
        for kind in ("lasso", "elastic_net")
        for row in results[kind]["checks"]
    ]  # fmt: skip
    columns = ("problem", "hparams", "support", "vs finite diff.", "vs closed form")
    title = "Hypergradient relative errors (implicit, float64)"
    _console.print_table(title, columns, rows, stdout=False)
    for kind in ("lasso", "elastic_net"):
        r = results[kind]
        _console.console.print(
            f"{kind}: Adam val {r['hgd']['val_loss']:.5f} (test {r['hgd']['test_loss']:.5f}), "
            f"grid best {r['grid']['best_val_loss']:.5f}"
        )
    rw = results["reweighting"]
    _console.console.print(
        f"re-weighting: val {rw['val_loss']}, weight on corrupted "
        f"{rw['corrupted_mass_final']:.3f} (uniform {rw['corrupted_fraction']:.3f}), "
        f"hypergradient relerr vs FD {rw['hypergrad_relerr_fd']:.1e}"
    )
    return run.finish(results, {"lasso_ho.png": lambda path: plot(results, path)})


if __name__ == "__main__":
    _cli.cli(main)
