"""Weak scaling of the multi-process meta-step: 1, 2, 4 processes on this machine, a fixed number
of tasks per process.

Each configuration launches P processes on 127.0.0.1 (`jax.distributed`, one CPU device each,
gloo collectives, one XLA thread each, so that a process stands for one core or one
accelerator). They run the meta-step of `experiments.meta_ho` (a meta-batch of ridge tasks,
a hypergradient per task, their mean all-reduced across processes, an Adam step on the shared
hyperparameters), with `--tasks-per-process` tasks each, so the meta-batch grows with P. Three
configurations (METHOD/PARTITIONING): `implicit/auto` (inner solve to tolerance in a batched
`while_loop`, implicit adjoint with CG, the compiler partitioning the vmapped step),
`unrolled/auto` (T = 200 scanned steps, reverse mode) and `unrolled/shard_map` (the same, one
program per device). After two warm-up steps (compilation), `--steps` meta-steps are
timed, sampling each process's tasks included. Perfect weak scaling keeps meta-steps/s constant:
the efficiency is `steps/s(P) / steps/s(1)`, and tasks/s grows P-fold.

    python -m experiments.benchmarks.weak_scaling [--quick] [--out DIR] [--processes 1,2,4]
        [--configs implicit/auto,unrolled/auto,unrolled/shard_map] [--platform cpu|cuda]

With `--platform cuda`, process i gets GPU i. A machine with fewer cores than processes cannot
scale: the results record the core count and the load average before and after. About a
minute on 2 idle cores (`--quick`: 1.5 minutes, most of it starting processes and compiling).
"""

import argparse
import json
import os
import pathlib
import sys
import time

from .. import _cli, _outputs
from ._timing import finish, format_table, outputs, parser


def worker(
    result_path: str, tasks_per_process: int, steps: int, method: str, partitioning: str
) -> None:
    """One process of a configuration (`--worker`): joins the others, times the meta-steps, and
    (process 0) writes the timings to `result_path`."""
    from experiments import _distributed

    _distributed.initialize()
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    from experiments import meta_ho

    mesh = _distributed.make_mesh()
    num_tasks = tasks_per_process * jax.process_count()
    local = _distributed.local_task_range(num_tasks, mesh)
    meta_step, opt = meta_ho.make_meta_step(mesh, method, 0.1, partitioning=partitioning)
    lam0 = np.zeros(meta_ho.D)
    lam, opt_state = _distributed.replicate((lam0, opt.init(lam0)), mesh)

    def one_step(step, lam, opt_state):
        tasks = meta_ho.make_tasks(0, meta_ho.TRAIN_STREAM, step, local)
        tasks = _distributed.global_batch_from_local(tasks, mesh)
        lam, opt_state, info = meta_step(lam, opt_state, tasks)
        return lam, opt_state, _distributed.to_host(info)  # waits for the step, as a run does

    start = time.perf_counter()
    for step in range(2):
        lam, opt_state, _ = one_step(step, lam, opt_state)
    warmup = time.perf_counter() - start
    _distributed.barrier("timed")
    start = time.perf_counter()
    for step in range(2, 2 + steps):
        lam, opt_state, info = one_step(step, lam, opt_state)
    seconds = time.perf_counter() - start
    if _distributed.is_main_process():
        result = dict(
            processes=jax.process_count(),
            devices=jax.device_count(),
            tasks_per_step=num_tasks,
            steps=steps,
            seconds=seconds,
            warmup_s=warmup,
            relerr=float(info["relerr"]),
        )
        pathlib.Path(result_path).write_text(json.dumps(result))


def run(
    processes: int,
    tasks_per_process: int,
    steps: int,
    method: str,
    partitioning: str,
    timeout: float,
    platform: str = "cpu",
) -> dict:
    """Launches `processes` workers and returns process 0's timings."""
    import tempfile

    from experiments import _distributed

    env = dict(os.environ)
    # One XLA thread per process: a process stands for one core (or one accelerator).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "eigen" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_cpu_multi_thread_eigen=false"])
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        command = [
            sys.executable,
            "-m",
            "experiments.benchmarks.weak_scaling",
            "--worker",
            result_path,
            "--tasks-per-process",
            str(tasks_per_process),
            "--steps",
            str(steps),
            "--configs",
            f"{method}/{partitioning}",
        ]
        outputs = _distributed.launch_local(
            command, processes, timeout=timeout, env=env, platform=platform
        )
        for i, (rc, stdout, stderr) in enumerate(outputs):
            if rc != 0:
                raise RuntimeError(
                    f"process {i} of {processes} failed:\n{stdout}\n{stderr[-4000:]}"
                )
        return json.loads(pathlib.Path(result_path).read_text())


def plot(rows: list[dict], path: pathlib.Path):
    fig, (left, right) = _outputs.pyplot().subplots(1, 2, figsize=(11, 4))
    for config in dict.fromkeys(r["config"] for r in rows):
        sub = [r for r in rows if r["config"] == config]
        procs = [r["processes"] for r in sub]
        left.plot(procs, [r["steps_per_s"] for r in sub], "o-", label=config)
        right.plot(procs, [r["efficiency"] for r in sub], "o-", label=config)
        left.set_xticks(procs)
        right.set_xticks(procs)
    left.set(
        xlabel="processes", ylabel="meta-steps / s", yscale="log", title="Meta-steps per second"
    )
    right.axhline(1.0, color="k", ls="--", lw=1)
    right.set(xlabel="processes", ylabel="steps/s(P) / steps/s(1)", title="Weak-scaling efficiency")
    for ax in (left, right):
        ax.legend()
    return _outputs.save_figure(fig, path)


CONFIGS = "implicit/auto,unrolled/auto,unrolled/shard_map"


def main(argv: list[str] | None = None) -> dict | None:
    p = parser("weak_scaling", __doc__.splitlines()[0])
    p.add_argument("--processes", default="1,2,4", help="comma-separated process counts")
    p.add_argument(
        "--tasks-per-process",
        type=int,
        default=None,
        help="tasks per process (64; 16 with --quick)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed meta-steps (20; 5 with --quick)")
    p.add_argument(
        "--configs",
        default=CONFIGS,
        help=f"METHOD/PARTITIONING pairs of experiments.meta_ho (default {CONFIGS})",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument(
        "--platform",
        default="cpu",
        help="cpu, or cuda for one GPU per process (GPU i for process i)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)
    args.steps = steps = args.steps or (5 if args.quick else 20)
    args.tasks_per_process = args.tasks_per_process or (16 if args.quick else 64)
    configs = [tuple(c.split("/")) for c in args.configs.split(",")]
    if args.worker is not None:
        ((method, partitioning),) = configs
        worker(args.worker, args.tasks_per_process, steps, method, partitioning)
        return None
    out = outputs(args, "weak_scaling")

    rows, load_before = [], os.getloadavg()[0]
    for method, partitioning in configs:
        for processes in [int(x) for x in args.processes.split(",")]:
            r = run(
                processes,
                args.tasks_per_process,
                steps,
                method,
                partitioning,
                args.timeout,
                args.platform,
            )
            r["config"] = f"{method}/{partitioning}"
            r["steps_per_s"] = r["steps"] / r["seconds"]
            r["tasks_per_s"] = r["steps_per_s"] * r["tasks_per_step"]
            first = next(x for x in rows + [r] if x["config"] == r["config"])
            r["efficiency"] = r["steps_per_s"] / first["steps_per_s"]
            rows.append(r)
            print(f"{r['config']}, {processes} process(es): {r['steps_per_s']:.2f} meta-steps/s")
    columns = ["config", "processes", "tasks_per_step", "steps_per_s", "tasks_per_s", "efficiency"]
    table = format_table(rows, columns)
    cores = os.cpu_count()
    load = (load_before, os.getloadavg()[0])
    print(
        f"Weak scaling, {args.tasks_per_process} tasks per process, {cores} CPU cores, load "
        f"average {load[0]:.1f} before and {load[1]:.1f} after\n{table}"
    )
    results = dict(
        rows=rows,
        platform=args.platform,
        cpu_cores=cores,
        load_average=load,
        tasks_per_process=args.tasks_per_process,
        steps=steps,
    )
    finish(args, "weak_scaling", out, results, lambda path: plot(rows, path))
    return results


if __name__ == "__main__":
    _cli.cli(main)
