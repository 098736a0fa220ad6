r"""Per-feature L2 hyperparameter optimisation for ridge regression (the main demo).

Ten hyperparameters $\lambda_i$, the log L2 strengths of the diabetes data's ten features:

$$L(w, \lambda) = \tfrac{1}{2n}\|X_{tr} w - y_{tr}\|^2 + \tfrac12 \sum_i e^{\lambda_i} w_i^2,
  \qquad E(w) = \tfrac{1}{m}\|X_{val} w - y_{val}\|^2,$$

searched over the box $\lambda \in [-8, 4]^{10}$. Hypergradient descent (Adam on $\lambda$, with
implicit or unrolled hypergradients) is compared with grid search over one shared $\lambda$,
random search and TPE, at the same number of inner trainings. The closed form
$w^* = (X^\top X/n + \mathrm{diag}\, e^\lambda)^{-1} X^\top y/n$ checks the hypergradients and
gives the optimum every method is measured against.

Every method's state is checkpointed as it goes (`--resume` continues a killed run). In
`results.json`, `log_lam` fields hold log strengths $\lambda$ (the penalty is $e^\lambda$).

    python -m experiments.ridge_l2 [--quick] [--out DIR] [--seed S] [--resume | --overwrite]
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import optuna
from jaxtyping import Array, Float

import bilevax as bx

from . import _common, _search, problems
from .problems import mse as outer_loss, ridge_loss as inner_loss


LOWER, UPPER = -8.0, 4.0  # the search box for every λ_i
LAM0 = 0.0  # where hypergradient descent starts: unit strength on every feature
SPLIT = problems.DIABETES_SPLIT  # train / validation / test
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
    train, val, test = problems.diabetes(seed, SPLIT)
    eigs = problems.gram_eigenvalues(train[0])
    return Ridge(train, val, test, float(eigs[0]), float(eigs[-1]))


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
    # Projected Adam: the optimum has coordinates on the box's faces.
    box = lambda lam: jnp.clip(lam, LOWER, UPPER)
    lam_next, opt_state = _common.optax_step(HYPER_OPTIMIZER, hgrad, opt_state, lam, project=box)
    return lam_next, opt_state, problems.relerr(hgrad, reference)


def hypergradient_descent(
    method: str,
    problem: Ridge,
    budget: int,
    run: _common.Run,
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
    - `run`: the run; a resumed run continues from the checkpoint.

    **Returns:**

    The run's history: `log_lam` and `val_loss` at every step, the relative error of each
    hypergradient against the closed form, the final `log_lam`, and the seconds spent.
    """
    if method == "implicit":
        hypergrad = lambda lam, w: implicit_hypergrad(lam, w, problem)
    elif method == "unrolled":
        hypergrad = lambda lam, w: unrolled_hypergrad(lam, w, problem, unrolled_steps)
    else:
        raise ValueError(f"`method` must be 'implicit' or 'unrolled', got {method!r}.")
    d = problem.train[0].shape[1]

    def fresh():
        lam = jnp.full(d, LAM0, jnp.float64)
        opt_state = HYPER_OPTIMIZER.init(lam)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float64)
        history = dict(log_lam=[], val_loss=[], relerr=[])
        return dict(lam=lam, w=jnp.zeros(d, jnp.float64), opt_state=opt_state, history=history)

    def step(k, state):
        history = state["history"]
        value, hgrad, state["w"] = hypergrad(state["lam"], state["w"])
        history["log_lam"].append(np.asarray(state["lam"]))
        state["lam"], state["opt_state"], relerr = _hyper_step(
            state["lam"], hgrad, state["opt_state"], problem
        )
        history["val_loss"].append(float(value))
        history["relerr"].append(float(relerr))
        best = min(history["val_loss"])
        return state, f"val {float(value):.5f}  best {best:.5f}  relerr {float(relerr):.1e}"

    state = run.loop(f"hgd_{method}", budget, fresh, step, description=f"HGD ({method})")
    return dict(state["history"], final_log_lam=np.asarray(state["lam"]), seconds=state["seconds"])


@eqx.filter_jit
def _train_and_validate(lam, problem: Ridge):
    sol = _train(lam, jnp.zeros_like(lam), problem)
    return outer_loss(sol.params, lam, problem.val)


def grid_search(problem: Ridge, budget: int, run: _common.Run) -> dict:
    """One shared strength for all features, on `budget` evenly spaced values of λ."""
    d = problem.train[0].shape[1]
    grid = np.linspace(LOWER, UPPER, budget)

    def step(k, state):
        history = state["history"]
        lam = jnp.full(d, grid[k], jnp.float64)
        history["log_lam"].append(np.asarray(lam))
        history["val_loss"].append(float(_train_and_validate(lam, problem)))
        best = int(np.argmin(history["val_loss"]))
        return state, f"best {history['val_loss'][best]:.5f} at λ {grid[best]:+.2f}"

    fresh = lambda: dict(history=dict(log_lam=[], val_loss=[]))
    state = run.loop("grid", budget, fresh, step, description="grid (shared λ)", every=10)
    return dict(state["history"], seconds=state["seconds"])


def optuna_search(problem: Ridge, budget: int, method: str, seed: int, run: _common.Run) -> dict:
    """`budget` trials of random search or TPE (`method`) over the box, one inner training
    per trial."""
    d = problem.train[0].shape[1]
    distributions = {
        f"lam{i}": optuna.distributions.FloatDistribution(LOWER, UPPER) for i in range(d)
    }

    def objective(k, params):
        lam = jnp.asarray([params[f"lam{i}"] for i in range(d)])
        value = float(_train_and_validate(lam, problem))
        return value, dict(log_lam=np.asarray(lam))

    state = _search.search(
        run,
        method,
        budget,
        _search.sampler(method, seed),
        distributions,
        objective,
        description=METHODS[method],
        every=10,
    )
    trials = state["trials"]
    return dict(
        log_lam=[t["log_lam"] for t in trials],
        val_loss=[t["value"] for t in trials],
        seconds=state["seconds"],
    )


def closed_form_optimum(problem: Ridge, seed: int, restarts: int = 4) -> dict:
    """L-BFGS-B on the closed-form validation loss over the box, from λ0 and random points."""
    value_and_grad = jax.jit(jax.value_and_grad(closed_form_loss))
    fun = lambda x: tuple(
        np.asarray(v, np.float64) for v in value_and_grad(jnp.asarray(x), problem)
    )
    d = problem.train[0].shape[1]
    rng = np.random.default_rng(seed)
    starts = [np.full(d, LAM0)] + [rng.uniform(LOWER, UPPER, d) for _ in range(restarts)]
    best, nfev = problems.lbfgsb_from(fun, starts, [(LOWER, UPPER)] * d)
    return dict(log_lam=np.asarray(best.x), val_loss=float(best.fun), nfev=nfev)


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
        test_loss=held_out_loss(history["log_lam"][best], problem),
        inner_trainings=len(vals),
        log_lam=np.asarray(history["log_lam"][best]),
        best_so_far=np.minimum.accumulate(vals),
        seconds=history["seconds"],
    )
    if "relerr" in history:
        relerr = np.asarray(history["relerr"])
        summary.update(
            hypergrad_relerr_initial=relerr[0],
            hypergrad_relerr_max=relerr.max(),
            hypergrad_relerr_median=np.median(relerr),
            hypergrad_relerr=relerr,
            final_log_lam=history["final_log_lam"],
        )
    return summary


def plot(results: dict, path):
    plt = _common.pyplot()
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
    return _common.save_figure(fig, path)


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
    args.budget = args.budget or (50 if args.quick else 200)
    run = _common.start(args)
    budget = args.budget
    problem = load(args.seed)

    histories = {
        "hgd_implicit": hypergradient_descent(
            "implicit", problem, budget, run, learning_rate=args.lr
        ),
        "hgd_unrolled": hypergradient_descent(
            "unrolled",
            problem,
            budget,
            run,
            learning_rate=args.lr,
            unrolled_steps=args.unrolled_steps,
        ),
        "grid": grid_search(problem, budget, run),
        "random": optuna_search(problem, budget, "random", args.seed, run),
        "tpe": optuna_search(problem, budget, "tpe", args.seed, run),
    }
    optimum = closed_form_optimum(problem, args.seed)
    lam0 = jnp.full(problem.train[0].shape[1], LAM0, jnp.float64)
    results = {name: summarise(h, problem) for name, h in histories.items()}
    results["closed_form"] = dict(
        val_loss=optimum["val_loss"],
        test_loss=held_out_loss(optimum["log_lam"], problem),
        inner_trainings=0,
        closed_form_solves=optimum["nfev"],
        log_lam=optimum["log_lam"],
        hypergrad_at_log_lam0=jax.grad(closed_form_loss)(lam0, problem),
    )
    for name in METHODS:
        results[name]["gap_to_optimum"] = results[name]["val_loss"] - optimum["val_loss"]
    results["config"] = dict(run.config, log_lam_box=(LOWER, UPPER), log_lam0=LAM0, split=SPLIT)
    print_table(results)
    return run.finish(results, {"ridge_l2.png": lambda path: plot(results, path)})


def print_table(results: dict) -> None:
    rows = []
    for name, label in [*METHODS.items(), ("closed_form", "closed-form optimum")]:
        r = results[name]
        relerr = (
            f"{r['hypergrad_relerr_initial']:.1e} / {r['hypergrad_relerr_max']:.1e}"
            if "hypergrad_relerr_initial" in r
            else ""
        )
        rows.append(
            (
                label,
                f"{r['val_loss']:.5f}",
                f"{r.get('gap_to_optimum', 0.0):.5f}",
                f"{r['test_loss']:.5f}",
                str(r["inner_trainings"]),
                relerr,
            )
        )
    _common.print_table(
        "Per-feature L2 for ridge regression on diabetes (MSE, standardised y)",
        ("method", "best val loss", "gap to optimum", "test loss", "inner trainings",
         "hypergrad relerr (start / max)"),
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    _common.cli(main)
