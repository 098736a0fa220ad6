"""Run by `tests/core/test_sharding.py` in a subprocess with 4 (fake) CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python tests/core/_sharded_meta_batch.py OUT.json AXIS_TYPE [AXIS_TYPE ...]

A meta-batch of B = 8 ridge-regression tasks (different data per task, one shared per-feature
L2 hyperparameter λ) is solved with `jax.jit(jax.vmap(...))`, once on one device and once with
the task data sharded over a 4-device mesh with axis "tasks", for each mesh axis type asked for
("Auto", "Explicit"). Each computation is its own `jit` and its failure is recorded, not raised:
- "solution": `bx.inner_solve` per task: params, `stats["num_steps"]`, success;
- "hgrad_a": per task, `jax.value_and_grad` of the validation loss through `bx.inner_solve`
  with `bx.ImplicitAdjoint`; and the mean meta-gradient (a reduction across the sharded task
  axis), both as the mean of those and as `jax.grad` of the mean validation loss;
- "hgrad_b": per task, `bx.unrolled_hypergrad`;
- "hgrad_c": per task, `bx.implicit_hypergrad` at the one-device solution (passed in as data);
- "hgrad_c_lineax": the same with `lx.CG` (lineax's CG) in place of `bx.CG`.
The implicit computations solve with `bx.CG`, the default linear solver.
In the sharded runs, the implicit hypergradients are also computed inside `jax.shard_map`
(each device its own tasks, as `experiments/meta_ho.py --partitioning shard_map` does):
- "shard_map_hgrad_a", "shard_map_hgrad_a_lineax": (a) with `bx.CG` and with `lx.CG`,
  `check_vma=False`;
- "shard_map_hgrad_c_vma": (c) in a `shard_map` that checks its manual axes (`check_vma=True`,
  the default), with `throw=False` (equinox's `error_if` is not typed for them).
OUT.json gets the values (float64, exactly: JSON floats round-trip), how each sharded input and
output was laid out over the devices, and the closed-form hypergradients.
"""

import json
import os
import sys


B, N_TRAIN, N_VAL, D = 8, 40, 30, 5
LEARNING_RATE = 0.25
MAX_STEPS = 2000
TOL = 1e-11
NUM_UNROLLED_STEPS = 300
NUM_DEVICES = 4


def main(out_path: str, axis_type_names: list[str]) -> None:
    assert "--xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", "")
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")

    import jax.numpy as jnp
    import lineax as lx
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import bilevax as bx

    devices = jax.devices()
    assert len(devices) == NUM_DEVICES and all(d.platform == "cpu" for d in devices), devices

    # ---- the meta-batch: B ridge-regression tasks, different data (and conditioning) each ----
    rng = np.random.default_rng(0)
    X = rng.normal(size=(B, N_TRAIN + N_VAL, D)) * rng.uniform(0.5, 1.5, size=(B, 1, D))
    w_true = rng.normal(size=(B, D))
    y = np.einsum("bnd,bd->bn", X, w_true) + 0.3 * rng.normal(size=(B, N_TRAIN + N_VAL))
    task_data = {
        "train": (X[:, :N_TRAIN], y[:, :N_TRAIN]),
        "val": (X[:, N_TRAIN:], y[:, N_TRAIN:]),
    }
    lam = np.log(np.linspace(0.05, 0.5, D))

    def mse(w, data):
        X, y = data
        return 0.5 * jnp.mean((X @ w - y) ** 2)

    def inner_loss(w, lam, data):
        return mse(w, data) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)

    def outer_loss(w, lam, data):
        del lam
        return mse(w, data)

    linear_solver = bx.CG(rtol=1e-13, atol=1e-13)
    lineax_solver = lx.CG(rtol=1e-13, atol=1e-13)
    solver = bx.GradientDescent(LEARNING_RATE)

    def solve(lam, data, linear_solver=linear_solver):
        return bx.inner_solve(
            inner_loss,
            jnp.zeros(D),
            lam,
            data["train"],
            solver=solver,
            max_steps=MAX_STEPS,
            tol=TOL,
            adjoint=bx.ImplicitAdjoint(linear_solver),
        )

    def val_loss(lam, data, linear_solver=linear_solver):
        return outer_loss(solve(lam, data, linear_solver).params, lam, data["val"])

    def task_solution(lam, data):
        sol = solve(lam, data)
        return {
            "params": sol.params,
            "num_steps": sol.stats["num_steps"],
            "successful": sol.result == bx.RESULTS.successful,
        }

    def task_hgrad_a(lam, data, linear_solver=linear_solver):
        return jax.value_and_grad(val_loss)(lam, data, linear_solver)

    def task_hgrad_b(lam, data):
        return bx.unrolled_hypergrad(
            outer_loss,
            inner_loss,
            jnp.zeros(D),
            lam,
            data["train"],
            data["val"],
            solver=solver,
            num_steps=NUM_UNROLLED_STEPS,
        )

    def task_hgrad_c(lam, data, linear_solver=linear_solver, throw=True):
        # At the one-device `inner_solve` solution, passed in as task data (so that a failure
        # here is `implicit_hypergrad`'s own, not the inner solver's).
        return bx.implicit_hypergrad(
            outer_loss,
            inner_loss,
            data["params_star"],
            lam,
            data["train"],
            data["val"],
            linear_solver=linear_solver,
            throw=throw,
        )

    def hgrad_a_and_meta_gradient(lam, data):
        # Per task (a), and reductions across the (sharded) task axis: the mean meta-gradient,
        # as the mean of the per-task hypergradients (a), and as the gradient of the mean
        # validation loss, whose backward pass sums the per-task cotangents of the shared λ
        # across the shards.
        values, hgrads = jax.vmap(task_hgrad_a, in_axes=(None, 0))(lam, data)
        mean_loss = lambda lam: jnp.mean(jax.vmap(val_loss, in_axes=(None, 0))(lam, data))
        value, grad = jax.value_and_grad(mean_loss)(lam)
        return {
            "value": values,
            "hgrad": hgrads,
            "mean_hgrad_a": jnp.mean(hgrads, axis=0),
            "mean_val_loss": value,
            "meta_grad": grad,
        }

    def per_task(fn, **kwargs):
        return lambda lam, data: jax.vmap(
            lambda lam, data: fn(lam, data, **kwargs), in_axes=(None, 0)
        )(lam, data)

    # Each quantity is its own `jit`, so that a failure under one mesh type is pinned to it.
    computations = {
        "solution": jax.jit(per_task(task_solution)),
        "hgrad_b": jax.jit(per_task(task_hgrad_b)),
        "hgrad_c": jax.jit(per_task(task_hgrad_c)),
        "hgrad_c_lineax": jax.jit(per_task(task_hgrad_c, linear_solver=lineax_solver)),
        "hgrad_a": jax.jit(hgrad_a_and_meta_gradient),
    }

    def in_shard_map(mesh, fn, check_vma):
        # Each device runs the `vmap` over its own tasks; λ is replicated. Where the manual
        # axes are checked, λ is cast to varying first: JAX types a replicated λ as invariant,
        # and then sums its per-task cotangents across the devices.
        def per_device(lam, data):
            if check_vma:
                lam = jax.lax.pcast(lam, ("tasks",), to="varying")
            return fn(lam, data)

        return jax.jit(
            jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(P(), P("tasks")),
                out_specs=P("tasks"),
                check_vma=check_vma,
            )
        )

    def shard_map_computations(mesh):
        return {
            "shard_map_hgrad_a": in_shard_map(mesh, per_task(task_hgrad_a), False),
            "shard_map_hgrad_a_lineax": in_shard_map(
                mesh, per_task(task_hgrad_a, linear_solver=lineax_solver), False
            ),
            "shard_map_hgrad_c_vma": in_shard_map(mesh, per_task(task_hgrad_c, throw=False), True),
        }

    def layout(x):
        sharding = x.sharding
        return {
            "sharding": type(sharding).__name__,
            "spec": str(getattr(sharding, "spec", None)),
            "num_devices": len(sharding.device_set),
            "shards": sorted(
                (s.device.id, list(s.data.shape), str(s.index)) for s in x.addressable_shards
            ),
        }

    def run_all(lam, data, computations=computations):
        """{name: {"values": {key: nested list}, "layouts": {key: layout}} or {"error": str}}."""
        out = {}
        for name, fn in computations.items():
            try:
                result = jax.block_until_ready(fn(lam, data))
            except Exception as error:  # recorded, and judged by the test
                out[name] = {"error": f"{type(error).__name__}: {error}"}
                continue
            if isinstance(result, tuple):
                result = {"value": result[0], "hgrad": result[1]}
            out[name] = {
                "values": {k: np.asarray(v).tolist() for k, v in result.items()},
                "layouts": {k: layout(v) for k, v in result.items()},
            }
        return out

    # ---- one device ----
    lam_single, data_single = jax.device_put((jnp.asarray(lam), task_data), devices[0])
    params_star = np.asarray(computations["solution"](lam_single, data_single)["params"])
    task_data["params_star"] = params_star  # for (c), at the one-device solution
    results = {"single": run_all(lam_single, jax.device_put(task_data, devices[0]))}

    # ---- the closed form, per task, for a sanity check of the numbers themselves ----
    exact = []
    for b in range(B):
        (Xt, yt), (Xv, yv) = [(a[b], c[b]) for a, c in (task_data["train"], task_data["val"])]
        A = Xt.T @ Xt / N_TRAIN + np.diag(np.exp(lam))
        w = np.linalg.solve(A, Xt.T @ yt / N_TRAIN)
        g = Xv.T @ (Xv @ w - yv) / N_VAL
        exact.append((-np.linalg.solve(A, g) * np.exp(lam) * w).tolist())
    results["exact_hgrad"] = exact

    # ---- sharded over the 4 devices, for each mesh axis type ----
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    for name in axis_type_names:
        axis_type = getattr(jax.sharding.AxisType, name)
        mesh = jax.make_mesh((NUM_DEVICES,), ("tasks",), axis_types=(axis_type,))
        with set_mesh(mesh):
            sharded_data = jax.device_put(task_data, NamedSharding(mesh, P("tasks")))
            replicated_lam = jax.device_put(jnp.asarray(lam), NamedSharding(mesh, P()))
            results[name] = run_all(
                replicated_lam, sharded_data, {**computations, **shard_map_computations(mesh)}
            )
        results[name]["inputs"] = [layout(x) for x in jax.tree.leaves(sharded_data)]
        results[name]["mesh_axis_types"] = [str(t) for t in mesh.axis_types]

    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
