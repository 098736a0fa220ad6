"""One code path for one process and for many: `jax.distributed` set-up, the global mesh, and
global arrays built from each process's share of the tasks.

JAX's multi-controller SPMD runs the same program in every process (one per host, or one per
GPU); after `initialize`, `jax.devices()` lists the devices of all processes, and a `jax.jit`
computation on arrays sharded over them runs on all of them at once, its reductions across
processes compiled into the program (NCCL on GPUs, gloo on CPUs). Every process holds the same
replicated outer state and takes the same optimiser step; only process 0 writes files, but for
checkpoints, where each process writes its part of the arrays split over processes
(`experiments/_checkpoint.py`).

    python -m experiments.meta_ho --distributed            # SLURM / Open MPI: auto-detected
    python -m experiments.meta_ho --distributed --coordinator-address HOST:PORT \\
        --num-processes N --process-id I                    # by hand (or JAX_* variables)

With one process (no `--distributed`), every function here does the one-process thing.
"""

import argparse
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree


TASKS = "tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `--distributed`, `--coordinator-address`, `--num-processes` and `--process-id`."""
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="run as one process of many: call jax.distributed.initialize(), which reads SLURM's "
        "or Open MPI's environment, or the options below, or $JAX_COORDINATOR_ADDRESS, "
        "$JAX_NUM_PROCESSES and $JAX_PROCESS_ID",
    )
    group.add_argument("--coordinator-address", default=None, help="process 0's HOST:PORT")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: int = 300,
) -> None:
    """Joins this process to the others with `jax.distributed.initialize`.

    Call it once, before any JAX computation. Arguments left as `None` come from
    `$JAX_COORDINATOR_ADDRESS`, `$JAX_NUM_PROCESSES` and `$JAX_PROCESS_ID`, and else from the
    cluster's environment, which JAX detects (SLURM, Open MPI, Cloud TPU, Kubernetes).
    Cross-process collectives on CPU devices go through gloo (there are none by default).

    **Arguments:**

    - `coordinator_address`: `"host:port"` of process 0, which every process can reach.
    - `num_processes`: how many processes take part.
    - `process_id`: this process's index, in `0 .. num_processes - 1`.
    - `timeout`: seconds to wait for the other processes to join.
    """
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"`num_processes` must be >= 1, got {num_processes}.")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"`process_id` must be in 0..{num_processes - 1} (`num_processes` - 1), got "
            f"{process_id}."
        )
    if jax.distributed.is_initialized():
        return
    # Only the CPU client uses this setting: harmless on GPU hosts, and needed on CPU ones,
    # which have no cross-process collectives without it (JAX versions that default to gloo,
    # or no longer have the option, are left as they are).
    collectives = getattr(jax.config, "jax_cpu_collectives_implementation", "gloo")
    if collectives in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=timeout,
        )
    except RuntimeError as error:
        if "before" in str(error):
            raise RuntimeError(
                "jax.distributed.initialize() must run before any JAX computation: call "
                "`_distributed.initialize` (or `_harness.start` with `--distributed`) first."
            ) from error
        raise


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize` with the options of `add_arguments`, if `--distributed` was given.

    **Returns:**

    Whether this process is one of several (`--distributed`).
    """
    if not getattr(args, "distributed", False):
        return False
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    return True


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes results and logs (and of a checkpoint,
    all but the other processes' parts of the arrays split over processes)."""
    return jax.process_index() == 0


def make_mesh(axis_name: str = TASKS) -> Mesh:
    """A one-axis mesh over every device of every process, with an `Auto` axis (the compiler
    propagates shardings; every bilevax primitive works on it)."""
    return jax.make_mesh((jax.device_count(),), (axis_name,), axis_types=(AxisType.Auto,))


def local_task_range(num_tasks: int, mesh: Mesh | None = None) -> range:
    """The indices of the tasks this process holds when `num_tasks` tasks are split evenly over
    the devices of `mesh` (all of them by default), process by process.

    **Raises:**

    `ValueError` when `num_tasks` is not a multiple of the number of devices.
    """
    num_devices = jax.device_count() if mesh is None else mesh.devices.size
    if num_tasks % num_devices:
        raise ValueError(
            f"`num_tasks` ({num_tasks}) must be a multiple of the number of devices "
            f"({num_devices}), so that every device holds the same number of tasks."
        )
    per_process = num_tasks // jax.process_count()
    first = jax.process_index() * per_process
    return range(first, first + per_process)


def global_batch_from_local(local: PyTree, mesh: Mesh, axis_name: str = TASKS) -> PyTree:
    """One global array per leaf, split along its leading (task) axis over `mesh`, from this
    process's share of the tasks (`jax.make_array_from_process_local_data`): no process ever
    holds the others' tasks.

    **Arguments:**

    - `local`: a pytree of arrays whose leading axis is this process's tasks, in order (the
        tasks of `local_task_range`).
    - `mesh`: the global mesh, e.g. from `make_mesh`.

    **Returns:**

    The pytree of global arrays, sharded `P(axis_name)`.
    """
    sharding = NamedSharding(mesh, P(axis_name))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """A full copy of every array leaf on every device of `mesh` (the outer state, which every
    process computes identically). Every process must pass the same values."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        if not isinstance(x, jax.Array | np.ndarray | np.generic):
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of the arrays in `tree` on every process: replicated arrays from the local
    copy, arrays split over processes gathered from all of them."""

    def fetch(x: Any):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def barrier(name: str) -> None:
    """Waits until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(
    command: list[str],
    num_processes: int,
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    devices_per_process: int = 1,
    platform: str = "cpu",
) -> list[tuple[int, str, str]]:
    """Runs `command` as `num_processes` processes on this machine, joined through a coordinator
    on 127.0.0.1 (the loopback way to try a multi-host program on one machine).

    Each process gets `$JAX_COORDINATOR_ADDRESS`, `$JAX_NUM_PROCESSES`, `$JAX_PROCESS_ID` (which
    `initialize` reads) and `JAX_PLATFORMS=platform`: with `"cpu"`, `devices_per_process` CPU
    devices each; with `"cuda"`, GPU `i` for process `i` (`CUDA_VISIBLE_DEVICES`). Every process
    is killed if any fails, or when `timeout` seconds have passed.

    **Returns:**

    `[(returncode, stdout, stderr)]`, one per process, in process order.

    **Raises:**

    `subprocess.TimeoutExpired` after killing every process, when `timeout` runs out.
    """
    import subprocess
    import tempfile
    import time

    base = dict(os.environ if env is None else env)
    base["JAX_PLATFORMS"] = platform
    base["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{free_port()}"
    base["JAX_NUM_PROCESSES"] = str(num_processes)
    if platform == "cpu":
        flags = [f for f in base.get("XLA_FLAGS", "").split() if "device_count" not in f]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        base["XLA_FLAGS"] = " ".join(flags)
    deadline = time.monotonic() + timeout
    procs, logs = [], []
    # Output goes to files, not pipes: a process blocked on a full pipe would stall the others
    # in their collectives.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i in range(num_processes):
                out = open(os.path.join(tmp, f"{i}.out"), "w+")
                err = open(os.path.join(tmp, f"{i}.err"), "w+")
                logs.append((out, err))
                env_i = {**base, "JAX_PROCESS_ID": str(i)}
                if platform != "cpu":
                    env_i["CUDA_VISIBLE_DEVICES"] = str(i)
                procs.append(subprocess.Popen(command, env=env_i, stdout=out, stderr=err))
            while True:
                codes = [p.poll() for p in procs]  # every one, each time
                if all(code is not None for code in codes):
                    break
                if any(code not in (None, 0) for code in codes):
                    break  # one failed: the others would wait for it until the timeout
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(command, timeout)
                time.sleep(0.05)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            outputs = []
            for proc, (out, err) in zip(procs, logs):
                out.seek(0)
                err.seek(0)
                outputs.append((proc.returncode, out.read(), err.read()))
                out.close()
                err.close()
    return outputs
