r"""Meta-learned regularisation: one per-feature L2 strength shared by a distribution of ridge
tasks, trained on meta-batches of tasks spread over devices and processes.

Each task $\tau$ is a linear regression $y = X w_\tau + \sigma \varepsilon$ with its own weights
$w_\tau \sim \mathcal N(0, \mathrm{diag}(s^2))$, drawn from feature scales $s$ that range
from large to negligible. The hyperparameter $\lambda \in \mathbb R^d$ (log L2 strengths) is
shared by all tasks:

$$\min_\lambda\ \mathbb E_\tau\, E_\tau(w^*_\tau(\lambda)), \qquad
  w^*_\tau(\lambda) = \arg\min_w\ \tfrac{1}{2n}\|X^{tr}_\tau w - y^{tr}_\tau\|^2
  + \tfrac12 \textstyle\sum_i e^{\lambda_i} w_i^2,$$

with $E_\tau$ the mean squared error on the task's validation points. Every meta-step samples
a fresh meta-batch of tasks, solves each task's inner problem with [`bilevax.inner_solve`][]
(implicit adjoint, CG) or differentiates through $T$ steps with
[`bilevax.unrolled_hypergrad`][], averages the hypergradients over the meta-batch and takes an
Adam step on $\lambda$. The Bayes-optimal strengths $e^{\lambda_i} = \sigma^2/(n s_i^2)$ and
the closed-form hypergradient are the references.

With `--distributed`, every process samples and holds only its share of each meta-batch (task
$k$ of step $t$ comes from the seed $(s, t, k)$, so the tasks do not depend on how many
processes there are), the mean over tasks is reduced across processes inside the compiled
step, and $\lambda$ and Adam's state are replicated: every process takes the same step. Only
process 0 writes results and progress; every process writes its part of each checkpoint. In
`results.json`, `log_lam` fields hold the log strengths $\lambda$.

    python -m experiments.meta_ho [--quick] [--out DIR] [--seed S] [--resume | --overwrite]
        [--distributed]
"""

import functools
import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bilevax as bx

from . import _cli, _console, _distributed, _harness, _outputs, problems
from ._distributed import TASKS
from ._optax import optax_step
from .problems import mse as outer_loss, ridge_loss as inner_loss


D = 10  # features, and hyperparameters
N_TRAIN, N_VAL = 20, 20  # points per task
NOISE = 0.5  # σ
SCALES = np.geomspace(2.0, 0.02, D)  # s_i: from strongly to barely relevant features
INNER_TOL = 1e-10
INNER_MAX_STEPS = 5000
TRAIN_STREAM, TEST_STREAM = 0, 1


def make_tasks(seed: int, stream: int, step: int, indices) -> dict:
    """The tasks `indices` of meta-batch `step`, each drawn from its own seed
    `(seed, stream, step, index)`: the same task whichever process draws it.

    **Returns:**

    `{"train": (X, y), "val": (X, y)}`, stacked over tasks (float64 NumPy).
    """
    Xs, ys = [], []
    for k in indices:
        rng = np.random.default_rng([seed, stream, step, k])
        X = rng.standard_normal((N_TRAIN + N_VAL, D))
        w = SCALES * rng.standard_normal(D)
        Xs.append(X)
        ys.append(X @ w + NOISE * rng.standard_normal(N_TRAIN + N_VAL))
    X, y = np.stack(Xs), np.stack(ys)
    return {"train": (X[:, :N_TRAIN], y[:, :N_TRAIN]), "val": (X[:, N_TRAIN:], y[:, N_TRAIN:])}


def bayes_lam() -> np.ndarray:
    """$\\log(\\sigma^2 / (n s_i^2))$: the posterior-mean strengths for the task prior."""
    return np.log(NOISE**2 / (N_TRAIN * SCALES**2))


def closed_form_val_loss(lam, task):
    (X, y), val = task["train"], task["val"]
    A = X.T @ X / N_TRAIN + jnp.diag(jnp.exp(lam))
    return outer_loss(jnp.linalg.solve(A, X.T @ y / N_TRAIN), lam, val)


def solver(lam, task) -> bx.GradientDescent:
    # Heavy ball tuned to the Hessian's spectrum bounds: O(√κ) steps for every task and λ.
    # A tuning choice, not a function to differentiate through.
    X, _ = task["train"]
    eigs = jnp.linalg.eigvalsh(X.T @ X / N_TRAIN)
    strength = jnp.exp(jax.lax.stop_gradient(lam))
    big = jnp.sqrt(eigs[-1] + jnp.max(strength))
    small = jnp.sqrt(eigs[0] + jnp.min(strength))
    return bx.GradientDescent(4 / (big + small) ** 2, ((big - small) / (big + small)) ** 2)


def task_value_and_grad(lam, task, method: str, unrolled_steps: int):
    """One task's validation loss at its inner solution and its hypergradient."""
    solve_with = lambda lam: solver(lam, task)
    if method == "unrolled":
        return bx.unrolled_hypergrad(
            outer_loss,
            inner_loss,
            jnp.zeros(D),
            lam,
            task["train"],
            task["val"],
            solver=solve_with,
            num_steps=unrolled_steps,
        )

    def val_loss(lam):
        sol = bx.inner_solve(
            inner_loss,
            jnp.zeros(D),
            lam,
            task["train"],
            solver=solve_with,
            max_steps=INNER_MAX_STEPS,
            tol=INNER_TOL,
            adjoint=bx.ImplicitAdjoint(lx.CG(rtol=1e-12, atol=1e-12)),
        )
        return outer_loss(sol.params, lam, task["val"])

    return jax.value_and_grad(val_loss)(lam)


def optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


PARTITIONINGS = ("shard_map", "auto")


# Cached, so that several runs in one process (a resumed run, the tests) compile the step once.
@functools.cache
def make_meta_step(
    mesh: Mesh,
    method: str,
    learning_rate: float,
    unrolled_steps: int = 200,
    partitioning: str = "auto",
):
    """The compiled meta-step `(lam, opt_state, tasks) -> (lam, opt_state, info)`.

    `tasks` is split over `mesh`'s "tasks" axis; the mean over tasks is an all-reduce (across
    processes too), and `lam`, `opt_state` and `info` come out replicated on every device.

    **Arguments:**

    - `partitioning`: `"shard_map"` runs each device's tasks as its own program
        (`jax.shard_map`), so that each device's inner loops stop when its own tasks have
        converged, and the devices meet once, to sum the hypergradients. `"auto"` jits the
        `vmap` over the whole meta-batch and lets the compiler partition it: the same numbers,
        but a batched `while_loop` then runs until every task of the meta-batch has converged
        and agrees on its predicate across all devices at every iteration (an all-reduce per
        inner step, costly across processes).
    """
    if partitioning not in PARTITIONINGS:
        raise ValueError(f"`partitioning` must be one of {PARTITIONINGS}, got {partitioning!r}.")
    opt = optimizer(learning_rate)
    replicated = NamedSharding(mesh, P())
    per_task = functools.partial(task_value_and_grad, method=method, unrolled_steps=unrolled_steps)
    exact_grad = jax.grad(closed_form_val_loss)

    def task_sums(lam, tasks):
        values, grads = jax.vmap(per_task, in_axes=(None, 0))(lam, tasks)
        exact = jax.vmap(exact_grad, in_axes=(None, 0))(lam, tasks)
        return jnp.sum(values), jnp.sum(grads, axis=0), jnp.sum(exact, axis=0)

    def device_sums(lam, tasks):
        return jax.lax.psum(task_sums(lam, tasks), TASKS)

    if partitioning == "shard_map":
        # `check_vma=False`: the solvers' loops (bilevax's, lineax's CG) start from constants
        # that shard_map's type system does not know vary across devices as the task data do;
        # the `psum` is what makes the outputs replicated.
        sums = jax.shard_map(
            device_sums, mesh=mesh, in_specs=(P(), P(TASKS)), out_specs=P(), check_vma=False
        )
    else:
        sums = task_sums

    @functools.partial(jax.jit, out_shardings=replicated)
    def meta_step(lam, opt_state, tasks):
        num_tasks = jax.tree.leaves(tasks)[0].shape[0]
        value, grad, exact = sums(lam, tasks)
        meta_grad, exact = grad / num_tasks, exact / num_tasks
        lam, opt_state = optax_step(opt, meta_grad, opt_state, lam)
        info = {
            "val_loss": value / num_tasks,
            "meta_grad": meta_grad,
            "relerr": problems.relerr(meta_grad, exact),
        }
        return lam, opt_state, info

    return meta_step, opt


def evaluate(lam, seed: int, num_tasks: int) -> float:
    """Mean validation MSE at the exact inner solutions on `num_tasks` held-out tasks (NumPy,
    the same on every process)."""
    tasks = make_tasks(seed, TEST_STREAM, 0, range(num_tasks))
    (X, y), (Xv, yv) = tasks["train"], tasks["val"]
    A = np.einsum("bni,bnj->bij", X, X) / N_TRAIN + np.diag(np.exp(np.asarray(lam)))
    w = np.linalg.solve(A, np.einsum("bni,bn->bi", X, y)[..., None] / N_TRAIN)[..., 0]
    return float(np.mean((np.einsum("bni,bi->bn", Xv, w) - yv) ** 2))


def meta_train(args, mesh: Mesh, run: _harness.Run) -> dict:
    """Adam on λ over `args.steps` meta-batches of `args.meta_batch` tasks, checkpointed after
    every step."""
    meta_step, opt = make_meta_step(
        mesh, args.method, args.lr, args.unrolled_steps, args.partitioning
    )
    local = _distributed.local_task_range(args.meta_batch, mesh)

    def fresh():
        lam0 = np.zeros(D)
        history = {"val_loss": [], "relerr": [], "meta_grad": [], "log_lam": []}
        return dict(lam=lam0, opt_state=opt.init(jnp.asarray(lam0)), history=history)

    def replicated(state):
        # The outer state lives on every device of every process, identical everywhere.
        state["lam"], state["opt_state"] = _distributed.replicate(
            (state["lam"], state["opt_state"]), mesh
        )
        return state

    def step(k, state):
        tasks = make_tasks(args.seed, TRAIN_STREAM, k, local)  # this process's share
        tasks = _distributed.global_batch_from_local(tasks, mesh)
        state["lam"], state["opt_state"], info = meta_step(state["lam"], state["opt_state"], tasks)
        info = _distributed.to_host(dict(info, log_lam=state["lam"]))
        for key, values in state["history"].items():
            values.append(info[key])
        best = min(float(v) for v in state["history"]["val_loss"])
        relerr = float(info["relerr"])
        return state, f"val {float(info['val_loss']):.4f}  best {best:.4f}  relerr {relerr:.1e}"

    state = run.loop(
        "meta_ho", args.steps, fresh, step, description="meta-steps", prepare=replicated
    )
    lam, opt_state = _distributed.to_host((state["lam"], state["opt_state"]))
    return dict(lam=lam, opt_state=opt_state, history=state["history"])


def plot(results: dict, path):
    plt = _outputs.pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    val = np.asarray(results["history"]["val_loss"])
    window = max(1, len(val) // 20)
    left.plot(val, alpha=0.4, label="meta-batch")
    left.plot(np.convolve(val, np.ones(window) / window, mode="valid"), label="moving mean")
    left.axhline(results["test"]["bayes"], color="k", ls="--", lw=1, label="Bayes λ (test)")
    left.set(xlabel="meta-step", ylabel="validation MSE", title="Meta-training")
    left.legend()
    lam = np.asarray(results["history"]["log_lam"])
    for i in range(D):
        middle.plot(lam[:, i], color=plt.cm.viridis(i / (D - 1)))
        middle.axhline(results["bayes_log_lam"][i], color=plt.cm.viridis(i / (D - 1)), ls=":", lw=1)
    middle.set(xlabel="meta-step", ylabel="λ_i (dotted: Bayes)", title="Per-feature log L2")
    right.semilogy(results["history"]["relerr"])
    right.set(xlabel="meta-step", ylabel="relative error", title="Meta-gradient vs closed form")
    return _outputs.save_figure(fig, path)


def main(argv=None) -> dict:
    p = _cli.parser("meta_ho", __doc__.splitlines()[0], distributed=True)
    p.add_argument("--steps", type=int, default=None, help="meta-steps (300; 40 with --quick)")
    p.add_argument("--meta-batch", type=int, default=16, help="tasks per meta-step, in all")
    p.add_argument("--method", choices=("implicit", "unrolled"), default="implicit")
    p.add_argument("--unrolled-steps", type=int, default=200, help="T for --method unrolled")
    p.add_argument("--lr", type=float, default=0.1, help="Adam's learning rate on λ")
    p.add_argument(
        "--partitioning",
        choices=PARTITIONINGS,
        default="auto",
        help="the compiler's partitioning of the vmap (auto), or one program per device "
        "(shard_map)",
    )
    p.add_argument("--test-tasks", type=int, default=500)
    args = p.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 300)
    # More meta-steps continue a run; the held-out evaluation comes after training.
    run = _harness.start(args, may_grow=("steps",), may_change=("test_tasks",))
    mesh = _distributed.make_mesh()
    start = time.perf_counter()
    trained = meta_train(args, mesh, run)
    seconds = time.perf_counter() - start

    lam, history = np.asarray(trained["lam"]), trained["history"]
    results = {
        "log_lam": lam,
        "bayes_log_lam": bayes_lam(),
        "opt_state": jax.tree.map(np.asarray, trained["opt_state"]),
        "history": history,
        "test": {
            "learned": evaluate(lam, args.seed, args.test_tasks),
            "bayes": evaluate(bayes_lam(), args.seed, args.test_tasks),
            "initial": evaluate(np.zeros(D), args.seed, args.test_tasks),
        },
        "meta_grad_relerr_max": float(np.max(history["relerr"])),
        "config": dict(
            run.config,
            num_processes=jax.process_count(),
            num_devices=jax.device_count(),
            seconds=seconds,
        ),
    }
    t = results["test"]
    _console.console.print(
        f"test MSE: learned λ {t['learned']:.4f}, Bayes λ {t['bayes']:.4f}, "
        f"λ = 0 {t['initial']:.4f}; meta-gradient relerr ≤ "
        f"{results['meta_grad_relerr_max']:.1e}; {jax.process_count()} process(es), "
        f"{jax.device_count()} device(s)."
    )
    return run.finish(results, {"meta_ho.png": lambda path: plot(results, path)})


if __name__ == "__main__":
    _cli.cli(main)
