r"""The effect of T: hyper-representation learning with T-step unrolled hypergradients.

Franceschi et al. (ICML 2018), "Bilevel programming for hyperparameter optimization and
meta-learning", section on the effect of the number of inner steps $T$. A linear
hyper-representation $H \in \mathbb{R}^{d \times 784}$ (the hyperparameter) maps Omniglot images
to features $z = Hx$; the inner problem is multinomial logistic regression on the features of the
training examples,

$$L(w, H) = \frac1n \sum_i \mathrm{CE}(W^\top H x_i + b, y_i) + \frac{\mu}{2}\|W\|^2,$$

trained by $T$ gradient steps from $w_0 = 0$; the outer objective is the validation
cross-entropy $E(w, H)$. For each $T$, Adam on $H$ with the reverse-mode unrolled hypergradient of
$f_T(H) = E(w_T(H), H)$ gives $H_T$; at $H_T$ the run reports $f_T(H_T)$, $f(H_T) = E(w^*(H_T))$
with $w^*$ the inner problem solved to a gradient norm of $10^{-6}$ by `bilevax.inner_solve`,
and the test accuracy of both $w_T$ and $w^*$, along with the runtime and compiled memory of one
hypergradient, for reverse mode, checkpointed reverse mode and forward mode.

The inner step size is $\eta = 1/\hat L(H)$ with
$\hat L = \tfrac12 \lambda_{\max}(\tilde Z^\top \tilde Z / n) + \mu$, $\tilde Z = [XH^\top, 1]$,
an upper bound on the inner Hessian (the softmax Hessian is at most $\tfrac12$), so gradient
descent is stable however large $H$ grows. It is recomputed from the current $H$ and held
constant in the derivative (`stop_gradient`), as a tuning rule, not a learned hyperparameter.

    python -m experiments.unroll_length [--quick] [--out DIR] [--data-dir DIR] [--seed S]
        [--resume | --overwrite]
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx
from jaxtyping import Array, Float, Int

import bilevax as bx

from . import _cli, _console, _harness, _outputs
from ._optax import optax_step
from .data import data_dir, load_omniglot


NUM_CLASSES = 100
# Franceschi et al. ask for 3 / 3 / 15 examples per class, but an Omniglot character has only
# 20 drawings: the test set gets the 14 that remain.
EXAMPLES = (3, 3, 14)
FEATURES = 64  # d, the width of the hyper-representation
L2 = 1e-2  # μ, the inner L2 strength on W (not on the bias)
INNER_TOL = 1e-6  # ‖∇_w L‖ at which the converged inner solve stops
INNER_MAX_STEPS = 10_000
STEP_SIZE = 1.0  # η, the inner gradient-descent step
TS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_TS = (1, 4, 16, 64)
CHECKPOINT_EVERY = 25  # hyper-steps between checkpoints within one T


class Problem(eqx.Module):
    """Flattened images (`float`, in [0, 1], strokes 1) and labels 0..classes-1."""

    train: tuple[Float[Array, "n 784"], Int[Array, " n"]]
    val: tuple[Float[Array, "m 784"], Int[Array, " m"]]
    test: tuple[Float[Array, "k 784"], Int[Array, " k"]]
    num_classes: int = eqx.field(static=True)


def select(
    num_drawings_or_images,
    num_classes: int = NUM_CLASSES,
    examples: tuple[int, int, int] = EXAMPLES,
    seed: int = 0,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The seeded choice of classes and of drawings per class.

    **Arguments:**

    - `num_drawings_or_images`: the images `(characters, drawings, ...)`, or just their shape.

    **Returns:**

    `(classes, (train, val, test))`: the character indices, and per part an `int` array of shape
    `(num_classes, examples[part])` of drawing indices, disjoint across parts within a class.
    """
    shape = np.shape(num_drawings_or_images)
    if len(shape) == 1:
        shape = tuple(num_drawings_or_images)
    num_chars, num_drawings = shape[:2]
    if sum(examples) > num_drawings:
        raise ValueError(
            f"`examples` {examples} asks for {sum(examples)} drawings per class; there are "
            f"{num_drawings}."
        )
    rng = np.random.default_rng(seed)
    classes = np.sort(rng.choice(num_chars, num_classes, replace=False))
    order = np.stack([rng.permutation(num_drawings) for _ in range(num_classes)])
    bounds = np.cumsum([0, *examples])
    parts = tuple(order[:, a:b] for a, b in zip(bounds[:-1], bounds[1:]))
    return classes, parts  # type: ignore[return-value]


def load(
    data_dir=None,
    *,
    num_classes: int = NUM_CLASSES,
    examples: tuple[int, int, int] = EXAMPLES,
    seed: int = 0,
    dtype=jnp.float64,
) -> Problem:
    """The Omniglot problem: `num_classes` characters chosen with `seed`, relabelled 0..C-1."""
    images = load_omniglot(data_dir).as_float()
    classes, parts = select(images.shape, num_classes, examples, seed)

    def part(drawings):
        x = images[classes[:, None], drawings].reshape(-1, 28 * 28)
        y = np.repeat(np.arange(num_classes), drawings.shape[1])
        return jnp.asarray(x, dtype), jnp.asarray(y, jnp.int32)

    train, val, test = (part(p) for p in parts)
    return Problem(train, val, test, num_classes)


def init_params(problem: Problem, features: int, dtype=jnp.float64) -> dict:
    return dict(
        W=jnp.zeros((features, problem.num_classes), dtype),
        b=jnp.zeros(problem.num_classes, dtype),
    )


def init_hparams(features: int, seed: int, dtype=jnp.float64) -> Float[Array, "d 784"]:
    """A random Gaussian map with features of order one on the images."""
    key = jax.random.key(seed)
    return jax.random.normal(key, (features, 28 * 28), dtype) / 28.0


def _logits(w, H, X):
    return (X @ H.T) @ w["W"] + w["b"]


def cross_entropy(w, H, data):
    X, y = data
    logp = jax.nn.log_softmax(_logits(w, H, X))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def accuracy(w, H, data):
    X, y = data
    predicted = jnp.argmax(_logits(w, H, X), axis=1)
    return jnp.mean((predicted == y.astype(predicted.dtype)).astype(X.dtype))


def make_inner_loss(l2: float):
    def inner_loss(w, H, data):
        return cross_entropy(w, H, data) + 0.5 * l2 * jnp.sum(w["W"] ** 2)

    return inner_loss


def outer_loss(w, H, data):
    return cross_entropy(w, H, data)


def curvature_bounds(H, X, l2: float):
    """(μ, L̂): the inner Hessian lies between them (μ from the L2 term on W only; the bias
    direction has no strong convexity of its own, but the softmax couples it to the data)."""
    Z = X @ jax.lax.stop_gradient(H).T
    Z = jnp.concatenate([Z, jnp.ones((Z.shape[0], 1), Z.dtype)], axis=1)
    top = jnp.linalg.eigvalsh(Z.T @ Z / Z.shape[0])[-1]
    return l2, 0.5 * top + l2


def solver_for(step_size: float) -> bx.GradientDescent:
    """Plain gradient descent with a fixed step (the same for every H and T)."""
    return bx.GradientDescent(step_size)


@eqx.filter_jit
def hypergrad(
    H,
    problem: Problem,
    num_steps: int,
    l2: float = L2,
    mode: str = "reverse",
    checkpoints: int | None = None,
    step_size: float = STEP_SIZE,
):
    """`(f_T(H), ∇f_T(H))` by `bx.unrolled_hypergrad`."""
    return bx.unrolled_hypergrad(
        outer_loss,
        make_inner_loss(l2),
        init_params(problem, H.shape[0], H.dtype),
        H,
        problem.train,
        problem.val,
        solver=solver_for(step_size),
        num_steps=num_steps,
        mode=mode,  # type: ignore[arg-type]
        checkpoints=checkpoints,
    )


@eqx.filter_jit
def t_step_params(H, problem: Problem, num_steps: int, l2: float = L2, step_size=STEP_SIZE):
    """w_T(H): `num_steps` gradient steps from zero (the forward pass of `hypergrad`)."""
    sol = bx.inner_solve(
        make_inner_loss(l2),
        init_params(problem, H.shape[0], H.dtype),
        H,
        problem.train,
        solver=solver_for(step_size),
        max_steps=num_steps,
        tol=0.0,
        adjoint=bx.UnrolledAdjoint(),
    )
    return sol.params


@eqx.filter_jit
def converged(H, problem: Problem, l2: float = L2, tol: float = INNER_TOL):
    """w*(H): L-BFGS (optimistix) from zero until `‖∇_w L‖ <= tol`."""
    return bx.inner_solve(
        make_inner_loss(l2),
        init_params(problem, H.shape[0], H.dtype),
        H,
        problem.train,
        solver=optx.LBFGS(rtol=1e-14, atol=1e-14),
        max_steps=INNER_MAX_STEPS,
        tol=tol,
    )


HYPER_OPTIMIZER = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


@eqx.filter_jit
def hyper_step(H, opt_state, problem: Problem, num_steps: int, l2: float = L2):
    value, hgrad = hypergrad(H, problem, num_steps, l2)
    H, opt_state = optax_step(HYPER_OPTIMIZER, hgrad, opt_state, H)
    return H, opt_state, value


def temp_bytes(H, problem: Problem, num_steps: int, l2: float = L2, **kwargs) -> int:
    """XLA's compiled scratch memory for one hypergradient."""
    fn = lambda H, problem: hypergrad.__wrapped__(H, problem, num_steps, l2, **kwargs)
    compiled = jax.jit(fn).lower(H, problem).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def timed(fn, repeats: int = 3):
    """`(seconds, output)`: seconds per call of `fn()`, best of `repeats` calls after a first
    one that compiles, and the last output."""
    out = jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - tic)
    return float(best), out


def evaluate(H, problem: Problem, num_steps: int, l2: float = L2) -> dict:
    """f_T, f, their gap and the test accuracies at H."""
    w_T = t_step_params(H, problem, num_steps, l2)
    sol = converged(H, problem, l2)
    f_T = float(outer_loss(w_T, H, problem.val))
    f = float(outer_loss(sol.params, H, problem.val))
    return dict(
        f_T=f_T,
        f=f,
        gap=f_T - f,
        test_acc=float(accuracy(sol.params, H, problem.test)),
        test_acc_T=float(accuracy(w_T, H, problem.test)),
        val_acc=float(accuracy(sol.params, H, problem.val)),
        val_acc_T=float(accuracy(w_T, H, problem.val)),
        train_loss_T=float(make_inner_loss(l2)(w_T, H, problem.train)),
        inner_converged=bool(sol.result == bx.RESULTS.successful),
        inner_steps=int(sol.stats["num_steps"]),
        inner_grad_norm=float(sol.stats["grad_norm"]),
        # GD is stable for η L < 2; L̂ >= L is the bound of `curvature_bounds`.
        step_times_curvature_bound=float(STEP_SIZE * curvature_bounds(H, problem.train[0], l2)[1]),
    )


def train(
    num_steps: int,
    problem: Problem,
    H0,
    hyper_steps: int,
    lr: float,
    run: _harness.Run,
    l2: float = L2,
) -> dict:
    """Adam on H for `hyper_steps` steps with T = `num_steps`, checkpointed every
    `CHECKPOINT_EVERY` steps; returns the evaluation at the final H and the curve of f_T."""
    name = f"T{num_steps}"

    def fresh():
        opt_state = HYPER_OPTIMIZER.init(H0)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, H0.dtype)
        return dict(H=H0, opt_state=opt_state, curve=[])

    def step(k, state):
        state["H"], state["opt_state"], value = hyper_step(
            state["H"], state["opt_state"], problem, num_steps, l2
        )
        state["curve"].append(float(value))  # blocks
        return state, f"f_T {state['curve'][-1]:.4f}  best {min(state['curve']):.4f}"

    def compute():
        # Compile outside the timing.
        jax.block_until_ready(hyper_step(H0, fresh()["opt_state"], problem, num_steps, l2))
        state = run.loop(
            f"{name}_steps", hyper_steps, fresh, step, description=f"T = {num_steps}",
            every=CHECKPOINT_EVERY,
        )  # fmt: skip
        H, curve = state["H"], state["curve"]
        run.checkpoints.save(f"{name}_H", H)
        return dict(
            evaluate(H, problem, num_steps, l2),
            T=num_steps,
            time_per_step_s=state["seconds"] / max(len(curve), 1),
            temp_bytes=temp_bytes(H, problem, num_steps, l2),
            curve=curve,
        )

    return run.stage(name, compute)


def memory_comparison(
    problem: Problem, num_steps: int, features: int, seed: int, l2: float, forward: bool
):
    """Reverse, checkpointed reverse and forward mode at T = `num_steps`: compiled temp memory
    and the time of one hypergradient, at `features` (forward mode costs one JVP per entry of H,
    784·d of them)."""
    H = init_hparams(features, seed, problem.train[0].dtype)
    k = max(1, round(num_steps**0.5))
    rows, reference = {}, None
    for label, kwargs in [
        ("reverse", dict(mode="reverse")),
        (f"reverse, checkpoints={k}", dict(mode="reverse", checkpoints=k)),
        *([("forward", dict(mode="forward"))] if forward else []),
    ]:
        call = lambda: hypergrad(H, problem, num_steps, l2, **kwargs)
        seconds, (_, g) = timed(call, repeats=1 if kwargs["mode"] == "forward" else 3)
        reference = g if reference is None else reference
        rows[label] = dict(
            d=features,
            num_hparams=H.size,
            T=num_steps,
            time_s=seconds,
            temp_bytes=temp_bytes(H, problem, num_steps, l2, **kwargs),
            max_abs_diff_vs_reverse=float(jnp.max(jnp.abs(g - reference))),
        )
        _console.console.print(f"  {label:<26} d={features}: {rows[label]}")
    return rows


def main(argv=None) -> dict:
    p = _cli.parser("unroll_length", __doc__.splitlines()[0])
    p.add_argument("--features", type=int, default=FEATURES, help="d, the width of H")
    p.add_argument("--hyper-steps", type=int, default=None, help="Adam steps on H per T")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate on H")
    p.add_argument("--l2", type=float, default=L2, help="inner L2 strength μ")
    p.add_argument("--ts", type=int, nargs="+", default=None, help="the values of T")
    p.add_argument(
        "--forward-features", type=int, default=1, help="d for the forward-mode comparison"
    )
    args = p.parse_args(argv)
    args.ts = ts = tuple(args.ts or (QUICK_TS if args.quick else TS))
    args.hyper_steps = hyper_steps = args.hyper_steps or (100 if args.quick else 200)
    run = _harness.start(args)
    problem = load(data_dir(args, "omniglot"), seed=args.seed)
    H0 = init_hparams(args.features, args.seed)

    per_t = {}
    for T in ts:
        r = train(T, problem, H0, hyper_steps, args.lr, run, args.l2)
        per_t[str(T)] = r
        _console.console.print(
            f"T={T:>4}: f_T {r['f_T']:.4f}  f {r['f']:.4f}  gap {r['gap']:+.4f}  "
            f"test acc {r['test_acc']:.3f} (T-step {r['test_acc_T']:.3f})  "
            f"{r['time_per_step_s'] * 1e3:.1f} ms/step  {r['temp_bytes'] / 2**20:.1f} MiB"
            + ("" if r["inner_converged"] else "  [inner solve NOT converged]")
        )

    def compare() -> dict:
        T = max(ts)
        _console.console.print(f"Memory / runtime of one hypergradient at T = {T}:")
        comparison = dict(
            main=memory_comparison(problem, T, args.features, args.seed, args.l2, False),
            reduced=memory_comparison(problem, T, args.forward_features, args.seed, args.l2, True),
        )
        # Forward mode at the main width: compiled only (running it would hold 784·d
        # tangents of the inner parameters: tens of GB).
        H = init_hparams(args.features, args.seed)
        comparison["forward_main_compiled_temp_bytes"] = temp_bytes(
            H, problem, T, args.l2, mode="forward"
        )
        # Compiled memory against T at the reduced width, for all three modes.
        Hr = init_hparams(args.forward_features, args.seed)
        modes = {
            "reverse": lambda t: dict(mode="reverse"),
            "forward": lambda t: dict(mode="forward"),
            "reverse, checkpoints=sqrt(T)": lambda t: dict(checkpoints=max(1, round(t**0.5))),
        }
        comparison["memory_vs_T_reduced"] = {
            label: {str(t): temp_bytes(Hr, problem, t, args.l2, **kwargs(t)) for t in ts}
            for label, kwargs in modes.items()
        }
        return comparison

    results = dict(
        per_T=per_t,
        comparison=run.stage("comparison", compare),
        config=dict(
            run.config,
            num_classes=problem.num_classes,
            examples=EXAMPLES,
            inner_tol=INNER_TOL,
            step_size=STEP_SIZE,
            chance=1.0 / problem.num_classes,
        ),
    )
    print_table(results)
    return run.finish(results, {"effect_of_t.png": lambda path: plot(results, path)})


def print_table(results: dict) -> None:
    rows = [
        (
            T,
            f"{r['f_T']:.4f}",
            f"{r['f']:.4f}",
            f"{r['gap']:+.4f}",
            f"{r['test_acc']:.3f}",
            f"{r['test_acc_T']:.3f}",
            f"{r['time_per_step_s'] * 1e3:.1f}",
            f"{r['temp_bytes'] / 2**20:.2f}",
        )
        for T, r in results["per_T"].items()
    ]
    columns = ("T", "f_T", "f", "f_T - f", "test acc (w*)", "test acc (w_T)", "ms/step", "MiB")
    _console.print_table("Effect of T (Omniglot, 100 classes)", columns, rows, stdout=False)
    rows = [
        (
            label,
            str(r["d"]),
            str(r["num_hparams"]),
            f"{r['time_s']:.3f}",
            f"{r['temp_bytes'] / 2**20:.2f}",
            f"{r['max_abs_diff_vs_reverse']:.1e}",
        )
        for group in ("main", "reduced")
        for label, r in results["comparison"][group].items()
    ]
    columns = ("setting", "d", "#hparams", "time (s)", "temp MiB", "max |Δg| vs reverse")
    _console.print_table("One hypergradient at the largest T", columns, rows, stdout=False)


def plot(results: dict, path):
    plt = _outputs.pyplot()
    per_t = results["per_T"]
    ts = np.array([int(t) for t in per_t])
    get = lambda key: np.array([per_t[str(t)][key] for t in ts])
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))
    ax = axes[0]
    ax.semilogx(ts, get("f_T"), "o-", label=r"$f_T(H_T)$ (T-step)")
    ax.semilogx(ts, get("f"), "s-", label=r"$f(H_T)$ (converged)")
    ax.set(xlabel="T", ylabel="validation cross-entropy", title="Validation objective")
    ax.legend()
    ax = axes[1]
    ax.loglog(ts, np.abs(get("gap")), "o-")
    ax.set(xlabel="T", ylabel=r"$|f_T(H_T) - f(H_T)|$", title="Gap to the converged objective")
    ax = axes[2]
    ax.semilogx(ts, 100 * get("test_acc"), "o-", label=r"$w^*(H_T)$")
    ax.semilogx(ts, 100 * get("test_acc_T"), "s--", label=r"$w_T(H_T)$")
    ax.axhline(100 * results["config"]["chance"], color="k", lw=1, ls=":", label="chance")
    ax.set(xlabel="T", ylabel="test accuracy (%)", title="Test accuracy")
    ax.legend()
    d, dr = results["config"]["features"], results["config"]["forward_features"]
    comparison = results["comparison"]
    ax = axes[3]
    ax.loglog(ts, get("time_per_step_s"), "o-", label=f"reverse, d={d}")
    for label, r in comparison["main"].items():
        if "checkpoints" in label:
            ax.loglog([r["T"]], [r["time_s"]], "*", ms=12, label=f"{label}, d={d}")
    for label, r in comparison["reduced"].items():
        ax.loglog([r["T"]], [r["time_s"]], "x", ms=10, mew=2, label=f"{label}, d={dr}")
    ax.set(xlabel="T", ylabel="seconds per hypergradient", title="Runtime (one hyper-step)")
    ax.legend(fontsize=8)
    ax = axes[4]
    ax.loglog(ts, get("temp_bytes") / 2**20, "o-", label=f"reverse, d={d}")
    for label, r in comparison["main"].items():
        if "checkpoints" in label:
            ax.loglog([r["T"]], [r["temp_bytes"] / 2**20], "*", ms=12, label=f"{label}, d={d}")
    for label, curve in comparison.get("memory_vs_T_reduced", {}).items():
        tt = np.array([int(t) for t in curve])
        ax.loglog(tt, np.array(list(curve.values())) / 2**20, "--", label=f"{label}, d={dr}")
    ax.set(xlabel="T", ylabel="XLA temp memory (MiB)", title="Compiled memory")
    ax.legend(fontsize=8)
    return _outputs.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    _cli.cli(main)
