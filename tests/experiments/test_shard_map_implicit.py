"""`experiments.meta_ho --partitioning shard_map --method implicit`: each device differentiates its
own tasks through the implicit adjoint (`bx.inner_solve` with `bx.ImplicitAdjoint(lx.CG)`)
inside `jax.shard_map`, to the closed-form meta-gradient.

One meta-step in this process (one device: a one-device mesh, whose axis `shard_map` still makes
manual), and (slow) the command line on 4 forced CPU devices in a subprocess, whose meta-steps
must be those of the compiler's partitioning of the `vmap` (`--partitioning auto`). The
library-level checks on 4 devices, with `bx.CG` and `lx.CG`, are in `test_sharding.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _distributed, meta_ho


META_BATCH = 4


def test_meta_step_in_shard_map():
    """One meta-step: the meta-gradient is the closed-form one, and the step is Adam's."""
    mesh = _distributed.make_mesh()
    tasks = _distributed.global_batch_from_local(
        meta_ho.make_tasks(0, meta_ho.TRAIN_STREAM, 0, range(META_BATCH)), mesh
    )
    meta_step, opt = meta_ho.make_meta_step(mesh, "implicit", 0.1, partitioning="shard_map")
    lam = jnp.zeros(meta_ho.D)
    new_lam, _, info = meta_step(*_distributed.replicate((lam, opt.init(lam)), mesh), tasks)
    assert float(info["relerr"]) < 1e-9  # against the closed-form meta-gradient
    # Adam's first step, bias-corrected: -lr g / (|g| + eps).
    g = np.asarray(info["meta_grad"])
    np.testing.assert_allclose(np.asarray(new_lam), -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-12)


@pytest.mark.slow
def test_command_line_on_four_devices(tmp_path):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=4"])
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    args = ["--steps", "2", "--meta-batch", "8", "--test-tasks", "8", "--method", "implicit"]
    results = {}
    for partitioning in ("shard_map", "auto"):
        out = tmp_path / partitioning
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.meta_ho", "--out", str(out), *args]
            + ["--partitioning", partitioning],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{partitioning}:\n{proc.stdout}\n{proc.stderr[-5000:]}"
        results[partitioning] = json.loads((out / "results.json").read_text())
    sharded, auto = results["shard_map"], results["auto"]
    assert sharded["config"]["num_devices"] == 4
    assert sharded["config"]["partitioning"] == "shard_map"
    assert sharded["meta_grad_relerr_max"] < 1e-9
    np.testing.assert_allclose(
        sharded["history"]["meta_grad"], auto["history"]["meta_grad"], rtol=1e-12, atol=0
    )
    np.testing.assert_allclose(sharded["log_lam"], auto["log_lam"], rtol=1e-12, atol=1e-15)
