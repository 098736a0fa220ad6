r"""Stochastic bilevel solvers (SOBA, SABA, and the first-order F2SA and BOME) against
deterministic hypergradient descent, on per-feature L2 hyperparameter optimisation for
logistic regression with many samples.

Synthetic data (nothing is downloaded): $x_i \sim \mathcal N(0, I_d)$, a sparse true weight
vector, labels $y_i = \operatorname{sign}(x_i^\top w_\text{true} + \varepsilon_i)$ with 10% of
them flipped. One L2 strength $e^{\lambda_j}$ per feature, $\lambda_j \in [-10, 1]$ (clipped):

$$L(w, \lambda) = \frac1n \sum_i \log(1 + e^{-y_i x_i^\top w})
    + \tfrac12 \sum_j e^{\lambda_j} w_j^2, \qquad
  E(w) = \frac1m \sum_{i \in \text{val}} \log(1 + e^{-y_i x_i^\top w}).$$

Methods, all started from $\lambda = 0$, $w = 0$:

- `soba`: [`bilevax.contrib.SOBA`][] with constant step sizes;
- `saba`: [`bilevax.contrib.SABA`][] with the same step sizes (its memory starts with one pass);
- `f2sa`: [`bilevax.contrib.F2SA`][], first-order, with a constant penalty `--f2sa-penalty`;
- `bome`: [`bilevax.contrib.BOME`][], first-order, `--bome-inner-steps` steps of $\theta$;
- `deterministic`: hypergradient descent with full-batch oracles: per outer step, a
  warm-started [`bilevax.inner_solve`][] (gradient descent, at most `--inner-steps` steps) and
  [`bilevax.implicit_hypergrad`][] with `--cg-steps` CG iterations.

Cost is counted in per-sample oracle evaluations (one gradient, or one Hessian- or
Jacobian-vector product, of one sample's loss), and reported in **data passes**: evaluations
divided by $n + m$. The outer objective reported is $h(\lambda) = E(w^*(\lambda))$ at each
method's current $\lambda$, with $w^*(\lambda)$ solved to $\|\nabla_w L\| \le 10^{-9}$ (not
counted). In `results.json`, `log_lam` fields hold the log-strengths $\lambda$.

    python -m experiments.stochastic_bilevel [--quick] [--out DIR] [--seed S]
        [--resume | --overwrite]
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

import bilevax as bx

from . import _cli, _console, _harness, _outputs


METHODS = ("soba", "saba", "f2sa", "bome", "deterministic")
STOCHASTIC = ("soba", "saba", "f2sa", "bome")
FULL = {"n_train": 20_000, "n_val": 5_000, "n_test": 5_000, "dim": 50, "passes": 40}
QUICK = {"n_train": 4_000, "n_val": 1_000, "n_test": 1_000, "dim": 20, "passes": 40}
EVALS_PER_RUN = 30  # points on each convergence curve
LOWER, UPPER = -10.0, 1.0  # the box of the log-strengths λ_j


def make_data(seed: int, n_train: int, n_val: int, n_test: int, dim: int) -> dict:
    """Train / validation / test splits, each `{"X": (n, d), "y": (n,)}` with labels ±1."""
    rng = np.random.default_rng(seed)
    w_true = np.zeros(dim)
    support = rng.choice(dim, size=max(dim // 5, 1), replace=False)
    w_true[support] = rng.normal(size=support.size) * 2.0
    n = n_train + n_val + n_test
    X = rng.normal(size=(n, dim))
    y = np.sign(X @ w_true + 0.5 * rng.normal(size=n))
    y[y == 0] = 1.0
    flip = rng.random(n) < 0.1
    y[flip] = -y[flip]
    split = lambda a, b: {"X": jnp.asarray(X[a:b]), "y": jnp.asarray(y[a:b])}
    return {
        "train": split(0, n_train),
        "val": split(n_train, n_train + n_val),
        "test": split(n_train + n_val, None),
    }


def _logistic(w, batch):
    return jnp.mean(jax.nn.softplus(-batch["y"] * (batch["X"] @ w)))


def strength(lam):
    r"""$e^{\lambda}$ with $\lambda$ clipped to `[LOWER, UPPER]`. The upper end keeps the inner
    curvature below $\frac14\lambda_{\max}(X^\top X/n) + e^{1}$, so a fixed inner step of
    0.5 stays stable; the optimum has some $\lambda_j$ at it (features to switch off)."""
    return jnp.exp(jnp.clip(lam, LOWER, UPPER))


def inner_loss(w, lam, batch):
    return _logistic(w, batch) + 0.5 * jnp.sum(strength(lam) * w**2)


def outer_loss(w, lam, batch):
    del lam
    return _logistic(w, batch)


@eqx.filter_jit
def exact_inner(lam, w_warm, data):
    r"""$w^*(\lambda)$ to a tight tolerance (BFGS, warm-started), for evaluation only."""
    return bx.inner_solve(
        inner_loss,
        w_warm,
        lam,
        data["train"],
        solver=optx.BFGS(rtol=1e-12, atol=1e-12),
        max_steps=500,
        tol=1e-9,
    ).params


def evaluate(lam, w_warm, data) -> tuple[dict, jax.Array]:
    if not np.all(np.isfinite(np.asarray(lam))):  # a diverged run: say so in the curve
        return {"val_loss": float("nan"), "test_loss": float("nan")}, w_warm
    w = exact_inner(lam, w_warm, data)
    losses = {
        "val_loss": float(outer_loss(w, lam, data["val"])),
        "test_loss": float(outer_loss(w, lam, data["test"])),
    }
    return losses, w


@eqx.filter_jit
def _exact_value_and_hypergrad(lam, w_warm, data):
    w = exact_inner(lam, w_warm, data)
    value, hypergrad = bx.implicit_hypergrad(
        outer_loss,
        inner_loss,
        w,
        lam,
        data["train"],
        data["val"],
        linear_solver=lx.CG(rtol=1e-12, atol=1e-12),
    )
    return value, hypergrad, w


def reference_optimum(data) -> dict:
    r"""$\min_\lambda h(\lambda)$ by L-BFGS (scipy) on exact values and hypergradients from
    $\lambda = 0$: the yardstick for the curves (its cost is not counted)."""
    import scipy.optimize

    dim = data["train"]["X"].shape[1]
    warm = {"w": jnp.zeros(dim)}

    def fun(lam):
        value, hypergrad, warm["w"] = _exact_value_and_hypergrad(jnp.asarray(lam), warm["w"], data)
        return float(value), np.asarray(hypergrad)

    res = scipy.optimize.minimize(
        fun,
        np.zeros(dim),
        jac=True,
        method="L-BFGS-B",
        bounds=[(LOWER, UPPER)] * dim,
        options={"maxiter": 500, "gtol": 1e-9},
    )
    losses, _ = evaluate(jnp.asarray(res.x), warm["w"], data)
    return {**losses, "log_lam": res.x, "iterations": int(res.nit)}


def _lipschitz(data) -> float:
    """A bound on the training loss's curvature over the box: ¼ λmax(XᵀX/n) + e^UPPER."""
    X = np.asarray(data["train"]["X"])
    return 0.25 * float(np.linalg.eigvalsh(X.T @ X / len(X))[-1]) + float(np.exp(UPPER))


def solvers(args) -> dict:
    kwargs = dict(batch_size=args.batch_size, outer_batch_size=args.batch_size)
    return {
        "soba": bx.contrib.SOBA(args.inner_lr, args.soba_outer_lr, **kwargs),
        "saba": bx.contrib.SABA(args.inner_lr, args.saba_outer_lr, **kwargs),
        "f2sa": bx.contrib.F2SA(args.inner_lr, args.f2sa_outer_lr, args.f2sa_penalty, **kwargs),
        "bome": bx.contrib.BOME(
            args.inner_lr,
            args.bome_outer_lr,
            inner_steps=args.bome_inner_steps,
            params_lr=args.bome_params_lr,
            **kwargs,
        ),
    }


@eqx.filter_jit
def _stochastic_chunk(solver, state, data, num_steps: int, key):
    return bx.contrib.stochastic_bilevel(
        solver,
        outer_loss,
        inner_loss,
        state.params,
        state.hparams,
        data["train"],
        data["val"],
        num_steps=num_steps,
        key=key,
        state=state,
    )


def _evaluation_loop(run, name, data, fresh, advance) -> dict:
    """`EVALS_PER_RUN` rounds of `advance(state) -> (evals, seconds)` (a method's steps between
    two evaluations: the oracle evaluations it has used so far, and the seconds it took), each
    followed by an evaluation of h(λ) at the state's `"lam"`; returns the method's curves."""
    n, m = data["train"]["y"].shape[0], data["val"]["y"].shape[0]

    def start():
        state = fresh()
        losses, state["w_eval"] = evaluate(state["lam"], state["w_eval"], data)
        history = {"passes": [state["evals"] / (n + m)], **{k: [v] for k, v in losses.items()}}
        return dict(state, history=history, method_seconds=0.0)

    def step(k, state):
        state["evals"], seconds = advance(state)
        state["method_seconds"] += seconds
        losses, state["w_eval"] = evaluate(state["lam"], state["w_eval"], data)
        history = state["history"]
        history["passes"].append(state["evals"] / (n + m))
        for key, value in losses.items():
            history[key].append(value)
        best = np.fmin.reduce(history["val_loss"])  # NaN (a diverged run) only if all are
        return state, f"val {losses['val_loss']:.5f}  best {best:.5f}"

    state = run.loop(name, EVALS_PER_RUN, start, step, description=name)
    history = state["history"]
    return {
        "passes": history["passes"],
        "val_curve": history["val_loss"],
        "test_curve": history["test_loss"],
        "final_log_lam": np.asarray(state["lam"]),
        "val_loss": history["val_loss"][-1],
        "test_loss": history["test_loss"][-1],
        "seconds": state["method_seconds"],
        "state": state,
    }


def run_stochastic(name, solver, data, passes: float, seed: int, run: _harness.Run) -> dict:
    """Runs `solver` for `passes` data passes, evaluating h(λ) `EVALS_PER_RUN` times."""
    n, m = data["train"]["y"].shape[0], data["val"]["y"].shape[0]
    b_in, _ = solver.samples_per_step(data["train"], data["val"])
    # Per step, SOBA and SABA: a gradient and one VJP of it (H v and the cross term) per inner
    # sample, one gradient per outer sample; F2SA and BOME: gradients only, several per sample.
    per_step = sum(solver.evaluations_per_step(data["train"], data["val"]).values())
    init_cost = 2 * n + m if isinstance(solver, bx.contrib.SABA) else 0
    total_steps = int((passes * (n + m) - init_cost) / per_step)
    if total_steps < EVALS_PER_RUN:
        raise ValueError(
            f"{passes} data passes buy {name} only {total_steps} steps of batch size {b_in}; "
            f"it needs at least {EVALS_PER_RUN}: raise --passes or lower --batch-size."
        )
    chunk = total_steps // EVALS_PER_RUN
    key = jax.random.key(seed)
    dim = data["train"]["X"].shape[1]

    def fresh():
        zeros = jnp.zeros(dim)
        state = solver.init(outer_loss, inner_loss, zeros, zeros, data["train"], data["val"])
        return dict(solver=state, lam=state.hparams, w_eval=state.params, evals=init_cost)

    def advance(state):
        start = time.perf_counter()
        solver_state = _stochastic_chunk(solver, state["solver"], data, chunk, key)
        state["solver"] = jax.block_until_ready(solver_state)
        state["lam"] = solver_state.hparams
        evals = init_cost + int(solver_state.num_steps) * per_step
        return evals, time.perf_counter() - start

    result = _evaluation_loop(run, name, data, fresh, advance)
    solver_state = result.pop("state")["solver"]
    return dict(
        result,
        steps=int(solver_state.num_steps),
        finite=bool(solver_state.result == bx.RESULTS.successful),
    )


@eqx.filter_jit
def deterministic_step(lam, w, data, inner_lr, outer_lr, inner_steps: int, cg_steps: int):
    """One outer step of full-batch hypergradient descent; returns the new λ and w and the
    inner steps taken."""
    sol = bx.inner_solve(
        inner_loss,
        w,
        lam,
        data["train"],
        solver=bx.GradientDescent(inner_lr),
        max_steps=inner_steps,
        tol=1e-9,
    )
    _, hypergrad = bx.implicit_hypergrad(
        outer_loss,
        inner_loss,
        sol.params,
        lam,
        data["train"],
        data["val"],
        linear_solver=lx.CG(rtol=1e-10, atol=1e-10, max_steps=cg_steps),
        # A truncated solve is the point of this baseline: keep CG's answer after `cg_steps`
        # iterations rather than raising because it has not reached its tolerance.
        throw=False,
    )
    return lam - outer_lr * hypergrad, sol.params, sol.stats["num_steps"]


def run_deterministic(data, passes: float, args, run: _harness.Run) -> dict:
    n, m = data["train"]["y"].shape[0], data["val"]["y"].shape[0]
    inner_lr = 1.0 / _lipschitz(data)
    budget = passes * (n + m)
    per_eval = budget / EVALS_PER_RUN
    dim = data["train"]["X"].shape[1]

    def fresh():
        return dict(lam=jnp.zeros(dim), w=jnp.zeros(dim), w_eval=jnp.zeros(dim), evals=0, steps=0)

    def advance(state):
        target = min((len(state["history"]["passes"])) * per_eval, budget)
        lam, w, evals = state["lam"], state["w"], state["evals"]
        start = time.perf_counter()
        # Step only while the step's largest cost fits, so the budget is never exceeded.
        while evals + (args.inner_steps + 1 + args.cg_steps + 1) * n + m <= target:
            lam, w, inner = deterministic_step(
                lam, w, data, inner_lr, args.det_outer_lr, args.inner_steps, args.cg_steps
            )
            # Inner: one gradient per step plus the one at the start (the stopping test);
            # hypergradient: at most `cg_steps` HVPs, one VJP for the cross term, one outer
            # gradient.
            evals += (int(inner) + 1 + args.cg_steps + 1) * n + m
            state["steps"] += 1
        state["lam"], state["w"] = lam, w
        return evals, time.perf_counter() - start

    result = _evaluation_loop(run, "deterministic", data, fresh, advance)
    state = result.pop("state")
    finite = bool(np.all(np.isfinite(np.asarray(state["lam"]))))
    return dict(result, steps=state["steps"], finite=finite)


def plot(results: dict, path):
    plt = _outputs.pyplot()
    config = results["config"]
    best = results["reference"]["val_loss"]
    fig, (ax, ax_log) = plt.subplots(1, 2, figsize=(11, 4))
    for name in METHODS:
        r = results[name]
        ax.plot(r["passes"], r["val_curve"], label=name, marker=".")
        gap = np.maximum(np.asarray(r["val_curve"]) - best, 1e-12)
        ax_log.semilogy(r["passes"], gap, label=name, marker=".")
    ax.axhline(best, color="k", linestyle="--", linewidth=1, label="L-BFGS reference")
    ax.set_ylabel(r"validation loss $h(\lambda) = E(w^*(\lambda))$")
    ax_log.set_ylabel(r"$h(\lambda) - h_{\mathrm{ref}}$")
    for a in (ax, ax_log):
        a.set_xlabel("data passes (per-sample oracle evaluations / (n + m))")
        a.legend()
    fig.suptitle(
        f"logistic-regression HO, per-feature L2: n={config['n_train']}, m={config['n_val']}, "
        f"d={config['dim']}, batch {config['batch_size']}"
    )
    return _outputs.save_figure(fig, path)


def main(argv=None) -> dict:
    p = _cli.parser("stochastic_bilevel", __doc__.splitlines()[0])
    p.add_argument("--passes", type=float, default=None, help="data passes per method")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    # Step sizes: each method's best of a small grid on the --quick problem (see the docs).
    p.add_argument("--inner-lr", type=float, default=0.5, help="SOBA/SABA step of w and v")
    p.add_argument("--soba-outer-lr", type=float, default=8.0, help="SOBA step of λ")
    p.add_argument("--saba-outer-lr", type=float, default=128.0, help="SABA step of λ")
    p.add_argument("--f2sa-outer-lr", type=float, default=128.0, help="F2SA step of λ")
    p.add_argument("--f2sa-penalty", type=float, default=100.0, help="F2SA penalty σ")
    p.add_argument("--bome-outer-lr", type=float, default=128.0, help="BOME step of λ")
    p.add_argument("--bome-params-lr", type=float, default=0.5, help="BOME step of w")
    p.add_argument("--bome-inner-steps", type=int, default=5, help="BOME steps of θ")
    p.add_argument("--det-outer-lr", type=float, default=1600.0, help="deterministic step of λ")
    p.add_argument("--inner-steps", type=int, default=5, help="deterministic inner steps")
    p.add_argument("--cg-steps", type=int, default=5, help="deterministic CG iterations")
    args = p.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    if args.n_train is not None:
        held_out = max(args.n_train // 4, 1)
        sizes.update(n_train=args.n_train, n_val=held_out, n_test=held_out)
    args.n_train = sizes["n_train"]
    args.passes = sizes["passes"] if args.passes is None else args.passes
    args.dim = sizes["dim"] if args.dim is None else args.dim
    run = _harness.start(args)
    config = dict(run.config, n_val=sizes["n_val"], n_test=sizes["n_test"])
    data = make_data(args.seed, config["n_train"], config["n_val"], config["n_test"], config["dim"])
    results: dict = {"config": config}
    for name, solver in solvers(args).items():
        results[name] = run_stochastic(name, solver, data, config["passes"], args.seed, run)
    results["deterministic"] = run_deterministic(data, config["passes"], args, run)
    results["reference"] = run.stage("reference", lambda: reference_optimum(data))
    results["initial_val_loss"] = results["soba"]["val_curve"][0]
    for name in METHODS:
        r = results[name]
        _console.console.print(
            f"{name:>13}: val {r['val_loss']:.5f}  test {r['test_loss']:.5f}  "
            f"({r['passes'][-1]:.1f} passes, {r['steps']} steps, {r['seconds']:.1f} s)"
        )
    _console.console.print(f"L-BFGS reference: val {results['reference']['val_loss']:.5f}")
    return run.finish(results, {"stochastic_bilevel.png": lambda path: plot(results, path)})


if __name__ == "__main__":
    _cli.cli(main)
