"""One hyper-representation meta-step: bilevax against hand-written JAX and PyTorch.

The meta-step of `experiments.hyper_representation` (Franceschi et al. 2018): a meta-batch of
Omniglot-sized 5-way 1-shot episodes (15 queries per class, random pixels: speed does not
depend on them), the 4-block conv net with 64 filters and per-episode batch norm, a linear head
trained from zero by T = 5 gradient steps with the learned step size, the query loss
back-propagated through the steps, then one Adam update; float32. Contenders, all from the
same initial weights:

- bilevax: `make_meta_step` (the head trained by `bx.inner_solve` with `bx.UnrolledAdjoint`,
  `jax.vmap` over episodes, `jax.jit`), NHWC;
- hand-written JAX: the same function with the T steps written as a Python loop of `jax.grad`
  steps (unrolled at trace time), NHWC;
- PyTorch, batched with `torch.func`: `grad` of the mean over `vmap`-ed episodes, the T steps
  written with `torch.func.grad`, then `torch.optim.Adam` (NCHW, PyTorch's native layout);
- PyTorch, `vmap` of per-episode `grad` (the literal per-episode meta-gradient, then the mean).

Before timing, the four meta-gradients are compared (float32 tolerance). Times are medians of
interleaved repeats (A B C D A B C D ...), so that load on a shared machine falls on all alike.
Without PyTorch (it is in the `bench` extra, never in `test` / `experiments`) the PyTorch rows
are skipped with "skipped: torch not installed". PyTorch runs with its default threads; on a
GPU (`torch.cuda.is_available()`) it runs there, synchronised after each step.

    python -m experiments.benchmarks.hyper_representation_step [--quick] [--out DIR]
"""

import statistics

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _cli
from ..hyper_representation import (
    Batch,
    HyperRepresentation,
    episode_loss as bilevax_episode_loss,
    init_state,
    make_meta_step,
)
from ..problems import relerr
from ._calls import time_calls
from ._timing import compile_fn, finish, format_table, outputs, parser


NAME = "hyper_representation_step"
N_WAY, K_SHOT, N_QUERY, T = 5, 1, 15, 5
LEARNING_RATE = 1e-3
GOAL_VS_HAND_WRITTEN = 1.10  # bilevax time / hand-written JAX time, at most
GOAL_VS_TORCH = 0.25  # bilevax time / batched PyTorch time on a GPU (4x faster); CPU: 1.0


def make_batch(meta_batch: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    labels = lambda m: np.tile(np.repeat(np.arange(N_WAY, dtype=np.int32), m), (meta_batch, 1))
    return Batch(
        rng.random((meta_batch, N_WAY * K_SHOT, 28, 28, 1), np.float32),
        labels(K_SHOT),
        rng.random((meta_batch, N_WAY * N_QUERY, 28, 28, 1), np.float32),
        labels(N_QUERY),
    )


# -- hand-written JAX --------------------------------------------------------------------------


def hand_written_episode_loss(model, support, support_labels, query, query_labels):
    features = model.net(jnp.concatenate([support, query]))
    fs, fq = features[: support.shape[0]], features[support.shape[0] :]

    def ce(W, b, f, y):
        logp = jax.nn.log_softmax(f @ W + b)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    W = jnp.zeros((fs.shape[1], N_WAY), fs.dtype)
    b = jnp.zeros(N_WAY, fs.dtype)
    # The step relative to the support loss's curvature bound.
    z = jnp.concatenate([fs, jnp.ones((fs.shape[0], 1), fs.dtype)], 1)
    eta = model.step_size() / (0.5 * jnp.linalg.eigvalsh(z @ z.T / z.shape[0])[-1])
    for _ in range(T):
        gW, gb = jax.grad(ce, argnums=(0, 1))(W, b, fs, support_labels)
        W, b = W - eta * gW, b - eta * gb
    return ce(W, b, fq, query_labels)


def hand_written_meta_step(optimizer):
    def step(state, batch):
        params, static = eqx.partition(state.model, eqx.is_inexact_array)

        def loss(p):
            model = eqx.combine(p, static)
            return jnp.mean(jax.vmap(lambda *e: hand_written_episode_loss(model, *e))(*batch))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.combine(optax.apply_updates(params, updates), static)
        return type(state)(model, opt_state, state.step + 1), {"loss": value}

    return step


def jax_meta_gradient(episode_loss_fn, model, batch):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, batch):
        model = eqx.combine(p, static)
        return jnp.mean(jax.vmap(lambda *e: episode_loss_fn(model, *e))(*batch))

    # The batch is an argument: closed over, XLA would constant-fold it for minutes.
    return jax.jit(jax.grad(loss))(params, jax.device_put(batch))


# -- PyTorch -----------------------------------------------------------------------------------


def torch_contenders(model: HyperRepresentation, batch: Batch):
    """`(step functions, meta-gradient functions, device, torch version)` for the two PyTorch
    variants, or `None` without PyTorch."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.func import grad, vmap
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def tensor(x):
        return torch.tensor(np.asarray(x), device=device)

    params = {}
    for i, block in enumerate(model.net.blocks):
        params[f"w{i}"] = tensor(np.transpose(np.asarray(block.weight), (3, 2, 0, 1)).copy())
        params[f"scale{i}"] = tensor(block.scale)
        params[f"offset{i}"] = tensor(block.offset)
    params["raw_step"] = tensor(model.raw_step)
    params = {k: v.requires_grad_() for k, v in params.items()}
    max_step = model.max_step_size
    depth = len(model.net.blocks)
    nchw = lambda x: tensor(np.transpose(np.asarray(x), (0, 1, 4, 2, 3)).copy())
    data = (nchw(batch.support), tensor(batch.support_labels).long(), nchw(batch.query))
    data = (*data, tensor(batch.query_labels).long())

    def net(p, x):
        for i in range(depth):
            y = F.conv2d(x, p[f"w{i}"], padding=1)
            mean = y.mean(dim=(0, 2, 3), keepdim=True)
            var = (y - mean).square().mean(dim=(0, 2, 3), keepdim=True)
            y = (y - mean) * torch.rsqrt(var + 1e-5)
            y = y * p[f"scale{i}"][:, None, None] + p[f"offset{i}"][:, None, None]
            x = F.max_pool2d(F.relu(y), 2)
        return x.flatten(1)

    def ce(W, b, f, y):
        return F.cross_entropy(f @ W + b, y)

    def episode_loss(p, support, support_labels, query, query_labels):
        features = net(p, torch.cat([support, query]))
        fs, fq = features[: support.shape[0]], features[support.shape[0] :]
        W = fs.new_zeros((fs.shape[1], N_WAY))
        b = fs.new_zeros(N_WAY)
        z = torch.cat([fs, fs.new_ones((fs.shape[0], 1))], 1)
        smoothness = 0.5 * torch.linalg.eigvalsh(z @ z.T / z.shape[0])[-1]
        eta = max_step * torch.sigmoid(p["raw_step"]) / smoothness
        inner_grad = grad(ce, argnums=(0, 1))
        for _ in range(T):
            gW, gb = inner_grad(W, b, fs, support_labels)
            W, b = W - eta * gW, b - eta * gb
        return ce(W, b, fq, query_labels)

    def grad_of_mean(p):
        return grad(lambda p: vmap(episode_loss, in_dims=(None, 0, 0, 0, 0))(p, *data).mean())(p)

    def mean_of_grads(p):
        per_episode = vmap(grad(episode_loss), in_dims=(None, 0, 0, 0, 0))(p, *data)
        return {k: v.mean(0) for k, v in per_episode.items()}

    optimizer = torch.optim.Adam(list(params.values()), lr=LEARNING_RATE)

    def stepper(meta_gradient):
        def step():
            grads = meta_gradient({k: v.detach() for k, v in params.items()})
            for k, v in params.items():
                v.grad = grads[k]
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()

        return step

    gradients = {
        "torch.func grad(mean(vmap))": grad_of_mean,
        "torch.func vmap(grad)": mean_of_grads,
    }
    steps = {name: stepper(fn) for name, fn in gradients.items()}
    snapshot = {k: v.detach().clone() for k, v in params.items()}

    def meta_gradient_np(fn):
        g = fn(snapshot)
        out = {k: v.detach().cpu().numpy() for k, v in g.items()}
        for i in range(depth):
            out[f"w{i}"] = np.transpose(out[f"w{i}"], (2, 3, 1, 0))  # back to HWIO
        return out

    return (
        steps,
        {k: (lambda fn=fn: meta_gradient_np(fn)) for k, fn in gradients.items()},
        device,
        torch.__version__,
    )


def flat_jax_gradient(grads) -> dict:
    out = {}
    for i, block in enumerate(grads.net.blocks):
        out[f"w{i}"], out[f"scale{i}"], out[f"offset{i}"] = map(
            np.asarray, (block.weight, block.scale, block.offset)
        )
    out["raw_step"] = np.asarray(grads.raw_step)
    return out


# -- timing ------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--meta-batch", type=int, default=None, help="(default 32; 4 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="(default 7; 3 with --quick)")
    args = p.parse_args(argv)
    args.meta_batch = args.meta_batch or (4 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 7)
    x64 = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", False)
    try:
        return _main(args)
    finally:
        jax.config.update("jax_enable_x64", x64)


def _main(args) -> dict:
    out = outputs(args, NAME)
    meta_batch, repeats = args.meta_batch, args.repeats
    model = HyperRepresentation(64, key=jax.random.key(0))
    batch = make_batch(meta_batch)
    optimizer = optax.adam(LEARNING_RATE)
    state = init_state(model, optimizer)
    device_batch = jax.device_put(batch)

    # The meta-gradients first: every contender must compute the same one.
    ours = flat_jax_gradient(
        jax_meta_gradient(
            lambda m, *e: bilevax_episode_loss(m, *e, n_way=N_WAY, num_steps=T)[0], model, batch
        )
    )
    checks = {}
    bilevax_step = make_meta_step(optimizer, N_WAY, T)
    hand_step = jax.jit(hand_written_meta_step(optimizer))
    torch_parts = torch_contenders(model, batch)

    calls = {}
    compile_s = {}
    for name, fn in (("bilevax", bilevax_step), ("hand-written JAX", hand_step)):
        jitted, compile_s[name] = compile_fn(fn, state, device_batch)
        calls[name] = lambda jitted=jitted: jax.block_until_ready(jitted(state, device_batch))
    if torch_parts is None:
        print("skipped: torch not installed (the PyTorch contenders)")
        torch_device = torch_version = None
    else:
        steps, gradients, torch_device, torch_version = torch_parts
        for name, grad_fn in gradients.items():
            checks[name] = relerr(grad_fn(), ours)
        calls.update(steps)
    hand_grads = flat_jax_gradient(jax_meta_gradient(hand_written_episode_loss, model, batch))
    checks["hand-written JAX"] = relerr(hand_grads, ours)
    for name, err in checks.items():
        if not err < 5e-4:
            raise AssertionError(f"{name}'s meta-gradient differs from bilevax's: relerr {err:.1e}")

    timings = time_calls(calls, repeats=repeats, min_run_s=0.0 if args.quick else 1.0)
    base = timings["bilevax"].run_s
    rows = []
    for name, t in timings.items():
        rows.append(
            dict(
                contender=name,
                ms=1e3 * t.run_s,
                bilevax_ratio=base / t.run_s,
                # Per repeat, then the median: steadier than a ratio of medians under load.
                paired_ratio=statistics.median(
                    b / x for b, x in zip(timings["bilevax"].runs, t.runs)
                ),
                grad_relerr=checks.get(name, 0.0),
                spread=t.spread,
            )
        )
    print(f"meta-step, meta-batch {meta_batch}, {N_WAY}-way {K_SHOT}-shot, T = {T}, float32")
    columns = ["contender", "ms", "bilevax_ratio", "paired_ratio", "grad_relerr", "spread"]
    print(format_table(rows, columns))
    torch_names = [n for n in timings if n.startswith("torch")]
    summary = dict(
        vs_hand_written=base / timings["hand-written JAX"].run_s,
        goal_vs_hand_written=GOAL_VS_HAND_WRITTEN,
    )
    if torch_names:
        best_torch = min(torch_names, key=lambda n: timings[n].run_s)
        summary.update(
            fastest_torch=best_torch,
            torch_over_bilevax=timings[best_torch].run_s / base,
            goal_torch_over_bilevax=1 / GOAL_VS_TORCH,
        )
        print(
            f"bilevax / hand-written JAX: {summary['vs_hand_written']:.2f}  "
            f"(goal ≤ {GOAL_VS_HAND_WRITTEN});  {best_torch} / bilevax: "
            f"{summary['torch_over_bilevax']:.2f}x"
        )
    result = dict(
        problem=dict(
            meta_batch=meta_batch,
            n_way=N_WAY,
            k_shot=K_SHOT,
            n_query=N_QUERY,
            T=T,
            repeats=repeats,
            quick=args.quick,
        ),
        rows=rows,
        timings=timings,
        compile_s=compile_s,
        summary=summary,
        torch=dict(version=torch_version, device=torch_device),
    )
    finish(args, NAME, out, result)
    return result


if __name__ == "__main__":
    _cli.cli(main)
