"""A meta-batch of tasks (`jax.vmap` over task data) sharded over 4 devices with `jax.sharding`
gives the one-device result.

XLA's device count is fixed when JAX starts and the rest of the suite runs on one device, so the
computation runs in a subprocess (`_sharded_meta_batch.py`) on 4 CPU devices
(`--xla_force_host_platform_device_count=4`). It solves B = 8 ridge-regression tasks, once on
one device and once with the task data sharded over a ("tasks",) mesh of each axis type, and
writes every value and how it was laid out over the devices; the tests compare them here.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


AXIS_TYPES = ("Auto", "Explicit")
NUM_DEVICES = 4
B = 8
COMPUTATIONS = ("solution", "hgrad_a", "hgrad_b", "hgrad_c")
REDUCED = ("mean_hgrad_a", "mean_val_loss", "meta_grad")  # reductions over the task axis
# (computed with "hgrad_a"); every other output is per task, of shape (B, ...).
# Under `AxisType.Explicit`, the implicit-differentiation path goes through `lineax` (a
# `JacobianLinearOperator`, and `lx.CG`'s `while_loop`), which today fails under an
# explicitly sharded `vmap` for reasons outside bilevax:
# - equinox's `cached_filter_eval_shape` (called by the operator's `out_structure`) drops the
#   shardings of its arguments, while `filter_closure_convert`'s input check compares them;
# - JAX's batching rule for `while_loop` cannot batch an unbatched rank-0 carry created inside
#   the trace (such as CG's step counter `0`), whose type has an empty mesh, when the predicate
#   is batched: "Resource axis: tasks of P('tasks',) is not found in mesh: ()".
# Those two failures, and only those, are tolerated (as an xfail) for these computations.
IMPLICIT_PATH = ("hgrad_a", "hgrad_c")
UPSTREAM_ERRORS = (
    "Closure-converted function called with different dynamic arguments",
    "is not found in mesh: ()",
)
RTOL = 1e-12


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    script = Path(__file__).with_name("_sharded_meta_batch.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(out), *AXIS_TYPES],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def relerr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _leading_slice(index: str) -> str:
    return re.match(r"\(?(slice\([^)]*\))", index).group(1)


def assert_sharded_over_tasks(layout, what):
    """Split along the leading (task) axis over the 4 devices, B / 4 tasks on each."""
    assert layout["sharding"] == "NamedSharding", (what, layout)
    assert re.match(r"^\w*\('tasks'", layout["spec"]), (what, layout)  # P('tasks', ...)
    assert layout["num_devices"] == NUM_DEVICES, (what, layout)
    shards = layout["shards"]
    assert sorted(device for device, _, _ in shards) == list(range(NUM_DEVICES)), (what, layout)
    assert all(shape[0] == B // NUM_DEVICES for _, shape, _ in shards), (what, layout)
    per_device = B // NUM_DEVICES
    expected = {f"slice({i * per_device}, {(i + 1) * per_device}, None)" for i in range(4)}
    assert {_leading_slice(index) for _, _, index in shards} == expected, (what, layout)


def assert_replicated(layout, shape, what):
    """A reduction over the task axis: the whole value on each of the 4 devices."""
    assert layout["num_devices"] == NUM_DEVICES, (what, layout)
    assert sorted(device for device, _, _ in layout["shards"]) == list(range(NUM_DEVICES))
    assert all(list(s) == list(shape) for _, s, _ in layout["shards"]), (what, layout)


def test_one_device_reference(results):
    """The one-device numbers are right: each task converges, on its own number of steps, and
    the three hypergradients and the mean meta-gradient match the closed form."""
    single = results["single"]
    assert not [name for name, out in single.items() if "error" in out], single
    solution = single["solution"]["values"]
    assert all(solution["successful"])
    num_steps = solution["num_steps"]
    assert len(set(num_steps)) > 1, num_steps  # tasks stop on their own criteria
    assert all(0 < n < 2000 for n in num_steps), num_steps
    exact = np.asarray(results["exact_hgrad"])
    assert exact.shape == (B, 5)
    for name in ("hgrad_a", "hgrad_b", "hgrad_c"):
        assert relerr(single[name]["values"]["hgrad"], exact) < 1e-8, name
    meta = single["hgrad_a"]["values"]
    assert relerr(meta["meta_grad"], exact.mean(axis=0)) < 1e-8
    assert relerr(meta["mean_hgrad_a"], exact.mean(axis=0)) < 1e-8
    assert relerr(meta["meta_grad"], meta["mean_hgrad_a"]) < 1e-12


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_sharded_meta_batch_matches_one_device(results, axis_type):
    single, sharded = results["single"], results[axis_type]
    assert len(sharded["mesh_axis_types"]) == 1
    assert sharded["mesh_axis_types"][0].endswith(axis_type), sharded["mesh_axis_types"]
    # The inputs really were split over the 4 devices.
    assert len(sharded["inputs"]) == 5  # params_star, train (X, y), val (X, y)
    for i, layout in enumerate(sharded["inputs"]):
        assert_sharded_over_tasks(layout, f"input {i}")

    tolerated = []
    for name in COMPUTATIONS:
        out = sharded[name]
        if "error" in out:
            known = any(message in out["error"] for message in UPSTREAM_ERRORS)
            if axis_type == "Explicit" and name in IMPLICIT_PATH and known:
                tolerated.append(f"{name}: {out['error'].splitlines()[0]}")
                continue
            pytest.fail(f"{name} failed under a {axis_type} mesh: {out['error'][:3000]}")
        reference = single[name]["values"]
        assert out["values"].keys() == reference.keys()
        for key, value in out["values"].items():
            what = f"{axis_type} {name} {key}"
            if key in ("num_steps", "successful"):
                assert value == reference[key], what  # per task, exactly
            else:
                assert relerr(value, reference[key]) <= RTOL, (what, value, reference[key])
            layout = out["layouts"][key]
            if key in REDUCED:
                assert_replicated(layout, np.shape(reference[key]), what)
            else:
                assert_sharded_over_tasks(layout, what)
    if tolerated:
        pytest.xfail("known upstream failures under AxisType.Explicit: " + "; ".join(tolerated))
