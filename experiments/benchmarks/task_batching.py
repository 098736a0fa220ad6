"""Task batching: hypergradients of B tasks at once with `jax.vmap` (one compiled call)
against a Python loop over tasks, and the vmapped call sharded over 1, 2 and 4 devices.

Each task is logistic regression on its own data (n = 40 training and 40 validation points,
d = 20 features) with one shared per-feature L2 hyperparameter λ; its hypergradient is
`jax.value_and_grad` of the validation loss through `bx.inner_solve(..., adjoint=
bx.ImplicitAdjoint(lx.CG(...)))` with gradient descent to a tolerance (each task stops on its
own test, also under `vmap`). Contenders, B = 1 ... 1,024:

- `vmap`: `jax.jit(jax.vmap(hypergrad, in_axes=(None, 0)))` on the stacked tasks;
- `loop`: a Python loop calling `jax.jit(hypergrad)` once per task (dispatch included), the
    results blocked on at the end.

A vmapped `while_loop` keeps stepping until its slowest task has stopped (the finished ones
are frozen but still computed), so `vmap` pays the maximum number of inner steps over the
batch for every task, the loop the mean: both are reported.

Both must agree to 1e-12 relative before timing; their runs are interleaved.

Devices: a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4` (CPU; real
devices on a GPU machine) jits the same vmapped function with the task axis sharded over a
mesh of D = 1, 2, 4 devices (`NamedSharding(mesh, P("tasks"))`), checks it against D = 1, and
times it. Forced host devices share the machine's cores, so on a 2-core CPU they show the cost
of the sharding machinery more than a speed-up.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

import bilevax as bx

from .. import _cli, _outputs
from ..problems import log_loss, logistic_loss as inner_loss, relerr
from ._calls import time_calls
from ._timing import block, compile_fn, finish, format_table, log_axes, outputs, parser


jax.config.update("jax_enable_x64", True)

NAME = "task_batching"
N, D = 40, 20


def make_tasks(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, 2 * N, D)) * rng.uniform(0.5, 1.5, (batch, 1, D))
    teacher = rng.standard_normal((batch, D))
    y = (np.einsum("bnd,bd->bn", X, teacher) + rng.standard_normal((batch, 2 * N)) > 0) * 1.0
    return {"train": (X[:, :N], y[:, :N]), "val": (X[:, N:], y[:, N:])}


def solve(lam, task):
    return bx.inner_solve(
        inner_loss,
        jnp.zeros(D, lam.dtype),
        lam,
        task["train"],
        solver=bx.GradientDescent(0.5),
        max_steps=2_000,
        tol=1e-10,
        adjoint=bx.ImplicitAdjoint(lx.CG(rtol=1e-12, atol=1e-12)),
    )


def hypergrad(lam, task):
    def val_loss(lam):
        return log_loss(solve(lam, task).params, task["val"])

    return jax.value_and_grad(val_loss)(lam)


def task(tasks, i):
    return jax.tree.map(lambda x: x[i], tasks)


def run_batch(batch: int, lam, *, repeats: int, log) -> dict:
    tasks = jax.tree.map(jnp.asarray, make_tasks(batch))
    batched, compile_vmap = compile_fn(jax.vmap(hypergrad, in_axes=(None, 0)), lam, tasks)
    single, compile_one = compile_fn(hypergrad, lam, task(tasks, 0))
    per_task = [task(tasks, i) for i in range(batch)]  # sliced once, outside the timing
    out_v = block(batched(lam, tasks))
    out_l = block([single(lam, t) for t in per_task])
    err = relerr(out_v[1], np.stack([g for _, g in out_l]))
    # A vmapped `while_loop` runs until its slowest task stops: every task pays the maximum.
    steps = np.asarray(
        jax.jit(jax.vmap(lambda l, t: solve(l, t).stats["num_steps"], (None, 0)))(lam, tasks)
    )
    if not err <= 1e-12:
        raise AssertionError(f"[B={batch}] vmap and loop disagree: {err:.1e}")

    def loop():
        return block([single(lam, t) for t in per_task])

    times = time_calls(
        {"vmap": lambda: block(batched(lam, tasks)), "loop": loop},
        compile_s={"vmap": compile_vmap, "loop": compile_one},
        repeats=repeats,
        min_run_s=0.02,
    )
    row = {
        "B": batch,
        "vmap_s": times["vmap"].run_s,
        "loop_s": times["loop"].run_s,
        "loop_vs_vmap": times["loop"].run_s / times["vmap"].run_s,
        "vmap_per_task_s": times["vmap"].run_s / batch,
        "compile_vmap_s": compile_vmap,
        "compile_one_s": compile_one,
        "vmap_vs_loop_err": err,
        "inner_steps_mean": float(steps.mean()),
        "inner_steps_max": int(steps.max()),
        "timing_vmap": times["vmap"].to_dict(),
        "timing_loop": times["loop"].to_dict(),
    }
    log(
        f"[B={batch}] vmap {row['vmap_s'] * 1e3:.3g} ms, loop {row['loop_s'] * 1e3:.3g} ms "
        f"(x{row['loop_vs_vmap']:.1f})"
    )
    return row


# -- devices (run in a subprocess with forced host devices) --------------------------------------


def devices_worker(sizes: list[int], repeats: int, out_path: str) -> None:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.devices()
    lam = jnp.linspace(-3.0, -1.0, D)
    fn = jax.vmap(hypergrad, in_axes=(None, 0))
    rows = []
    for batch in sizes:
        tasks = jax.tree.map(jnp.asarray, make_tasks(batch))
        fns, inputs = {}, {}
        for count in (1, 2, 4):
            if count > len(devices) or batch % count:
                continue
            mesh = Mesh(np.array(devices[:count]), ("tasks",))
            sharded = jax.device_put(tasks, NamedSharding(mesh, P("tasks")))
            replicated = jax.device_put(lam, NamedSharding(mesh, P()))
            inputs[count] = (replicated, sharded)
            fns[count] = fn
        outs, calls, compile_s = {}, {}, {}
        for count in fns:
            # Jitted per device count: the arguments differ in their sharding.
            jitted, compile_s[str(count)] = compile_fn(fns[count], *inputs[count])
            outs[count] = block(jitted(*inputs[count]))
            calls[str(count)] = (lambda j, a: lambda: block(j(*a)))(jitted, inputs[count])
        times = time_calls(calls, compile_s=compile_s, repeats=repeats, min_run_s=0.02)
        base = outs[1][1]
        for count in fns:
            err = relerr(outs[count][1], base)
            if not err <= 1e-12:
                raise AssertionError(f"[B={batch}, {count} devices] differs from 1: {err:.1e}")
            rows.append(
                {
                    "B": batch,
                    "devices": count,
                    "run_s": times[str(count)].run_s,
                    "speedup_vs_1": times["1"].run_s / times[str(count)].run_s,
                    "compile_s": times[str(count)].compile_s,
                    "err_vs_1": err,
                    "platform": devices[0].platform,
                }
            )
            print(
                f"[B={batch}, {count} devices] {times[str(count)].run_s * 1e3:.3g} ms",
                flush=True,
            )
    pathlib.Path(out_path).write_text(json.dumps(rows))


def run_devices(sizes, repeats, log) -> list[dict]:
    env = dict(os.environ)
    if jax.default_backend() == "cpu":
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
        env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "devices.json"
        command = [
            sys.executable,
            "-m",
            f"experiments.benchmarks.{NAME}",
            "--devices-worker",
            json.dumps({"sizes": sizes, "repeats": repeats, "out": str(out)}),
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            log(f"devices subprocess failed:\n{result.stderr[-3000:]}")
            return []
        log(result.stdout.strip())
        return json.loads(out.read_text())


def plot(path, rows, device_rows):
    fig, (ax, ax_dev) = _outputs.pyplot().subplots(1, 2, figsize=(11, 4.2))
    Bs = [r["B"] for r in rows]
    ax.plot(Bs, [r["vmap_s"] for r in rows], "o-", label="vmap (one call)")
    ax.plot(Bs, [r["loop_s"] for r in rows], "s--", label="Python loop of jitted calls")
    log_axes(ax, "tasks B", "run time (s)")
    ax.legend()
    ax.set_title("hypergradients of B tasks")
    for count in sorted({r["devices"] for r in device_rows}):
        sub = [r for r in device_rows if r["devices"] == count]
        ax_dev.plot([r["B"] for r in sub], [r["run_s"] for r in sub], "o-", label=f"{count}")
    log_axes(ax_dev, "tasks B", "run time (s)")
    ax_dev.legend(title="devices")
    platform = device_rows[0]["platform"] if device_rows else "cpu"
    ax_dev.set_title(f"vmap sharded over devices ({platform}, forced host devices on CPU)")
    return _outputs.save_figure(fig, path)


COLUMNS = [
    "B",
    "vmap_s",
    "loop_s",
    "loop_vs_vmap",
    "vmap_per_task_s",
    "inner_steps_mean",
    "inner_steps_max",
    "compile_vmap_s",
]
DEVICE_COLUMNS = ["B", "devices", "run_s", "speedup_vs_1", "compile_s", "err_vs_1"]


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--devices-worker":
        spec = json.loads(argv[1])
        devices_worker(spec["sizes"], spec["repeats"], spec["out"])
        return []
    args = parser(NAME, "hypergradients of B tasks: vmap vs a loop, 1-4 devices").parse_args(argv)
    out = outputs(args, NAME)
    log = lambda message: print(message, flush=True)
    sizes = [1, 8, 64, 1024] if args.quick else [1, 4, 16, 64, 256, 1024]
    repeats = 5 if args.quick else 9
    lam = jnp.linspace(-3.0, -1.0, D)
    rows = [run_batch(batch, lam, repeats=repeats, log=log) for batch in sizes]
    device_rows = run_devices([64, 1024] if args.quick else [4, 16, 64, 256, 1024], repeats, log)
    print()
    print(format_table(rows, COLUMNS))
    print()
    print(format_table(device_rows, DEVICE_COLUMNS))
    print(
        f"\nloop_vs_vmap = Python-loop time / vmap time (interleaved runs); n = {N}, d = {D}, "
        "float64. Devices: the vmapped call with the task axis sharded."
    )
    payload = {"problem": {"n_train": N, "d": D}, "rows": rows, "devices": device_rows}
    finish(args, NAME, out, payload, lambda path: plot(path, rows, device_rows))
    return rows


if __name__ == "__main__":
    _cli.cli(main)
