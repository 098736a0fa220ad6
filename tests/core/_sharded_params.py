r"""Run by `tests/core/test_sharded_params.py` in a subprocess with 4 (fake) CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python tests/core/_sharded_params.py OUT.json

Inner problems whose *parameters* are sharded over a 4-device mesh with one axis, "model":

- a wide linear model on H = 64 features, $L = \tfrac{1}{2n}\|\Phi w - y\|^2 +
  \tfrac12\sum_h e^{\lambda_h} w_h^2$, with the weights $w$, the per-feature hyperparameters
  $\lambda$ and the feature columns of $\Phi$ split over the devices (`P("model")`,
  `P(None, "model")`);
- a one-hidden-layer MLP with 64 hidden units and a per-unit L2 strength, its first layer's
  columns, biases and output weights split on the hidden dimension.

Each computation runs once on one device and once sharded; OUT.json gets the values, the
layouts of the outputs, the layouts the parameters have *inside* the solver loops (recorded with
`jax.debug.inspect_array_sharding` from inside the losses), the all-gathers in the compiled
programs, and the closed-form hypergradient of the linear model.
"""

import json
import os
import re
import sys


N_TRAIN, N_VAL, H, D_IN = 48, 32, 64, 8
NUM_DEVICES = 4
MAX_STEPS = 3000
TOL = 1e-11
UNROLLED_STEPS = 300
MLP_STEPS = 30
MLP_LEARNING_RATE = 0.05


def main(out_path: str) -> None:
    assert f"--xla_force_host_platform_device_count={NUM_DEVICES}" in os.environ["XLA_FLAGS"]
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")

    import jax.numpy as jnp
    import lineax as lx
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import bilevax as bx

    devices = jax.devices()
    assert len(devices) == NUM_DEVICES, devices
    mesh = jax.make_mesh((NUM_DEVICES,), ("model",), axis_types=(AxisType.Auto,))

    # ---- data ----
    rng = np.random.default_rng(0)
    Phi = rng.standard_normal((N_TRAIN + N_VAL, H))
    y = Phi @ (rng.standard_normal(H) / np.sqrt(H)) + 0.3 * rng.standard_normal(N_TRAIN + N_VAL)
    lam = np.log(np.linspace(0.05, 0.5, H))
    X = rng.standard_normal((N_TRAIN + N_VAL, D_IN))
    t = np.sin(X @ rng.standard_normal(D_IN)) + 0.1 * rng.standard_normal(N_TRAIN + N_VAL)
    mlp0 = {
        "W1": rng.standard_normal((D_IN, H)) / np.sqrt(D_IN),
        "b1": np.zeros(H),
        "w2": rng.standard_normal(H) / np.sqrt(H),
    }
    eigs = np.linalg.eigvalsh(Phi[:N_TRAIN].T @ Phi[:N_TRAIN] / N_TRAIN)
    big = np.sqrt(eigs[-1] + np.exp(lam).max())
    small = np.sqrt(max(eigs[0], 0.0) + np.exp(lam).min())
    solver = bx.GradientDescent(
        float(4 / (big + small) ** 2), float(((big - small) / (big + small)) ** 2)
    )
    cg = lx.CG(rtol=1e-13, atol=1e-13)

    # Layouts seen inside the traced solver loops, keyed by a label; filled at compile time.
    inside: dict[str, list[str]] = {}

    def record(label, x):
        def callback(sharding):
            inside.setdefault(label, []).append(_describe_sharding(sharding))

        jax.debug.inspect_array_sharding(x, callback=callback)

    # ---- the wide linear model ----
    def linear_inner(w, lam, data):
        record("linear_inner_w", w)
        Phi, y = data
        return 0.5 * jnp.mean((Phi @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)

    def linear_outer(w, lam, data):
        del lam
        Phi, y = data
        return jnp.mean((Phi @ w - y) ** 2)

    def solve(adjoint, w0, lam, train):
        return bx.inner_solve(
            linear_inner, w0, lam, train, solver=solver, max_steps=MAX_STEPS, tol=TOL,
            adjoint=adjoint,
        )  # fmt: skip

    def through_inner_solve(adjoint):
        def run(w0, lam, train, val):
            sol = solve(adjoint, w0, lam, train)
            val_loss = lambda lam: linear_outer(solve(adjoint, w0, lam, train).params, lam, val)
            value, hgrad = jax.value_and_grad(val_loss)(lam)
            return {
                "params": sol.params,
                "num_steps": sol.stats["num_steps"],
                "successful": sol.result == bx.RESULTS.successful,
                "value": value,
                "hgrad": hgrad,
            }

        return run

    def unrolled(w0, lam, train, val):
        value, hgrad = bx.unrolled_hypergrad(
            linear_outer, linear_inner, w0, lam, train, val, solver=solver,
            num_steps=UNROLLED_STEPS,
        )  # fmt: skip
        return {"value": value, "hgrad": hgrad}

    def implicit(w_star, lam, train, val):
        value, hgrad = bx.implicit_hypergrad(
            linear_outer, linear_inner, w_star, lam, train, val, linear_solver=cg
        )
        return {"value": value, "hgrad": hgrad}

    # ---- the MLP, sharded on its hidden units ----
    def mlp_predict(p, X):
        return jnp.tanh(X @ p["W1"] + p["b1"]) @ p["w2"]

    def mlp_inner(p, lam, data):
        record("mlp_inner_W1", p["W1"])
        X, t = data
        penalty = jnp.sum(jnp.exp(lam) * (p["w2"] ** 2 + jnp.sum(p["W1"] ** 2, axis=0)))
        return 0.5 * jnp.mean((mlp_predict(p, X) - t) ** 2) + 0.5 * penalty

    def mlp_outer(p, lam, data):
        del lam
        X, t = data
        return jnp.mean((mlp_predict(p, X) - t) ** 2)

    def mlp_unrolled(p0, lam, train, val):
        value, hgrad = bx.unrolled_hypergrad(
            mlp_outer, mlp_inner, p0, lam, train, val,
            solver=bx.GradientDescent(MLP_LEARNING_RATE), num_steps=MLP_STEPS,
        )  # fmt: skip
        sol = bx.inner_solve(
            mlp_inner, p0, lam, train, solver=bx.GradientDescent(MLP_LEARNING_RATE),
            max_steps=MLP_STEPS, adjoint=bx.UnrolledAdjoint(),
        )  # fmt: skip
        return {"value": value, "hgrad": hgrad, "params": sol.params}

    def gathered_control(w0, lam, train, val):
        # A control for the all-gather detection: asks for `lam` whole on every device.
        del w0, train, val
        replicated = NamedSharding(mesh, P())
        return {"value": jnp.sum(jax.lax.with_sharding_constraint(lam, replicated) ** 2)}

    computations = {
        "gathered_control": gathered_control,
        "implicit_adjoint": through_inner_solve(bx.ImplicitAdjoint(cg)),
        "unrolled_adjoint": through_inner_solve(bx.UnrolledAdjoint()),
        "unrolled_hypergrad": unrolled,
        "implicit_hypergrad": implicit,
        "mlp_unrolled_hypergrad": mlp_unrolled,
    }

    linear_train = (Phi[:N_TRAIN], y[:N_TRAIN])
    linear_val = (Phi[N_TRAIN:], y[N_TRAIN:])
    mlp_train, mlp_val = (X[:N_TRAIN], t[:N_TRAIN]), (X[N_TRAIN:], t[N_TRAIN:])

    def inputs(name, w_star, put_params, put_features, put_replicated):
        if name == "mlp_unrolled_hypergrad":
            p0 = {k: put_params(v) for k, v in mlp0.items()}
            return p0, put_params(lam), put_replicated(mlp_train), put_replicated(mlp_val)
        w0 = put_params(w_star if name == "implicit_hypergrad" else np.zeros(H))
        train = (put_features(linear_train[0]), put_replicated(linear_train[1]))
        val = (put_features(linear_val[0]), put_replicated(linear_val[1]))
        return w0, put_params(lam), train, val

    def run(put_params, put_features, put_replicated, w_star, record_hlo):
        out = {}
        for name, fn in computations.items():
            inside.clear()
            args = inputs(name, w_star, put_params, put_features, put_replicated)
            jitted = jax.jit(fn)
            try:
                compiled = jitted.lower(*args).compile()
                result = jax.block_until_ready(jitted(*args))
            except Exception as error:  # recorded, and judged by the test
                out[name] = {"error": f"{type(error).__name__}: {error}"}
                continue
            out[name] = {
                "values": {k: jax.tree.map(lambda x: np.asarray(x).tolist(), v)
                           for k, v in result.items()},
                "layouts": {k: [layout(x) for x in jax.tree.leaves(v)] for k, v in result.items()},
                "inputs": [layout(x) for x in jax.tree.leaves(args)],
                "inside": dict(inside),
            }  # fmt: skip
            if record_hlo:
                out[name]["all_gathers"] = all_gathers(compiled.as_text())
        return out

    def layout(x):
        sharding = x.sharding
        return {
            "shape": list(x.shape),
            "spec": str(getattr(sharding, "spec", None)),
            "num_devices": len(sharding.device_set),
            "shard_shapes": sorted(list(s.data.shape) for s in x.addressable_shards),
        }

    # ---- one device ----
    one = lambda x: jax.device_put(np.asarray(x), devices[0])
    one_tree = lambda tree: jax.tree.map(one, tree)
    single = run(one, one, one_tree, np.zeros(H), record_hlo=False)
    w_star = np.asarray(single["implicit_adjoint"]["values"]["params"])
    single["implicit_hypergrad"] = run(one, one, one_tree, w_star, False)["implicit_hypergrad"]

    # ---- sharded over the "model" axis ----
    params_sharding = NamedSharding(mesh, P("model"))
    features_sharding = NamedSharding(mesh, P(None, "model"))
    replicated = NamedSharding(mesh, P())

    def put_params(x):
        x = np.asarray(x)
        spec = P("model") if x.ndim == 1 else P(None, "model")  # split the hidden dimension
        return jax.device_put(x, NamedSharding(mesh, spec))

    put_features = lambda x: jax.device_put(np.asarray(x), features_sharding)
    put_replicated = lambda tree: jax.tree.map(lambda x: jax.device_put(x, replicated), tree)
    assert params_sharding.spec == P("model")
    sharded = run(put_params, put_features, put_replicated, w_star, record_hlo=True)

    # ---- the closed form of the linear model's hypergradient ----
    (Pt, yt), (Pv, yv) = linear_train, linear_val
    A = Pt.T @ Pt / N_TRAIN + np.diag(np.exp(lam))
    w = np.linalg.solve(A, Pt.T @ yt / N_TRAIN)
    g = 2 * Pv.T @ (Pv @ w - yv) / N_VAL
    exact = -np.linalg.solve(A, g) * np.exp(lam) * w

    with open(out_path, "w") as f:
        json.dump({"single": single, "sharded": sharded, "exact_hgrad": exact.tolist()}, f)


def _describe_sharding(sharding) -> str:
    spec = getattr(sharding, "spec", None)
    return f"{type(sharding).__name__}({spec}, {len(sharding.device_set)} devices)"


def all_gathers(hlo: str) -> list[str]:
    """The result types of the all-gather instructions of a compiled HLO module."""
    return re.findall(r"=\s*(\S+)\s+all-gather(?:-start)?\(", hlo)


if __name__ == "__main__":
    main(sys.argv[1])
