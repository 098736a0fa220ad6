r"""Per-feature L2 hyperparameter optimisation for ridge regression by K-fold cross-validation
(the main demo).

Ten hyperparameters $\lambda_i$, the log L2 strengths of the diabetes data's ten features. The
340 points not held out for testing are cut into $K$ folds; fold $k$'s inner problem fits the
weights on the other $K - 1$ folds and its outer loss scores them on fold $k$:

$$L(w, \lambda; D_{-k}) = \tfrac{1}{2|D_{-k}|}\|X_{-k} w - y_{-k}\|^2
  + \tfrac12 \sum_i e^{\lambda_i} w_i^2, \qquad
  \mathrm{CV}(\lambda) = \frac1K \sum_k \tfrac{1}{|D_k|}\|X_k w_k^*(\lambda) - y_k\|^2,$$

the cross-validation loss a practitioner would tune on, searched over the box
$\lambda \in [-8, 4]^{10}$. The $K$ inner problems are solved in one `jax.vmap` (each stops on
its own convergence test), and `jax.grad` differentiates their mean through `inner_solve`.
Hypergradient descent (Adam on $\lambda$, with implicit or unrolled hypergradients) is compared
with grid search over one shared $\lambda$, random search and TPE, at the same number of
cross-validations ($K$ inner trainings each). Every method's test loss refits the weights on all
340 points at its chosen $\lambda$ and scores them on the 102 held-out points. The closed form
$w^* = (X^\top X/n + \mathrm{diag}\, e^\lambda)^{-1} X^\top y/n$ checks the hypergradients and
gives the optimum every method is measured against.

Every method's state is checkpointed as it goes (`--resume` continues a killed run). In
`results.json`, `log_lam` fields hold log strengths $\lambda$ (the penalty is $e^\lambda$) and
`cv_loss` fields the K-fold cross-validation loss.

    python -m experiments.ridge_l2 [--quick] [--folds K] [--out DIR] [--seed S]
                                   [--resume | --overwrite]
"""

import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import optuna
from jaxtyping import Array, Float

import bilevax as bx

from . import _cli, _console, _harness, _optuna, _outputs, problems
from ._optax import optax_step
from .problems import mse as outer_loss, ridge_loss as inner_loss


LOWER, UPPER = -8.0, 4.0  # the search box for every λ_i
LAM0 = 0.0  # where hypergradient descent starts: unit strength on every feature
SPLIT = (340, 0, 102)  # cross-validation / (no separate validation) / test
INNER_TOL = 1e-10  # ‖∇_w L‖ at which an inner training stops
INNER_MAX_STEPS = 10_000


class Ridge(eqx.Module):
    """The data, standardised with the cross-validation part's statistics, cut into folds, and
    the spectrum bounds of the folds' $X_{-k}^\top X_{-k}/n$ that set the inner solver's step
    size.

    `fold_train` and `fold_val` stack the $K$ folds' training and held-out parts on a leading
    axis; `cv` is all of the cross-validation part (the final refit) and `test` the hold-out.
    """

    fold_train: tuple[Float[Array, "K n 10"], Float[Array, "K n"]]
    fold_val: tuple[Float[Array, "K m 10"], Float[Array, "K m"]]
    cv: tuple[Float[Array, "N 10"], Float[Array, " N"]]
    test: tuple[Float[Array, "k 10"], Float[Array, " k"]]
    eig_min: float = eqx.field(static=True)
    eig_max: float = eqx.field(static=True)

    @property
    def folds(self) -> int:
        return self.fold_train[1].shape[0]


def check_folds(folds: int) -> None:
    if folds < 2 or SPLIT[0] % folds:
        raise ValueError(f"`folds` must be at least 2 and divide {SPLIT[0]}, got {folds}.")


def load(seed: int, folds: int = 5) -> Ridge:
    """The diabetes data (bundled with scikit-learn) in a random order drawn with `seed`: 340
    points cut into `folds` contiguous folds, and 102 held out for testing."""
    check_folds(folds)
    cv, _, test = problems.diabetes(seed, SPLIT)
    X, y = map(np.asarray, cv)
    held_out = np.arange(len(y)).reshape(folds, -1)
    kept = np.stack([np.setdiff1d(np.arange(len(y)), h) for h in held_out])
    fold_train = (jnp.asarray(X[kept]), jnp.asarray(y[kept]))
    fold_val = (jnp.asarray(X[held_out]), jnp.asarray(y[held_out]))
    eigs = np.stack([problems.gram_eigenvalues(X[k]) for k in kept])
    return Ridge(fold_train, fold_val, cv, test, float(eigs.min()), float(eigs.max()))


def closed_form_params(lam, data):
    X, y = data
    n = X.shape[0]
    return jnp.linalg.solve(X.T @ X / n + jnp.diag(jnp.exp(lam)), X.T @ y / n)


def _fold_losses(params, lam, problem: Ridge):
    """Each fold's held-out loss, given the folds' fitted weights stacked on axis 0."""
    return jax.vmap(outer_loss, in_axes=(0, None, 0))(params, lam, problem.fold_val)


def closed_form_cv_loss(lam, problem: Ridge):
    """CV(λ) with the exact w*_k: its gradient is the reference hypergradient."""
    params = jax.vmap(closed_form_params, in_axes=(None, 0))(lam, problem.fold_train)
    return jnp.mean(_fold_losses(params, lam, problem))


def solver(lam, problem: Ridge) -> bx.GradientDescent:
    # Heavy ball with the optimal step and momentum for the Hessian's spectrum bounds
    # [eig_min + min e^λ, eig_max + max e^λ] (over all folds): converges for every λ in the
    # box, in O(√κ) steps. The step is a tuning choice, not a function to differentiate through.
    strength = jnp.exp(jax.lax.stop_gradient(lam))
    big = jnp.sqrt(problem.eig_max + jnp.max(strength))
    small = jnp.sqrt(problem.eig_min + jnp.min(strength))
    return bx.GradientDescent(4 / (big + small) ** 2, ((big - small) / (big + small)) ** 2)


def _train(lam, init, problem: Ridge, adjoint=bx.ImplicitAdjoint()):
    """The K folds' inner trainings in one `vmap`, from `init` (K × d)."""
    train_fold = lambda init, data: bx.inner_solve(
        inner_loss,
        init,
        lam,
        data,
        solver=lambda lam: solver(lam, problem),
        max_steps=INNER_MAX_STEPS,
        tol=INNER_TOL,
        adjoint=adjoint,
    )
    return jax.vmap(train_fold)(init, problem.fold_train)


@eqx.filter_jit
def implicit_hypergrad(lam, w_warm, problem: Ridge):
    """The K folds' inner trainings (each warm-started from its last solution) and the implicit
    hypergradient of their mean held-out loss: `jax.grad` through a vmapped `inner_solve`."""
    # Tight CG: the run's hypergradients are checked against the closed form to 1e-6.
    adjoint = bx.ImplicitAdjoint(linear_solver=lx.CG(rtol=1e-12, atol=1e-12))

    def cv_loss(lam):
        params = _train(lam, w_warm, problem, adjoint).params
        return jnp.mean(_fold_losses(params, lam, problem)), params

    (value, params), hgrad = jax.value_and_grad(cv_loss, has_aux=True)(lam)
    return value, hgrad, params


@eqx.filter_jit
def unrolled_hypergrad(lam, w_warm, problem: Ridge, num_steps: int):
    """`num_steps` inner steps from zero on every fold, differentiated in reverse mode through
    the steps."""
    fold_hypergrad = lambda train, val: bx.unrolled_hypergrad(
        outer_loss,
        inner_loss,
        jnp.zeros(w_warm.shape[1:], w_warm.dtype),
        lam,
        train,
        val,
        solver=lambda lam: solver(lam, problem),
        num_steps=num_steps,
    )
    values, hgrads = jax.vmap(fold_hypergrad)(problem.fold_train, problem.fold_val)
    # No warm start to pass on: each unrolled run starts from zero, as in Franceschi et al.
    return jnp.mean(values), jnp.mean(hgrads, axis=0), w_warm


# The learning rate lives in the optimiser state, so one compiled step serves every rate.
HYPER_OPTIMIZER = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)


@eqx.filter_jit
def _hyper_step(lam, hgrad, opt_state, problem: Ridge):
    reference = jax.grad(closed_form_cv_loss)(lam, problem)
    # Projected Adam: the optimum has coordinates on the box's faces.
    box = lambda lam: jnp.clip(lam, LOWER, UPPER)
    lam_next, opt_state = optax_step(HYPER_OPTIMIZER, hgrad, opt_state, lam, project=box)
    return lam_next, opt_state, problems.relerr(hgrad, reference)


def hypergradient_descent(
    method: str,
    problem: Ridge,
    budget: int,
    run: _harness.Run,
    *,
    learning_rate: float = 0.5,
    unrolled_steps: int = 2000,
) -> dict:
    """Projected Adam on λ with one cross-validation (K inner trainings) per step,
    checkpointed after every step.

    **Arguments:**

    - `method`: `"implicit"` (the folds' inner trainings to `INNER_TOL`, each warm-started
        from its previous solution, then the implicit hypergradient) or `"unrolled"`
        (`unrolled_steps` steps from zero, reverse-mode through them).
    - `problem`: the data.
    - `budget`: the number of hypergradient steps, i.e. of cross-validations.
    - `run`: the run; a resumed run continues from the checkpoint.

    **Returns:**

    The run's history: `log_lam` and `cv_loss` at every step, the relative error of each
    hypergradient against the closed form, the final `log_lam`, and the seconds spent.
    """
    if method == "implicit":
        hypergrad = lambda lam, w: implicit_hypergrad(lam, w, problem)
    elif method == "unrolled":
        hypergrad = lambda lam, w: unrolled_hypergrad(lam, w, problem, unrolled_steps)
    else:
        raise ValueError(f"`method` must be 'implicit' or 'unrolled', got {method!r}.")
    d = problem.cv[0].shape[1]

    def fresh():
        lam = jnp.full(d, LAM0, jnp.float64)
        opt_state = HYPER_OPTIMIZER.init(lam)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float64)
        history = dict(log_lam=[], cv_loss=[], relerr=[])
        w = jnp.zeros((problem.folds, d), jnp.float64)  # one warm start per fold
        return dict(lam=lam, w=w, opt_state=opt_state, history=history)

    def step(k, state):
        history = state["history"]
        value, hgrad, state["w"] = hypergrad(state["lam"], state["w"])
        history["log_lam"].append(np.asarray(state["lam"]))
        state["lam"], state["opt_state"], relerr = _hyper_step(
            state["lam"], hgrad, state["opt_state"], problem
        )
        history["cv_loss"].append(float(value))
        history["relerr"].append(float(relerr))
        best = min(history["cv_loss"])
        return state, f"CV {float(value):.5f}  best {best:.5f}  relerr {float(relerr):.1e}"

    state = run.loop(f"hgd_{method}", budget, fresh, step, description=f"HGD ({method})")
    return dict(state["history"], final_log_lam=np.asarray(state["lam"]), seconds=state["seconds"])


@eqx.filter_jit
def _train_and_validate(lam, problem: Ridge):
    """One cross-validation: the K folds' inner trainings from zero, and their mean held-out
    loss."""
    sol = _train(lam, jnp.zeros((problem.folds, *lam.shape), lam.dtype), problem)
    return jnp.mean(_fold_losses(sol.params, lam, problem))


def grid_search(problem: Ridge, budget: int, run: _harness.Run) -> dict:
    """One shared strength for all features, on `budget` evenly spaced values of λ."""
    d = problem.cv[0].shape[1]
    grid = np.linspace(LOWER, UPPER, budget)

    def step(k, state):
        history = state["history"]
        lam = jnp.full(d, grid[k], jnp.float64)
        history["log_lam"].append(np.asarray(lam))
        history["cv_loss"].append(float(_train_and_validate(lam, problem)))
        best = int(np.argmin(history["cv_loss"]))
        return state, f"best {history['cv_loss'][best]:.5f} at λ {grid[best]:+.2f}"

    fresh = lambda: dict(history=dict(log_lam=[], cv_loss=[]))
    state = run.loop("grid", budget, fresh, step, description="grid (shared λ)", every=10)
    return dict(state["history"], seconds=state["seconds"])


def optuna_search(problem: Ridge, budget: int, method: str, seed: int, run: _harness.Run) -> dict:
    """`budget` trials of random search or TPE (`method`) over the box, one cross-validation
    per trial."""
    d = problem.cv[0].shape[1]
    distributions = {
        f"lam{i}": optuna.distributions.FloatDistribution(LOWER, UPPER) for i in range(d)
    }

    def objective(k, params):
        lam = jnp.asarray([params[f"lam{i}"] for i in range(d)])
        value = float(_train_and_validate(lam, problem))
        return value, dict(log_lam=np.asarray(lam))

    state = _optuna.search(
        run,
        method,
        budget,
        _optuna.sampler(method, seed),
        distributions,
        objective,
        description=METHODS[method],
        every=10,
    )
    trials = state["trials"]
    return dict(
        log_lam=[t["log_lam"] for t in trials],
        cv_loss=[t["value"] for t in trials],
        seconds=state["seconds"],
    )


def closed_form_optimum(problem: Ridge, seed: int, restarts: int = 4) -> dict:
    """L-BFGS-B on the closed-form CV loss over the box, from λ0 and random points."""
    value_and_grad = jax.jit(jax.value_and_grad(closed_form_cv_loss))
    fun = lambda x: tuple(
        np.asarray(v, np.float64) for v in value_and_grad(jnp.asarray(x), problem)
    )
    d = problem.cv[0].shape[1]
    rng = np.random.default_rng(seed)
    starts = [np.full(d, LAM0)] + [rng.uniform(LOWER, UPPER, d) for _ in range(restarts)]
    best, nfev = problems.lbfgsb_from(fun, starts, [(LOWER, UPPER)] * d)
    return dict(log_lam=np.asarray(best.x), cv_loss=float(best.fun), nfev=nfev)


def held_out_loss(lam, problem: Ridge) -> float:
    """Test loss at `lam` as a practitioner gets it: the weights refitted on all of the
    cross-validation data (exactly, what an inner training approximates to `INNER_TOL`),
    scored on the held-out test points."""
    lam = jnp.asarray(lam, jnp.float64)
    return float(outer_loss(closed_form_params(lam, problem.cv), lam, problem.test))


def summarise(history: dict, problem: Ridge) -> dict:
    """The λ with the best CV loss seen, its test loss, and the best-so-far curve."""
    vals = np.asarray(history["cv_loss"])
    best = int(np.argmin(vals))
    summary = dict(
        cv_loss=float(vals[best]),
        test_loss=held_out_loss(history["log_lam"][best], problem),
        cross_validations=len(vals),
        inner_trainings=len(vals) * problem.folds,
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


def on_bounds(log_lam, atol: float = 1e-6) -> tuple[list[int], list[int]]:
    """The features whose `log_lam` sits on the search box's lower and upper bounds."""
    log_lam = np.asarray(log_lam)
    return (
        [int(i) for i in np.flatnonzero(np.abs(log_lam - LOWER) <= atol)],
        [int(i) for i in np.flatnonzero(np.abs(log_lam - UPPER) <= atol)],
    )


def bounds_note(results: dict) -> str:
    """A note on the closed-form optimum's coordinates that sit on the box's bounds (empty when
    none do): an optimum over the box sits on a bound only where the CV loss does not rise past
    it, so there the box, not the data, sets the value."""
    lower, upper = on_bounds(results["closed_form"]["log_lam"])
    if not lower and not upper:
        return ""
    names = lambda features: ", ".join(FEATURES[i] for i in features)
    parts = []
    if lower:
        parts.append(f"log λ = {LOWER:+.0f}, the lower bound, on {names(lower)} (left unpenalised)")
    if upper:
        parts.append(f"log λ = {UPPER:+.0f}, the upper bound, on {names(upper)} (switched off)")
    return (
        f"The closed-form optimum sits on the search box [{LOWER:g}, {UPPER:g}]: "
        + "; ".join(parts)
        + ". The CV loss does not rise past these bounds: the box, not the data, sets these values."
    )


def run_label(results: dict) -> str:
    """The run's budget, saying `--quick` when it was one."""
    config = results.get("config", {})
    budget = results["hgd_implicit"]["cross_validations"]
    quick = "--quick run: " if config.get("quick") else ""
    return f"{quick}{budget} cross-validations per method, seed {config.get('seed', '?')}"


def plot(results: dict, path):
    plt = _outputs.pyplot()
    fig, ((best, gap), (accuracy, learned)) = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"Per-feature L2 for ridge on diabetes, 5-fold CV ({run_label(results)})")
    optimum = results["closed_form"]["cv_loss"]
    # The implicit and unrolled runs coincide to plotting accuracy: a thick line under a thin
    # dashed one, with markers at alternate points, shows both.
    styles = {
        "hgd_implicit": dict(lw=3.5, alpha=0.55, marker="o", ms=6),
        "hgd_unrolled": dict(lw=1.2, ls="--", marker="x", ms=7),
    }
    for name, label in METHODS.items():
        curve = np.asarray(results[name]["best_so_far"])
        evaluations = np.arange(1, len(curve) + 1)
        every = max(len(curve) // 10, 1)
        offset = every // 2 if name == "hgd_unrolled" else 0
        style = dict(
            label=label, color=COLORS[name], markevery=(offset, every), **styles.get(name, {})
        )
        best.plot(evaluations, curve, **style)
        # The optimiser's optimum can sit a hair above a visited point: floor the gap.
        gap.semilogy(evaluations, np.maximum(curve - optimum, 1e-8), **style)
        if "hypergrad_relerr" in results[name]:
            relerr = np.asarray(results[name]["hypergrad_relerr"])
            accuracy.semilogy(relerr, **dict(style, markevery=(offset, every)))
    same = np.max(
        np.abs(
            np.asarray(results["hgd_implicit"]["best_so_far"])
            - np.asarray(results["hgd_unrolled"]["best_so_far"])
        )
    )
    gap.text(
        0.98,
        0.97,
        f"implicit and unrolled coincide:\nlargest difference {same:.0e}",
        transform=gap.transAxes,
        ha="right",
        va="top",
        fontsize="small",
    )
    best.axhline(optimum, color="k", ls=":", lw=1, label="closed-form optimum")
    best.set(
        xlabel="cross-validations (K inner trainings each)",
        ylabel="best CV MSE so far",
        title="Best CV loss so far",
        ylim=(optimum - 0.005, optimum + 0.05),
    )
    best.legend()
    gap.set(
        xlabel="cross-validations",
        ylabel="best so far − closed-form optimum",
        title="Gap to the optimum",
    )
    accuracy.set(
        xlabel="hypergradient step",
        ylabel="relative error vs closed form",
        title="Hypergradient accuracy along the run",
    )
    accuracy.legend()
    # Each method's points side by side around its feature (hypergradient descent to the left,
    # the searches to the right), the optimum's star on the feature.
    shifts = dict(zip(METHODS, (-0.36, -0.22, 0.16, 0.28, 0.4)), closed_form=0.0)
    for name, label in [*METHODS.items(), ("closed_form", "closed-form optimum")]:
        log_lam = np.asarray(results[name]["log_lam"])
        shift = shifts[name]
        marker = dict(marker="*", ms=13, zorder=3) if name == "closed_form" else {}
        learned.plot(
            np.arange(len(log_lam)) + shift,
            log_lam,
            ls="none",
            color=COLORS[name],
            **(marker or dict(marker="x" if name == "hgd_unrolled" else "o", ms=6)),
            label=label,
        )
    for bound in (LOWER, UPPER):
        learned.axhline(bound, color="0.4", ls=":", lw=1)
    learned.text(
        -0.45, UPPER + 0.2, f"search box bound ({UPPER:+g})", fontsize="small", va="bottom"
    )
    learned.text(-0.45, LOWER - 0.2, f"search box bound ({LOWER:+g})", fontsize="small", va="top")
    lower, upper = on_bounds(results["closed_form"]["log_lam"])
    for i in lower + upper:
        learned.annotate(
            "optimum\non bound",
            (i, LOWER if i in lower else UPPER),
            xytext=(0, 14 if i in upper else -14),
            textcoords="offset points",
            ha="center",
            va="bottom" if i in upper else "top",
            fontsize="x-small",
        )
    learned.set(
        xlabel="feature",
        ylabel="log λ at the best CV loss",
        title="Learned L2 strength per feature",
        xticks=np.arange(len(FEATURES)),
        xticklabels=FEATURES,
        yticks=np.arange(LOWER, UPPER + 1, 2),
        ylim=(LOWER - 6.5, UPPER + 2.5),
    )
    learned.legend(fontsize="small", ncol=3, loc="lower center")
    note = bounds_note(results)
    if note:
        note = textwrap.fill(note, 130)
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize="small")
    return _outputs.save_figure(fig, path, rect=(0, 0.05 if note else 0, 1, 1))


COLORS = {
    "hgd_implicit": "C0",
    "hgd_unrolled": "k",
    "grid": "C1",
    "random": "C2",
    "tpe": "C3",
    "closed_form": "k",
}
# The diabetes data's ten features, in scikit-learn's order (s1–s6: blood serum measurements).
FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")

METHODS = {
    "hgd_implicit": "HGD, implicit",
    "hgd_unrolled": "HGD, unrolled",
    "grid": "grid (shared λ)",
    "random": "random search",
    "tpe": "TPE",
}


def main(argv=None) -> dict:
    p = _cli.parser("ridge_l2", __doc__.splitlines()[0])
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="cross-validations per method, K inner trainings each (default 200, 50 with --quick)",
    )
    p.add_argument(
        "--folds", type=int, default=5, help="K, the cross-validation folds (divides 340)"
    )
    p.add_argument("--unrolled-steps", type=int, default=2000, help="T for unrolled HGD")
    p.add_argument("--lr", type=float, default=0.5, help="Adam's learning rate on λ")
    args = p.parse_args(argv)
    args.budget = args.budget or (50 if args.quick else 200)
    check_folds(args.folds)  # before `start`, so that a bad --folds leaves no run behind
    run = _harness.start(args)  # float64 from here on: load the data after it
    budget = args.budget
    problem = load(args.seed, args.folds)

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
    lam0 = jnp.full(problem.cv[0].shape[1], LAM0, jnp.float64)
    results = {name: summarise(h, problem) for name, h in histories.items()}
    results["closed_form"] = dict(
        cv_loss=optimum["cv_loss"],
        test_loss=held_out_loss(optimum["log_lam"], problem),
        cross_validations=0,
        inner_trainings=0,
        closed_form_solves=optimum["nfev"],
        log_lam=optimum["log_lam"],
        hypergrad_at_log_lam0=jax.grad(closed_form_cv_loss)(lam0, problem),
    )
    for name in METHODS:
        results[name]["gap_to_optimum"] = results[name]["cv_loss"] - optimum["cv_loss"]
    results["config"] = dict(run.config, log_lam_box=(LOWER, UPPER), log_lam0=LAM0, split=SPLIT)
    print_table(results)
    return run.finish(results, {"ridge_l2.png": lambda path: plot(results, path)})


def print_table(results: dict) -> None:
    """The results as two tables that fit an 80-column terminal (the losses per method; the
    learned log λ, a row per feature) and the note on the box's bounds."""
    relerr = lambda r, key: f"{r[key]:.1e}" if key in r else ""
    rows = []
    # Labels of at most 13 characters keep the table within 80 columns without wrapping.
    labels = dict(METHODS, grid="grid, one λ", closed_form="closed-form\noptimum")
    for name, label in labels.items():
        r = results[name]
        rows.append(
            (
                label,
                f"{r['cv_loss']:.5f}",
                f"{r.get('gap_to_optimum', 0.0):.5f}",
                f"{r['test_loss']:.5f}",
                str(r["inner_trainings"]),
                relerr(r, "hypergrad_relerr_initial"),
                relerr(r, "hypergrad_relerr_max"),
            )
        )
    _console.print_table(
        f"Per-feature L2 for ridge on diabetes by K-fold CV ({run_label(results)})",
        ("method", "best CV\nloss", "gap to\noptimum", "test\nloss", "inner\ntrainings",
         "relerr\nstart", "relerr\nmax"),
        rows,
        caption="Losses: MSE on standardised y. relerr: the hypergradient's relative error "
        "against the closed form.",
    )  # fmt: skip
    entries = [*METHODS, "closed_form"]
    marked = lambda v: f"{v:+.1f}" + ("*" if v <= LOWER + 1e-6 or v >= UPPER - 1e-6 else " ")
    lams = [np.asarray(results[name]["log_lam"]) for name in entries]
    _console.print_table(
        "Learned log λ per feature (the penalty is e^λ)",
        ("feature", *(SHORT_LABELS[name] for name in entries)),
        [(feature, *(marked(lam[i]) for lam in lams)) for i, feature in enumerate(FEATURES)],
        caption=f"* on the search box's bound ({LOWER:+g} or {UPPER:+g}).",
    )
    note = bounds_note(results)
    if note:
        _console.stdout_console().print(note)


SHORT_LABELS = {
    "hgd_implicit": "HGD implicit",
    "hgd_unrolled": "HGD unrolled",
    "grid": "grid",
    "random": "random",
    "tpe": "TPE",
    "closed_form": "optimum",
}


if __name__ == "__main__":
    _cli.cli(main)
