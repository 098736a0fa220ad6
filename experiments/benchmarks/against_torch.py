"""bilevax against PyTorch peers (torchopt and plain `torch.func`), on the same problems, in
float64 on CPU (and on a GPU when JAX and PyTorch both see one).

Two problems:

1. **Implicit hypergradient, logistic-regression L2 HO** (the problem of
    `implicit_vs_jaxopt`: breast cancer d = 30 and synthetic d = 2,000, without `--quick`
    also d = 100,000; one strength or one per feature). Both contenders get the same w*
    (Newton-CG, apart) and run the same number K of CG iterations from zero (bilevax:
    `lx.CG(0, 0, max_steps=K)`; torchopt: `custom_root(..., solve=solve_cg(rtol=0, atol=0,
    maxiter=K))`), so they compute the same Krylov iterate; K is the number lineax needs for
    `tol = 1e-10`. bilevax: `bx.implicit_hypergrad`, jitted; torchopt:
    `torchopt.diff.implicit.custom_root` around a solver returning w*, then `autograd.grad`.
2. **Few-shot meta-step with a 2-layer MLP** (MAML-style: the initialisation is the
    hyperparameter; T inner SGD steps on each task's support set, the meta-gradient of the
    mean query loss over a meta-batch of B tasks). bilevax: `bx.unrolled_hypergrad` with
    `init=lambda θ: θ`, vmapped over tasks, jitted; `torch.func`: `grad` of the mean over a
    `vmap` of the unrolled inner loop; torchopt: `MetaSGD` on an `nn.Module`, a Python loop
    over tasks with `extract_state_dict` / `recover_state_dict` (torchopt's MAML example).

Every contender's hypergradient is checked against bilevax's (and, for the logistic problem,
against a dense-Hessian solve) before timing. Run times are medians of interleaved runs
(bilevax, torch, bilevax, torch, ...) on the same machine in one process; bilevax's compile
time is reported apart (PyTorch runs eagerly and has none). PyTorch runs with one intra-op
thread by default (`--torch-threads`): on the shared 2-core machine these figures were taken
on, its OpenMP pool with 2 threads made the small MLP meta-step 25-40x slower (threads
spin-waiting for a core), so one thread is PyTorch's best case there; XLA keeps its own pool.

Without PyTorch (it is in the `bench` extra, not in `test` / `experiments`), the benchmark
prints "skipped: torch not installed" and returns.
"""

import math
import time
import warnings

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

import bilevax as bx

from .. import _cli, _outputs
from ..problems import relerr
from . import _problems
from ._calls import time_calls
from ._timing import block, compile_fn, finish, format_table, outputs, parser


jax.config.update("jax_enable_x64", True)

NAME = "against_torch"


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import torchopt  # noqa: F401
    except ImportError:
        return False
    return True


# -- 1. logistic regression, implicit ------------------------------------------------------------


def torchopt_implicit(train, val, w_star, cg_steps: int, device):
    """A zero-argument callable: torchopt's implicit hypergradient at `lam`, returning
    `(value, hypergrad)` as NumPy arrays after a `synchronize`."""
    import torch
    import torchopt

    as_t = lambda a: torch.tensor(np.array(a), dtype=torch.float64, device=device)
    Xt, yt = map(as_t, train)
    Xv, yv = map(as_t, val)
    w_star = as_t(w_star)

    def log_loss(w, X, y):
        z = X @ w
        return torch.mean(torch.logaddexp(torch.zeros_like(z), z) - y * z)

    def inner(w, lam, X, y):
        return log_loss(w, X, y) + 0.5 * torch.sum(torch.exp(lam) * w**2)

    optimality = torch.func.grad(inner)
    solve = torchopt.linear_solve.solve_cg(rtol=0.0, atol=0.0, maxiter=cg_steps)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(w, lam, X, y):
        del lam, X, y
        return w_star

    def hypergrad(lam0):
        lam = lam0.detach().clone().requires_grad_(True)
        w = solver(w_star, lam, Xt, yt)
        value = log_loss(w, Xv, yv)
        (grad,) = torch.autograd.grad(value, lam)
        return value.detach(), grad

    return hypergrad, as_t


def run_logistic(quick: bool, repeats: int, device, log) -> list[dict]:
    import torch

    rows = []
    for name, train, val, lam, per_feature in _problems.make_cases(quick):
        d = train[0].shape[1]
        label = f"{name}/{'per-feature' if per_feature else 'scalar'} λ"
        w, grad_norm = _problems.newton_cg(jnp.zeros(d), lam, train)
        w = block(w)
        steps = _problems.lineax_steps(lx.CG(1e-10, 1e-10), w, lam, train, val)
        cg = lx.CG(rtol=0.0, atol=0.0, max_steps=steps)
        args = (w, lam, train, val)
        jitted, compile_s = compile_fn(_problems.bilevax_hypergrad(cg), *args)
        out_b = block(jitted(*args))
        torch_fn, as_t = torchopt_implicit(train, val, w, steps, device)
        lam_t = as_t(lam)
        out_t = torch_fn(lam_t)
        agree = relerr(out_t[1].cpu().numpy(), out_b[1])
        err_b = math.nan
        if d <= _problems.DENSE_MAX_D:
            err_b = relerr(out_b[1], jax.jit(_problems.dense_reference)(*args)[1])
        if not (agree <= 1e-6 and (math.isnan(err_b) or err_b <= 1e-6)):
            raise AssertionError(f"[{label}] torchopt {agree:.1e}, bilevax vs dense {err_b:.1e}")

        def torch_call():
            out = torch_fn(lam_t)
            if device != "cpu":
                torch.cuda.synchronize()
            return out

        times = time_calls(
            {"bilevax": lambda: block(jitted(*args)), "torchopt": torch_call},
            compile_s={"bilevax": compile_s},
            repeats=3 if d > 10_000 else repeats,
            min_run_s=0.02,
        )
        rows.append(_row("logistic implicit", label, d, steps, times, agree, "torchopt"))
        log(
            f"[{label}] K = {steps} CG steps: bilevax {times['bilevax'].run_s * 1e3:.3g} ms, "
            f"torchopt {times['torchopt'].run_s * 1e3:.3g} ms"
        )
    return rows


def _row(problem, case, size, steps, times, agree, peer) -> dict:
    bx_t, peer_t = times["bilevax"], times[peer]
    return {
        "problem": problem,
        "case": case,
        "size": size,
        "steps": steps,
        "peer": peer,
        "run_bx_s": bx_t.run_s,
        "run_peer_s": peer_t.run_s,
        "ratio": statistics_median_ratio(bx_t, peer_t),
        "compile_bx_s": bx_t.compile_s,
        "agree": agree,
        "timing_bx": bx_t.to_dict(),
        "timing_peer": peer_t.to_dict(),
    }


def statistics_median_ratio(a, b) -> float:
    """Median of the paired per-run ratios a/b (the runs were interleaved)."""
    return float(np.median([x / y for x, y in zip(a.runs, b.runs)]))


# -- 2. MLP few-shot meta-step -------------------------------------------------------------------


def few_shot_tasks(batch, ways, shots, queries, features, seed=0):
    """Synthetic N-way K-shot episodes: class centres in R^features, Gaussian points around."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((batch, ways, features))

    def sample(per_class):
        labels = np.tile(np.arange(ways), per_class)
        x = centres[:, labels] + 0.8 * rng.standard_normal((batch, ways * per_class, features))
        return x, np.broadcast_to(labels, (batch, ways * per_class)).copy()

    return sample(shots), sample(queries)


def init_mlp(features, hidden, ways, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((features, hidden)) / np.sqrt(features),
        "b1": np.zeros(hidden),
        "W2": rng.standard_normal((hidden, ways)) / np.sqrt(hidden),
        "b2": np.zeros(ways),
    }


def jax_cross_entropy(params, data):
    x, y = data
    logits = jnp.tanh(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
    picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def bilevax_meta_step(num_steps, lr):
    def inner(params, theta, data):
        del theta
        return jax_cross_entropy(params, data)

    def outer(params, theta, data):
        del theta
        return jax_cross_entropy(params, data)

    def one_task(theta, support, query):
        return bx.unrolled_hypergrad(
            outer,
            inner,
            lambda theta: theta,
            theta,
            support,
            query,
            solver=bx.GradientDescent(lr),
            num_steps=num_steps,
        )

    def meta_step(theta, support, query):
        values, grads = jax.vmap(one_task, in_axes=(None, 0, 0))(theta, support, query)
        return jnp.mean(values), jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)

    return meta_step


def torch_func_meta_step(num_steps, lr):
    import torch
    import torch.nn.functional as F

    def cross_entropy(p, x, y):
        return F.cross_entropy(torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"], y)

    inner_grad = torch.func.grad(cross_entropy)

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(num_steps):
            g = inner_grad(p, xs, ys)
            p = {k: p[k] - lr * g[k] for k in p}
        return cross_entropy(p, xq, yq)

    batched = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
    grad_fn = torch.func.grad_and_value(lambda p, *data: batched(p, *data).mean())

    def meta_step(theta, xs, ys, xq, yq):
        grads, value = grad_fn(theta, xs, ys, xq, yq)
        return value, grads

    return meta_step


def torchopt_meta_step(theta, num_steps, lr, device):
    """torchopt's MAML pattern: `MetaSGD` on an `nn.Module`, a Python loop over tasks."""
    import torch
    import torch.nn.functional as F
    import torchopt

    features, hidden = theta["W1"].shape
    ways = theta["W2"].shape[1]
    net = torch.nn.Sequential(
        torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, ways)
    ).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        net[0].weight.copy_(torch.as_tensor(theta["W1"].T))
        net[0].bias.copy_(torch.as_tensor(theta["b1"]))
        net[2].weight.copy_(torch.as_tensor(theta["W2"].T))
        net[2].bias.copy_(torch.as_tensor(theta["b2"]))
    inner_opt = torchopt.MetaSGD(net, lr=lr)

    def meta_step(xs, ys, xq, yq):
        batch = xs.shape[0]
        net.zero_grad()
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        total = 0.0
        for i in range(batch):
            for _ in range(num_steps):
                inner_opt.step(F.cross_entropy(net(xs[i]), ys[i]))
            query_loss = F.cross_entropy(net(xq[i]), yq[i]) / batch
            query_loss.backward()
            total += float(query_loss.detach())
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        grads = {
            "W1": net[0].weight.grad.T,
            "b1": net[0].bias.grad,
            "W2": net[2].weight.grad.T,
            "b2": net[2].bias.grad,
        }
        return total, grads

    return meta_step


def run_mlp(quick: bool, repeats: int, device, log) -> list[dict]:
    import torch

    ways, shots, queries, features, hidden = 5, 5, 15, 64, 64
    num_steps, lr = 5, 0.4
    rows = []
    for batch in [1, 4] if quick else [1, 4, 16]:
        (xs, ys), (xq, yq) = few_shot_tasks(batch, ways, shots, queries, features)
        theta = init_mlp(features, hidden, ways)
        as_t = lambda a, dtype=torch.float64: torch.as_tensor(a, dtype=dtype, device=device)
        support, query = (jnp.asarray(xs), jnp.asarray(ys)), (jnp.asarray(xq), jnp.asarray(yq))
        theta_j = jax.tree.map(jnp.asarray, theta)
        args = (theta_j, support, query)
        jitted, compile_s = compile_fn(bilevax_meta_step(num_steps, lr), *args)
        out_b = block(jitted(*args))
        theta_t = {k: as_t(v) for k, v in theta.items()}
        data_t = (as_t(xs), as_t(ys, torch.long), as_t(xq), as_t(yq, torch.long))
        func_fn = torch_func_meta_step(num_steps, lr)
        opt_fn = torchopt_meta_step(theta, num_steps, lr, device)
        flat = lambda g: np.concatenate([np.ravel(np.asarray(g[k])) for k in sorted(g)])
        grads_t = {k: v.detach().cpu().numpy() for k, v in func_fn(theta_t, *data_t)[1].items()}
        grads_o = {k: v.detach().cpu().numpy() for k, v in opt_fn(*data_t)[1].items()}
        agree = {
            "torch.func": relerr(flat(grads_t), flat(out_b[1])),
            "torchopt": relerr(flat(grads_o), flat(out_b[1])),
        }
        if not max(agree.values()) <= 1e-10:
            raise AssertionError(f"[MLP, B={batch}] meta-gradients differ: {agree}")

        def sync(out):
            if device != "cpu":
                torch.cuda.synchronize()
            return out

        times = time_calls(
            {
                "bilevax": lambda: block(jitted(*args)),
                "torch.func": lambda: sync(func_fn(theta_t, *data_t)),
                "torchopt": lambda: sync(opt_fn(*data_t)),
            },
            compile_s={"bilevax": compile_s},
            repeats=repeats,
            min_run_s=0.02,
        )
        case = f"{ways}-way {shots}-shot, B={batch}, T={num_steps}"
        for peer in ("torch.func", "torchopt"):
            rows.append(_row("MLP meta-step", case, batch, num_steps, times, agree[peer], peer))
        log(
            f"[MLP {case}] bilevax {times['bilevax'].run_s * 1e3:.3g} ms, torch.func "
            f"{times['torch.func'].run_s * 1e3:.3g} ms, torchopt "
            f"{times['torchopt'].run_s * 1e3:.3g} ms"
        )
    return rows


COLUMNS = [
    "problem",
    "case",
    "peer",
    "steps",
    "run_bx_s",
    "run_peer_s",
    "ratio",
    "compile_bx_s",
    "agree",
]


def main(argv=None) -> list[dict]:
    p = parser(NAME, "bilevax vs torchopt / torch.func")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="PyTorch intra-op threads (default 1: see the module docstring)",
    )
    args = p.parse_args(argv)
    if not torch_available():
        print("skipped: torch not installed (pip install 'bilevax[bench]')")
        return []
    out = outputs(args, NAME)
    import torch

    torch.set_num_threads(args.torch_threads)
    # torchopt 0.7 still calls `functorch.vjp`, which warns on every call.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*functorch")

    log = lambda message: print(message, flush=True)
    devices = ["cpu"]
    if torch.cuda.is_available() and jax.default_backend() == "gpu":
        devices.append("cuda")
    repeats = 7 if args.quick else 11
    rows = []
    for device in devices:
        start = time.perf_counter()
        # JAX places arrays on its default device; only compare like with like.
        if device == "cpu" and jax.default_backend() != "cpu":
            log("JAX's default device is not the CPU: CPU rows compare against JAX on it")
        for row in run_logistic(args.quick, repeats, device, log) + run_mlp(
            args.quick, repeats, device, log
        ):
            rows.append({"device": device, **row})
        log(f"[{device}] {time.perf_counter() - start:.0f} s")
    print()
    print(format_table(rows, ["device", *COLUMNS]))
    print(
        "\nratio = bilevax / peer run time (median of paired, interleaved runs; < 1: bilevax "
        "faster); agree = relative difference of the hypergradients; float64; torch threads "
        f"= {torch.get_num_threads()}."
    )
    payload = {"torch": torch.__version__, "rows": rows}
    finish(args, NAME, out, payload, lambda path: plot(path, rows))
    return rows


def plot(path, rows):
    labels = [
        f"{r['case']}\nvs {r['peer']}" + ("" if r["device"] == "cpu" else " (GPU)") for r in rows
    ]
    fig, ax = _outputs.pyplot().subplots(figsize=(max(6.0, 0.8 * len(rows) + 2), 4.8))
    x = np.arange(len(rows))
    colours = ["tab:green" if r["ratio"] <= 1 else "tab:red" for r in rows]
    ax.bar(x, [r["ratio"] for r in rows], 0.6, color=colours)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("bilevax / peer run time")
    ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=7)
    ax.set_title("bilevax against PyTorch peers (float64; < 1: bilevax faster)")
    return _outputs.save_figure(fig, path)


if __name__ == "__main__":
    _cli.cli(main)
