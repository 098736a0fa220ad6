r"""Per-feature L2 hyperparameter optimisation for ridge regression (the main demo).

Ten hyperparameters $\lambda_i$, the log L2 strengths of the diabetes data's ten features:

$$L(w, \lambda) = \tfrac{1}{2n}\|X_{tr} w - y_{tr}\|^2 + \tfrac12 \sum_i e^{\lambda_i} w_i^2,
  \qquad E(w) = \tfrac{1}{m}\|X_{val} w - y_{val}\|^2,$$

searched over the box $\lambda \in [-8, 4]^{10}$. Hypergradient descent (Adam on $\lambda$, with
implicit or unrolled hypergradients) is compared with grid search over one shared $\lambda$,
random search and TPE, at the same number of inner trainings. The closed form
$w^* = (X^\top X/n + \mathrm{diag}\, e^\lambda)^{-1} X^\top y/n$ checks the hypergradients and
gives the optimum every method is measured against.

    python -m experiments.ridge_l2 [--quick] [--out DIR] [--seed S] [--resume]
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import optuna
import rich.console
import scipy.optimize
from jaxtyping import Array, Float
from sklearn.datasets import load_diabetes

import bilevax as bx

from . import _common


LOWER, UPPER = -8.0, 4.0  # the search box for every λ_i
LAM0 = 0.0  # where hypergradient descent starts: unit strength on every feature
SPLIT = (242, 100, 100)  # train / validation / test
INNER_TOL = 1e-10  # ‖∇_w L‖ at which an inner training stops
INNER_MAX_STEPS = 10_000


class Ridge(eqx.Module):
    """The data, standardised with the training statistics, and the spectrum bounds of
    $X_{tr}^\top X_{tr}/n$ that set the inner solver's step size."""

    train: tuple[Float[Array, "n 10"], Float[Array, " n"]]
    val: tuple[Float[Array, "m 10"], Float[Array, " m"]]
    test: tuple[Float[Array, "k 10"], Float[Array, " k"]]
    eig_min: float = eqx.field(static=True)
    eig_max: float = eqx.field(static=True)


def load(seed: int) -> Ridge:
    """The diabetes data (bundled with scikit-learn), split at random with `seed`."""
    X, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order], y[order]
    n, m, _ = SPLIT
    X = (X - X[:n].mean(0)) / X[:n].std(0)
    y = (y - y[:n].mean()) / y[:n].std()
    eigs = np.linalg.eigvalsh(X[:n].T @ X[:n] / n)
    split = lambda a, b: (jnp.asarray(X[a:b], jnp.float64), jnp.asarray(y[a:b], jnp.float64))
    return Ridge(split(0, n), split(n, n + m), split(n + m, None), float(eigs[0]), float(eigs[-1]))


def inner_loss(w, lam, data):
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)


def outer_loss(w, lam, data):
    del lam
    X, y = data
    return jnp.mean((X @ w - y) ** 2)


def closed_form_params(lam, data):
    X, y = data
    n = X.shape[0]
    return jnp.linalg.solve(X.T @ X / n + jnp.diag(jnp.exp(lam)), X.T @ y / n)


def closed_form_loss(lam, problem: Ridge):
    """E(w*(λ)) with the exact w*: its gradient is the reference hypergradient."""
    return outer_loss(closed_form_params(lam, problem.train), lam, problem.val)


def solver(lam, problem: Ridge) -> bx.GradientDescent:
    # Heavy ball with the optimal step and momentum for the Hessian's spectrum bounds
    # [eig_min + min e^λ, eig_max + max e^λ]: converges for every λ in the box, in O(√κ)
    # steps. The step is a tuning choice, not a function to differentiate through.
    strength = jnp.exp(jax.lax.stop_gradient(lam))
    big = jnp.sqrt(problem.eig_max + jnp.max(strength))
    small = jnp.sqrt(problem.eig_min + jnp.min(strength))
    return bx.GradientDescent(4 / (big + small) ** 2, ((big - small) / (big + small)) ** 2)


def _relerr(a, b):
    return jnp.linalg.norm(a - b) / jnp.linalg.norm(b)


def _train(lam, init, problem: Ridge):
    return bx.inner_solve(
        inner_loss,
        init,
        lam,
        problem.train,
        solver=lambda lam: solver(lam, problem),
        max_steps=INNER_MAX_STEPS,
        tol=INNER_TOL,
    )


@eqx.filter_jit
def implicit_hypergrad(lam, w_warm, problem: Ridge):
    """One inner training (warm-started) and the implicit hypergradient at its solution."""
    sol = _train(lam, w_warm, problem)
    value, hgrad = bx.implicit_hypergrad(
        outer_loss,
        inner_loss,
        sol.params,
        lam,
        problem.train,
        problem.val,
        linear_solver=lx.CG(rtol=1e-12, atol=1e-12),
    )
    return value, hgrad, sol.params


@eqx.filter_jit
def unrolled_hypergrad(lam, w_warm, problem: Ridge, num_steps: int):
    """`num_steps` inner steps from zero, differentiated in reverse mode through the steps."""
    value, hgrad = bx.unrolled_hypergrad(
        outer_loss,
        inner_loss,
        jnp.zeros_like(w_warm),
        lam,
        problem.train,
        problem.val,
        solver=lambda lam: solver(lam, problem),
        num_steps=num_steps,
    )
    # No warm start to pass on: each unrolled run starts from zero, as in Franceschi et al.
    return value, hgrad, w_warm


# The learning rate lives in the optimiser state, so one compiled step serves every rate.
HYPER_OPTIMIZER = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)


@eqx.filter_jit
def _hyper_step(lam, hgrad, opt_state, problem: Ridge):
    reference = jax.grad(closed_form_loss)(lam, problem)
    # optax's Adam computes `b1**count` with an int32 count, which strict dtype promotion
    # (as the test suite sets it) rejects.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = HYPER_OPTIMIZER.update(hgrad, opt_state)
    # Projected Adam: the optimum has coordinates on the box's faces.
    lam_next = jnp.clip(optax.apply_updates(lam, updates), LOWER, UPPER)
    return lam_next, opt_state, _relerr(hgrad, reference)


def hypergradient_descent(
    method: str,
    problem: Ridge,
    budget: int,
    ckpt: _common.Checkpoints,
    *,
    learning_rate: float = 0.5,
    unrolled_steps: int = 2000,
) -> dict:
    """Projected Adam on λ with one inner training per step, checkpointed after every step.

    **Arguments:**

    - `method`: `"implicit"` (inner training to `INNER_TOL`, warm-started from the previous
        solution, then the implicit hypergradient) or `"unrolled"` (`unrolled_steps` steps
        from zero, reverse-mode through them).
    - `problem`: the data.
    - `budget`: the number of hypergradient steps, i.e. of inner trainings.
    - `ckpt`: where the state goes after each step; a resumed run continues from it.

    **Returns:**

    The run's history: `lam` and `val_loss` at every step, the relative error of each
    hypergradient against the closed form, and the final `lam`.
    """
    name = f"hgd_{method}"
    if method == "implicit":
        step = lambda lam, w: implicit_hypergrad(lam, w, problem)
    elif method == "unrolled":
        step = lambda lam, w: unrolled_hypergrad(lam, w, problem, unrolled_steps)
    else:
        raise ValueError(f"`method` must be 'implicit' or 'unrolled', got {method!r}.")
    d = problem.train[0].shape[1]
    lam = jnp.full(d, LAM0, jnp.float64)
    opt_state = HYPER_OPTIMIZER.init(lam)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float64)
    fresh = dict(
        step=0,
        lam=lam,
        w=jnp.zeros(d, jnp.float64),
        opt_state=opt_state,
        history=dict(lam=[], val_loss=[], relerr=[]),
    )
    state = ckpt.load(name, fresh)
    lam, w, opt_state, history = state["lam"], state["w"], state["opt_state"], state["history"]
    with _common.progress(f"HGD ({method})", budget, state["step"]) as advance:
        for k in range(state["step"], budget):
            value, hgrad, w = step(lam, w)
            history["lam"].append(np.asarray(lam))
            lam, opt_state, relerr = _hyper_step(lam, hgrad, opt_state, problem)
            history["val_loss"].append(float(value))
            history["relerr"].append(float(relerr))
            ckpt.save(name, dict(step=k + 1, lam=lam, w=w, opt_state=opt_state, history=history))
            advance(f"val {float(value):.5f}  relerr {float(relerr):.1e}")
    history["final_lam"] = np.asarray(lam)
    return history


@eqx.filter_jit
def _train_and_validate(lam, problem: Ridge):
    sol = _train(lam, jnp.zeros_like(lam), problem)
    return outer_loss(sol.params, lam, problem.val)


def grid_search(problem: Ridge, budget: int) -> dict:
    """One shared strength for all features, on `budget` evenly spaced values of λ."""
    d = problem.train[0].shape[1]
    history = dict(lam=[], val_loss=[])
    with _common.progress("grid (shared λ)", budget) as advance:
        for c in np.linspace(LOWER, UPPER, budget):
            lam = jnp.full(d, c, jnp.float64)
            history["lam"].append(np.asarray(lam))
            history["val_loss"].append(float(_train_and_validate(lam, problem)))
            advance(f"λ {c:+.2f}")
    return history


def optuna_search(problem: Ridge, budget: int, sampler: optuna.samplers.BaseSampler, label):
    """`budget` trials of `sampler` over the box, one inner training per trial."""
    d = problem.train[0].shape[1]
    history = dict(lam=[], val_loss=[])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    with _common.progress(label, budget) as advance:
        for _ in range(budget):
            trial = study.ask()
            lam = jnp.asarray([trial.suggest_float(f"lam{i}", LOWER, UPPER) for i in range(d)])
            value = float(_train_and_validate(lam, problem))
            study.tell(trial, value)
            history["lam"].append(np.asarray(lam))
            history["val_loss"].append(value)
            advance(f"best {study.best_value:.5f}")
    return history


def closed_form_optimum(problem: Ridge, seed: int, restarts: int = 4) -> dict:
    """L-BFGS-B on the closed-form validation loss over the box, from λ0 and random points."""
    value_and_grad = jax.jit(jax.value_and_grad(closed_form_loss))
    fun = lambda x: tuple(
        np.asarray(v, np.float64) for v in value_and_grad(jnp.asarray(x), problem)
    )
    d = problem.train[0].shape[1]
    rng = np.random.default_rng(seed)
    starts = [np.full(d, LAM0)] + [rng.uniform(LOWER, UPPER, d) for _ in range(restarts)]
    best, nfev = None, 0
    for x0 in starts:
        r = scipy.optimize.minimize(
            fun,
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=[(LOWER, UPPER)] * d,
            options=dict(maxiter=1000, ftol=1e-15, gtol=1e-12),
        )
        nfev += r.nfev
        if best is None or r.fun < best.fun:
            best = r
    assert best is not None
    return dict(lam=np.asarray(best.x), val_loss=float(best.fun), nfev=nfev)


def held_out_loss(lam, problem: Ridge) -> float:
    """Test loss of the exact inner solution at `lam` (what every inner training approximates
    to `INNER_TOL`)."""
    lam = jnp.asarray(lam, jnp.float64)
    return float(outer_loss(closed_form_params(lam, problem.train), lam, problem.test))


def summarise(history: dict, problem: Ridge) -> dict:
    """The λ with the best validation loss seen, its test loss, and the best-so-far curve."""
    vals = np.asarray(history["val_loss"])
    best = int(np.argmin(vals))
    summary = dict(
        val_loss=float(vals[best]),
        test_loss=held_out_loss(history["lam"][best], problem),
        inner_trainings=len(vals),
        lam=np.asarray(history["lam"][best]),
        best_so_far=np.minimum.accumulate(vals),
    )
    if "relerr" in history:
        relerr = np.asarray(history["relerr"])
        summary.update(
            hypergrad_relerr_initial=relerr[0],
            hypergrad_relerr_max=relerr.max(),
            hypergrad_relerr_median=np.median(relerr),
            hypergrad_relerr=relerr,
            final_lam=history["final_lam"],
        )
    return summary


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    optimum = results["closed_form"]["val_loss"]
    for name, label in METHODS.items():
        curve = np.asarray(results[name]["best_so_far"])
        trainings = np.arange(1, len(curve) + 1)
        # The two hypergradient runs coincide to plotting accuracy: dash one to show both.
        style = dict(label=label, ls="--" if name == "hgd_unrolled" else "-")
        left.plot(trainings, curve, **style)
        # The optimiser's optimum can sit a hair above a visited point: floor the gap.
        middle.semilogy(trainings, np.maximum(curve - optimum, 1e-8), **style)
        if "hypergrad_relerr" in results[name]:
            right.semilogy(results[name]["hypergrad_relerr"], **style)
    left.axhline(optimum, color="k", ls="--", lw=1, label="closed-form optimum")
    left.set(
        xlabel="inner trainings",
        ylabel="best validation MSE so far",
        title="Per-feature L2 on diabetes",
        ylim=(optimum - 0.005, optimum + 0.05),
    )
    left.legend()
    middle.set(
        xlabel="inner trainings",
        ylabel="best so far − closed-form optimum",
        title="Gap to the optimum",
    )
    right.set(
        xlabel="hypergradient step",
        ylabel="relative error vs closed form",
        title="Hypergradient accuracy along the run",
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METHODS = {
    "hgd_implicit": "HGD, implicit",
    "hgd_unrolled": "HGD, unrolled",
    "grid": "grid (shared λ)",
    "random": "random search",
    "tpe": "TPE",
}


def main(argv=None) -> dict:
    p = _common.parser("ridge_l2", __doc__.splitlines()[0])
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="inner trainings per method (default 200, 50 with --quick)",
    )
    p.add_argument("--unrolled-steps", type=int, default=2000, help="T for unrolled HGD")
    p.add_argument("--lr", type=float, default=0.5, help="Adam's learning rate on λ")
    args = p.parse_args(argv)
    out = _common.setup(args)
    budget = args.budget or (50 if args.quick else 200)
    ckpt = _common.Checkpoints(out, args.resume)
    problem = load(args.seed)
    start = time.perf_counter()

    histories, timings = {}, {}
    runs = {
        "hgd_implicit": lambda: hypergradient_descent(
            "implicit", problem, budget, ckpt, learning_rate=args.lr
        ),
        "hgd_unrolled": lambda: hypergradient_descent(
            "unrolled",
            problem,
            budget,
            ckpt,
            learning_rate=args.lr,
            unrolled_steps=args.unrolled_steps,
        ),
        "grid": lambda: grid_search(problem, budget),
        "random": lambda: optuna_search(
            problem, budget, optuna.samplers.RandomSampler(seed=args.seed), "random search"
        ),
        "tpe": lambda: optuna_search(
            problem, budget, optuna.samplers.TPESampler(seed=args.seed), "TPE"
        ),
    }
    for name, run in runs.items():
        # A finished method is stored whole, so that a resumed run skips it.
        tic = time.perf_counter()
        done = ckpt.load(f"{name}_done")
        histories[name] = done if done and len(done["val_loss"]) == budget else run()
        ckpt.save(f"{name}_done", histories[name])
        timings[name] = time.perf_counter() - tic

    optimum = closed_form_optimum(problem, args.seed)
    lam0 = jnp.full(problem.train[0].shape[1], LAM0, jnp.float64)
    results = {name: summarise(h, problem) for name, h in histories.items()}
    results["closed_form"] = dict(
        val_loss=optimum["val_loss"],
        test_loss=held_out_loss(optimum["lam"], problem),
        inner_trainings=0,
        closed_form_solves=optimum["nfev"],
        lam=optimum["lam"],
        hypergrad_at_lam0=jax.grad(closed_form_loss)(lam0, problem),
    )
    for name in METHODS:
        results[name]["gap_to_optimum"] = results[name]["val_loss"] - optimum["val_loss"]
        results[name]["seconds"] = timings[name]
    results["config"] = dict(
        budget=budget,
        unrolled_steps=args.unrolled_steps,
        lr=args.lr,
        seed=args.seed,
        box=(LOWER, UPPER),
        lam0=LAM0,
        split=SPLIT,
        seconds=time.perf_counter() - start,
    )

    print_table(results)
    plot(results, out / "ridge_l2.png")
    path = _common.write_results(out, results)
    _common.console.print(f"Wrote {path} and {out / 'ridge_l2.png'}")
    return results


def print_table(results: dict) -> None:
    from rich.table import Table

    table = Table(title="Per-feature L2 for ridge regression on diabetes (MSE, standardised y)")
    for column in (
        "method",
        "best val loss",
        "gap to optimum",
        "test loss",
        "inner trainings",
        "hypergrad relerr (start / max)",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, label in [*METHODS.items(), ("closed_form", "closed-form optimum")]:
        r = results[name]
        relerr = (
            f"{r['hypergrad_relerr_initial']:.1e} / {r['hypergrad_relerr_max']:.1e}"
            if "hypergrad_relerr_initial" in r
            else ""
        )
        table.add_row(
            label,
            f"{r['val_loss']:.5f}",
            f"{r.get('gap_to_optimum', 0.0):.5f}",
            f"{r['test_loss']:.5f}",
            str(r["inner_trainings"]),
            relerr,
        )
    rich.console.Console(width=120).print(table)


if __name__ == "__main__":
    main()
