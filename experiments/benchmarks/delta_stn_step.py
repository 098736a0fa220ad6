"""One Δ-STN weight step against one plain training step of the same MLP and batch, and
against STN and centred-STN steps.

Each contender is a full weight step (gradient and SGD-with-momentum update) on a batch of 128
MNIST-sized examples with per-layer dropout, float32, jitted with the data as arguments:

- `plain`: the same MLP without hypernetwork (general weights only, `h=None`);
- `stn`, `centred`: `bilevax.nn.weight_grads` with the full perturbed forward pass;
- `delta`: Δ-STN, one JVP for the δ = 0 and the linearised predictions, two pullbacks
  (general weights on the δ = 0 loss, response weights on the linearised loss);
- `delta_coupled`: Δ-STN with one pullback of the sum (`decouple=False`).

Run times are medians of interleaved repeats; ratios are paired (see `_timing.compare`). The
goal is Δ-STN ≤ 1.5x the plain step; the PyTorch reference pays 4–6x (it runs a separate
forward pass per phase and a double-backward JVP).

    python -m experiments.benchmarks.delta_stn_step [--quick] [--out DIR]
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import bilevax.nn as bnn

from .. import _common
from ._timing import (
    bar_ratio_plot,
    compare,
    finish,
    format_table,
    outputs,
    paired_ratio,
    parser,
)


CONTENDERS = ("plain", "stn", "centred", "delta", "delta_coupled")
COLUMNS = ("sizes", "batch", "contender", "run_ms", "compile_s", "ratio_vs_plain", "spread")


def _apply(model, x, h, lam, key, train):
    return model(x, h, lam, key, train=train)


def _loss(out, y, lam):
    return optax.softmax_cross_entropy_with_integer_labels(out, y)


def _steps(optimizer):
    def update(model, grads, state):
        updates, state = optimizer.update(grads, state, model)
        return optax.apply_updates(model, updates), state

    def plain(model, state, hparams, x, y, key):
        lam = hparams.value(train=True)
        keys = jax.random.split(key, x.shape[0])

        def loss(m):
            out = jax.vmap(lambda xi, ki: _apply(m, xi, None, lam, ki, True))(x, keys)
            return jnp.mean(jax.vmap(_loss, in_axes=(0, 0, None))(out, y, lam))

        value, grads = eqx.filter_value_and_grad(loss)(model)
        return value, update(model, grads, state)

    def stn_like(variant, decouple=True):
        def step(model, state, hparams, x, y, key):
            value, grads = bnn.weight_grads(
                variant, _apply, _loss, model, hparams, x, y, key, decouple=decouple
            )
            return value, update(model, grads, state)

        return step

    return {
        "plain": plain,
        "stn": stn_like("stn"),
        "centred": stn_like("centred"),
        "delta": stn_like("delta"),
        "delta_coupled": stn_like("delta", decouple=False),
    }


def main(argv=None) -> list[dict]:
    args = parser("delta_stn_step", __doc__.splitlines()[0]).parse_args(argv)
    out = outputs(args, "delta_stn_step")
    cases = [(784, 256, 256, 10)] if args.quick else [(784, 256, 256, 10), (784, 1200, 1200, 10)]
    batch = 128
    rows = []
    for sizes in cases:
        key = jax.random.key(0)
        model = bnn.StnMLP(sizes, 3, key=key, dtype=jnp.float32)
        # A trained-looking hypernetwork: a non-zero bottleneck, so that no product is zero.
        model = eqx.tree_at(
            lambda m: [layer.bottleneck for layer in m.layers],
            model,
            [0.01 * jnp.ones_like(layer.bottleneck) for layer in model.layers],
        )
        specs = [bnn.Hyperparameter(f"dropout{i}", 0.2, "sigmoid") for i in range(3)]
        hparams = bnn.HyperParameters(specs, dtype=jnp.float32)
        optimizer = optax.sgd(0.01, 0.9)
        state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        x = jax.random.uniform(jax.random.key(1), (batch, sizes[0]), jnp.float32)
        y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])
        steps = _steps(optimizer)
        # `compare` jits each contender; the model and states go in as arguments.
        _, timings = compare(
            {name: steps[name] for name in CONTENDERS},
            model,
            state,
            hparams,
            x,
            y,
            jax.random.key(3),
            repeats=5 if args.quick else 9,
        )
        for name in CONTENDERS:
            t = timings[name]
            rows.append(
                dict(
                    sizes="-".join(map(str, sizes)),
                    batch=batch,
                    contender=name,
                    run_ms=1e3 * t.run_s,
                    compile_s=t.compile_s,
                    ratio_vs_plain=paired_ratio(t, timings["plain"]),
                    spread=t.spread,
                    timing=t,
                )
            )
    print(format_table(rows, COLUMNS))
    labels = [f"{r['sizes']}\n{r['contender']}" for r in rows if r["contender"] != "plain"]
    figure = lambda path: bar_ratio_plot(
        path,
        labels,
        {
            "step": [r["run_ms"] / 1e3 for r in rows if r["contender"] != "plain"],
            "plain step": [
                next(
                    p["run_ms"] / 1e3
                    for p in rows
                    if p["contender"] == "plain" and p["sizes"] == r["sizes"]
                )
                for r in rows
                if r["contender"] != "plain"
            ],
        },
        [r["ratio_vs_plain"] for r in rows if r["contender"] != "plain"],
        ratio_name="step time / plain step time",
        goal=1.5,
        title="STN weight steps against a plain step (MLP, batch 128, float32)",
    )
    finish(args, "delta_stn_step", out, {"rows": rows, "goal": "delta <= 1.5x plain"}, figure)
    return rows


if __name__ == "__main__":
    _common.cli(main)
