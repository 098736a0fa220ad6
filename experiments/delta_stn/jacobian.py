r"""The best-response Jacobian each centred variant learns, on a network whose output is
nonlinear in its weights (Bae & Grosse 2020's claim that Δ-STN's is the more accurate).

    python -m experiments.delta_stn.jacobian [--quick] [--out DIR] [--seed S]
        [--sigmas 0.05 0.1 0.2] [--steps N] [--hidden H] [--resume | --overwrite]

Dropout regression (the other Jacobian check) is affine in the hyperparameters, so the
linearisation is exact there and every variant fits the same secant: it cannot separate them.
Here the network is $10 \to H \to 1$ with a tanh hidden layer (two `bilevax.nn.StnLinear`
layers), on scikit-learn's diabetes data, with the training loss
$L(w, \lambda) = \tfrac1n\sum(f(x, w) - y)^2 + e^{u}\,\|w\|^2$ (every weight and bias: an
unpenalised bias of a hidden unit that L2 has switched off would be a flat direction, and $H$
singular).

1. $w_0 = w^*(\lambda_0)$ by `bx.inner_solve` (BFGS) and Newton steps
   ($\|\nabla L\| \le 10^{-12}$), frozen.
2. The exact Jacobian $\mathrm{d}w^*/\mathrm{d}u = -H^{-1}\,\partial^2 L/\partial w\,\partial u$
   by bilevax's implicit differentiation (`jax.jacfwd` through `inner_solve`), checked
   against a dense solve.
3. For each fixed $\sigma$: each variant's response (the STN layers' $V$, $c$ and bottleneck
   $H$, with one hyperparameter any Jacobian $R$, so the family is exactly $w_0 + R\delta$)
   trained with $w_0$ frozen, by Adam on `bilevax.nn.weight_grads`'s response gradient,
   fresh per-example perturbations every step.
4. The $\sigma$-secant each variant's objective targets, computed independently of the STN
   layers: the $R$ minimising $E_\delta$ of its loss (the loss at $w_0 + R\delta$ for the
   centred STN; the prediction linearised in $\delta$ for Δ-STN), $\delta \sim N(0, \sigma^2)$
   by 24-node Gauss–Hermite quadrature, by a trust-region Newton method on $R$ over a plain
   function of flat weights.

The results: each learned Jacobian's relative error against the exact one and against its
own secant, along training, and the secants' against the exact one.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from jax.flatten_util import ravel_pytree

import bilevax as bx
import bilevax.nn as bnn

from .. import _cli, _console, _harness, _outputs, problems


VARIANTS = {"delta": "Δ-STN", "centred": "centred STN"}
LOG_L2 = float(np.log(0.1))  # λ₀ = e^u₀: H ≥ 2λ₀ I, conditioned well enough to train R in minutes


def _effective(layer, h):
    """An STN layer's weights and biases at `h`: W + diag(H h) V and b + (H h) ⊙ c."""
    scale = layer.bottleneck @ h
    return layer.effective_weight(h), layer.general.bias + scale * layer.response.bias


def _apply(model, x, h, lam, key, train):
    """The network on one example: its prediction and the effective parameters (which the L2
    penalty reads), both functions of `h`."""
    del lam, key, train
    first, second = model
    hidden = jnp.tanh(first(x, h))
    return second(hidden, h)[0], (_effective(first, h), _effective(second, h))


def _penalty(parameters) -> jax.Array:
    return sum(jnp.sum(p**2) for p in jax.tree.leaves(parameters))


def _train_loss(out, y, lam):
    prediction, parameters = out
    return (prediction - y) ** 2 + jnp.exp(lam[0]) * _penalty(parameters)


def _model(hidden: int, key):
    k1, k2 = jax.random.split(key)
    first = bnn.StnLinear(10, hidden, 1, key=k1, dtype=jnp.float64)
    second = bnn.StnLinear(hidden, 1, 1, key=k2, dtype=jnp.float64)
    return first, second


def _general(model):
    """The general weights `[(W, b), ...]`: the plain network's parameters."""
    return [(layer.general.weight, layer.general.bias) for layer in model]


def _plain_loss(general, u, data):
    """L(w, u) of the plain network, `general = [(W1, b1), (W2, b2)]`."""
    X, y = data
    (W1, b1), (W2, b2) = general
    prediction = jnp.tanh(X @ W1.T + b1) @ W2[0] + b2[0]
    return jnp.mean((prediction - y) ** 2) + jnp.exp(u) * _penalty(general)


def converged_general(model, data):
    """w*(λ₀) from the model's general weights: heavy-ball gradient descent to ‖∇L‖ ≤ 1e-6,
    then Newton steps on the dense Hessian to ‖∇L‖ ≤ 1e-12."""
    solution = bx.inner_solve(
        _plain_loss,
        _general(model),
        jnp.asarray(LOG_L2),
        data,
        solver=bx.GradientDescent(0.1, momentum=0.9),
        max_steps=50_000,
        tol=1e-6,
    )
    if solution.result == bx.RESULTS.nonfinite:
        raise RuntimeError("the solve of w*(λ₀) went non-finite.")
    flat, unravel = ravel_pytree(solution.params)
    loss = lambda w: _plain_loss(unravel(w), LOG_L2, data)
    newton = jax.jit(lambda w: w - jnp.linalg.solve(jax.hessian(loss)(w), jax.grad(loss)(w)))
    for _ in range(8):
        flat = newton(flat)
    if not float(jnp.linalg.norm(jax.grad(loss)(flat))) <= 1e-12:
        raise RuntimeError("Newton's polish of w*(λ₀) did not reach ‖∇L‖ ≤ 1e-12.")
    return unravel(flat)


def exact_jacobian(general, data) -> tuple[np.ndarray, np.ndarray]:
    """dw*/du at u₀ by bilevax's implicit differentiation (forward mode through
    `inner_solve`), and the same from a dense Hessian solve: `(implicit, dense)`, flat."""

    def solution(u):
        return bx.inner_solve(
            _plain_loss,
            general,
            u,
            data,
            solver=bx.GradientDescent(0.1),
            max_steps=0,  # `general` is w*(λ₀) to 1e-12: the solve only attaches the derivative
            tol=1e-10,
            adjoint=bx.ImplicitAdjoint(),
        ).params

    implicit = ravel_pytree(jax.jit(jax.jacfwd(solution))(jnp.asarray(LOG_L2)))[0]
    flat, unravel = ravel_pytree(general)
    loss = lambda w, u: _plain_loss(unravel(w), u, data)

    @jax.jit
    def dense_solve(flat, u):
        hessian = jax.hessian(loss)(flat, u)
        mixed = jax.jacfwd(jax.grad(loss), argnums=1)(flat, u)
        return -jnp.linalg.solve(hessian, mixed)

    dense = dense_solve(flat, jnp.asarray(LOG_L2))
    return np.asarray(implicit), np.asarray(dense)


def learned_jacobian(model) -> np.ndarray:
    """The response's Jacobian of the general weights in h at h = 0, flat like `_general`:
    an STN layer's weights are W + diag(H h) V and biases b + (H h) ⊙ c."""
    rows = [
        (
            layer.bottleneck[:, :1] * layer.response.weight,
            layer.bottleneck[:, 0] * layer.response.bias,
        )
        for layer in model
    ]
    return np.asarray(ravel_pytree(rows)[0])


def secant(variant: str, general, sigma: float, data, start) -> np.ndarray:
    """The R minimising E_δ of `variant`'s response loss over w₀ + Rδ, δ ~ N(0, σ²) by
    Gauss–Hermite quadrature: the σ-secant its training targets. Written on flat weights,
    independently of the STN layers."""
    X, y = data
    flat, unravel = ravel_pytree(general)
    nodes, weights = np.polynomial.hermite_e.hermegauss(24)
    nodes, weights = jnp.asarray(nodes * sigma), jnp.asarray(weights / weights.sum())

    def predictions(w):
        (W1, b1), (W2, b2) = unravel(w)
        return jnp.tanh(X @ W1.T + b1) @ W2[0] + b2[0]

    def at(R, delta):
        w = flat + R * delta
        if variant == "centred":
            prediction = predictions(w)
        else:
            base, direction = jax.jvp(predictions, (flat,), (R * delta,))
            prediction = base + direction
        return jnp.mean((prediction - y) ** 2) + jnp.exp(LOG_L2 + delta) * jnp.sum(w**2)

    objective = lambda R: jnp.sum(weights * jax.vmap(lambda d: at(R, d))(nodes)) / sigma**2
    # A trust region on the dense Hessian: Δ-STN's objective is quadratic in R, the centred
    # STN's is not, and is not convex either at σ = 0.2 (its Hessian is indefinite there).
    value_and_grad = jax.jit(jax.value_and_grad(objective))
    hessian = jax.jit(jax.hessian(objective))
    result = scipy.optimize.minimize(
        lambda R: tuple(map(np.asarray, value_and_grad(jnp.asarray(R)))),
        np.asarray(start),
        jac=True,
        hess=lambda R: np.asarray(hessian(jnp.asarray(R))),
        method="trust-exact",
        options=dict(gtol=1e-10, maxiter=500),
    )
    # trust-exact may stop early ("a bad approximation"); where the Hessian is positive
    # definite, Newton's steps finish the job. Judged by the gradient.
    R = jnp.asarray(result.x)
    for _ in range(5):
        gradient, curvature = value_and_grad(R)[1], hessian(R)
        if float(jnp.linalg.norm(gradient)) <= 1e-10 or jnp.linalg.eigvalsh(curvature)[0] <= 0:
            break
        R = R - jnp.linalg.solve(curvature, gradient)
    norm = float(jnp.linalg.norm(value_and_grad(R)[1]))
    if not norm <= 1e-9:
        raise RuntimeError(
            f"the {variant} secant's solve stopped at ‖∇‖ = {norm:.1e} (σ = {sigma}): "
            f"{result.message}"
        )
    return np.asarray(R)


def train_response(variant, model, general, sigma, data, steps, key, record_every):
    """The response weights trained with w₀ frozen at `general`, σ fixed, by Adam on
    `weight_grads`'s response gradient (its general part is dropped): the learned Jacobian
    every `record_every` steps."""
    # The response starts at R = 0 with the bottleneck at 1 and (V, c) at 0, so that R = V is
    # learned directly: from the layers' own start (H = 0) the product H V crawls out of a
    # saddle for thousands of steps before it learns anything.
    model = tuple(
        eqx.tree_at(
            lambda l: (
                l.general.weight,
                l.general.bias,
                l.response.weight,
                l.response.bias,
                l.bottleneck,
            ),
            layer,
            (
                W,
                b,
                jnp.zeros_like(layer.response.weight),
                jnp.zeros_like(layer.response.bias),
                jnp.ones_like(layer.bottleneck),
            ),
        )
        for layer, (W, b) in zip(model, general)
    )
    spec = bnn.Hyperparameter("log_l2", LOG_L2, "identity")
    hparams = bnn.HyperParameters([spec], scale=sigma, dtype=jnp.float64)
    X, y = data
    params, static = eqx.partition(model, eqx.is_inexact_array)
    is_response = bnn.response_filter(params)
    response, frozen = eqx.partition(params, is_response)
    schedule = optax.cosine_decay_schedule(1e-2, steps, alpha=1e-3)
    optimizer = optax.adam(schedule)

    def step(carry, key):
        response, state = carry
        model = eqx.combine(response, frozen, static)
        _, grads = bnn.weight_grads(variant, _apply, _train_loss, model, hparams, X, y, key)
        grads = eqx.filter(grads, is_response)
        # Adam's step count is an int32 (a user's strict promotion would refuse it).
        with jax.numpy_dtype_promotion("standard"):
            updates, state = optimizer.update(grads, state, response)
        return (optax.apply_updates(response, updates), state), None

    @jax.jit
    def segment(carry, keys):
        return jax.lax.scan(step, carry, keys)[0]

    carry = (response, optimizer.init(response))
    curve = []
    for keys in jax.random.split(key, steps).reshape(-1, record_every):
        carry = segment(carry, keys)
        curve.append(learned_jacobian(eqx.combine(carry[0], frozen, static)))
    return curve


def relerr(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def study(seed: int, hidden: int, sigmas, steps: int, record_every: int, run=None) -> dict:
    """The whole measurement; each σ a stage of `run` (when given)."""
    train, _, _ = problems.diabetes(seed)
    model = _model(hidden, jax.random.key(seed))
    general = converged_general(model, train)
    implicit, dense = exact_jacobian(general, train)
    out = dict(exact_vs_dense=relerr(implicit, dense), sigmas={})
    for sigma in sigmas:

        def compute(sigma=sigma):
            result = {}
            for variant in VARIANTS:
                target = secant(variant, general, sigma, train, implicit)
                curve = train_response(
                    variant,
                    model,
                    general,
                    sigma,
                    train,
                    steps,
                    jax.random.key(seed + 1),
                    record_every,
                )
                result[variant] = dict(
                    secant_vs_exact=relerr(target, implicit),
                    learned_vs_exact=[relerr(J, implicit) for J in curve],
                    learned_vs_secant=[relerr(J, target) for J in curve],
                )
            return result

        name = f"sigma{sigma:g}"
        out["sigmas"][name] = run.stage(name, compute) if run is not None else compute()
    out["steps"] = [record_every * (i + 1) for i in range(steps // record_every)]
    return out


def print_table(results: dict) -> None:
    rows = []
    for name, per_variant in results["sigmas"].items():
        for variant, r in per_variant.items():
            rows.append(
                (
                    name.removeprefix("sigma"),
                    VARIANTS[variant],
                    f"{r['secant_vs_exact']:.4f}",
                    f"{r['learned_vs_exact'][-1]:.4f}",
                    f"{r['learned_vs_secant'][0]:.4f} → {r['learned_vs_secant'][-1]:.4f}",
                )
            )
    columns = ("σ", "variant", "secant vs exact", "learned vs exact", "learned vs secant")
    title = f"Response Jacobians (exact vs dense solve: {results['exact_vs_dense']:.1e})"
    _console.print_table(title, columns, rows)


def plot(results: dict, path) -> None:
    plt = _outputs.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, per_variant in results["sigmas"].items():
        for variant, r in per_variant.items():
            label = f"{VARIANTS[variant]}, σ = {name.removeprefix('sigma')}"
            axes[0].semilogy(results["steps"], r["learned_vs_secant"], label=label)
            axes[1].semilogy(results["steps"], r["learned_vs_exact"], label=label)
    axes[0].set_title("learned Jacobian vs its σ-secant")
    axes[1].set_title("learned Jacobian vs the exact dw*/dλ")
    for ax in axes:
        ax.set_xlabel("response steps")
        ax.set_ylabel("relative error")
    axes[1].legend(fontsize=7)
    _outputs.save_figure(fig, path)


def main(argv=None) -> dict:
    p = _cli.parser("delta_stn_jacobian", __doc__.splitlines()[0])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument(
        "--steps", type=int, default=None, help="response steps (default 20000, --quick 4000)"
    )
    p.add_argument("--hidden", type=int, default=None, help="hidden units (default 16, --quick 8)")
    args = p.parse_args(argv)
    if not all(s > 0 for s in args.sigmas):
        raise ValueError(f"`--sigmas` must be positive, got {args.sigmas}.")
    steps = args.steps or (4000 if args.quick else 20000)
    hidden = args.hidden or (8 if args.quick else 16)
    record_every = max(1, steps // 20)
    if steps % record_every:
        raise ValueError(f"`--steps` must be a multiple of {record_every}, got {steps}.")
    run = _harness.start(args, x64=True)
    results = study(args.seed, hidden, args.sigmas, steps, record_every, run)
    results["config"] = dict(seed=args.seed, hidden=hidden, sigmas=args.sigmas, steps=steps)
    print_table(results)
    figure = lambda path: plot(results, path)
    return run.finish(results, {"delta_stn_jacobian.png": figure})


if __name__ == "__main__":
    _cli.cli(main)
