"""Inner problems whose parameters are sharded over devices: the primitives run on the sharded
pytrees without gathering them, and give the one-device hypergradients.

The computations run in a subprocess (`_sharded_params.py`) on 4 forced CPU devices, over a
one-axis ("model") mesh: a wide linear model (64 features) with its weights, per-feature
hyperparameters and feature columns split over the devices, solved with `bx.inner_solve`
(implicit adjoint with CG; unrolled adjoint), differentiated with `bx.unrolled_hypergrad` and
`bx.implicit_hypergrad`; and a 64-unit MLP split on its hidden dimension, through
`bx.unrolled_hypergrad` and `bx.inner_solve(..., adjoint=bx.UnrolledAdjoint())`. For each, the
test checks the values against one device (and the linear model's against its closed form), the
sharding of the outputs, the sharding of the parameters inside the solver loops (from
`jax.debug.inspect_array_sharding`), and that the compiled program has no all-gather.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest


# Four devices in a subprocess: slow.
pytestmark = pytest.mark.slow


NUM_DEVICES = 4
H = 64
RTOL = 1e-11  # sharded sums are added in another order than on one device
LINEAR = ("implicit_adjoint", "unrolled_adjoint", "unrolled_hypergrad", "implicit_hypergrad")
ALL = (*LINEAR, "mlp_unrolled_hypergrad")
PARAMS_SPEC = "P('model',)"
COLUMNS_SPEC = "P(None, 'model')"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_params") / "results.json"
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={NUM_DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    script = Path(__file__).with_name("_sharded_params.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def relerr(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def assert_split_on_hidden(layout, what):
    """Split over the 4 devices along the hidden dimension (the last axis), H / 4 per device."""
    assert layout["spec"] in (PARAMS_SPEC, COLUMNS_SPEC), (what, layout)
    assert layout["num_devices"] == NUM_DEVICES, (what, layout)
    shapes = layout["shard_shapes"]
    assert len(shapes) == NUM_DEVICES, (what, layout)
    assert all(s[-1] == H // NUM_DEVICES for s in shapes), (what, layout)
    assert all(s[:-1] == layout["shape"][:-1] for s in shapes), (what, layout)


def test_one_device_reference_matches_closed_form(results):
    single, exact = results["single"], results["exact_hgrad"]
    assert not [name for name in ALL if "error" in single[name]]
    assert single["implicit_adjoint"]["values"]["successful"]
    for name in LINEAR:
        assert relerr(single[name]["values"]["hgrad"], exact) < 1e-9, name


@pytest.mark.parametrize("name", ALL)
def test_sharded_params_give_the_one_device_result(results, name):
    sharded, single = results["sharded"][name], results["single"][name]
    assert "error" not in sharded, sharded.get("error", "")[:3000]
    # The inputs really were split: parameters and hyperparameters on the hidden dimension.
    assert_split_on_hidden(sharded["inputs"][0], "init params")
    assert sharded["values"].keys() == single["values"].keys()
    for key, value in sharded["values"].items():
        if key in ("num_steps", "successful"):
            assert value == single["values"][key], key
        else:
            assert relerr(value, single["values"][key]) <= RTOL, (name, key)
    if name in LINEAR:
        assert relerr(sharded["values"]["hgrad"], results["exact_hgrad"]) < 1e-9


@pytest.mark.parametrize("name", ALL)
def test_params_stay_sharded(results, name):
    sharded = results["sharded"][name]
    assert "error" not in sharded, sharded.get("error", "")[:3000]
    layouts = sharded["layouts"]
    # The hypergradient has the layout of the hyperparameters; parameters keep theirs.
    assert_split_on_hidden(layouts["hgrad"][0], f"{name} hgrad")
    for i, layout in enumerate(layouts.get("params", [])):
        assert_split_on_hidden(layout, f"{name} params leaf {i}")
    # Inside the solver loops (every trace of the inner loss), the parameters are split too.
    inside = [s for seen in sharded["inside"].values() for s in seen]
    assert inside, name
    expected = {
        f"NamedSharding({spec}, {NUM_DEVICES} devices)" for spec in (PARAMS_SPEC, COLUMNS_SPEC)
    }
    assert set(inside) <= expected, (name, inside)
    # No parameter, nor anything else, is gathered onto every device.
    assert sharded["all_gathers"] == [], (name, sharded["all_gathers"])


def test_all_gather_detection_is_not_vacuous(results):
    """A computation that asks for a hyperparameter whole on every device shows its all-gather."""
    control = results["sharded"]["gathered_control"]
    assert control["all_gathers"] == [f"f64[{H}]{{0}}"], control["all_gathers"]
