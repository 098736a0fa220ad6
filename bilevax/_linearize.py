import jax

from ._checks import check_callable, check_same_structure


def linearized_response(fn, primal, tangent, *args):
    r"""Evaluates `fn` at `primal` and its first-order expansion in `tangent`, in one `jax.jvp`:

    $$\texttt{out} = f(\lambda_0, \ldots), \qquad
      \texttt{out\_lin} = f(\lambda_0, \ldots) + J_f(\lambda_0)\,\delta.$$

    This is the linearisation of Δ-STN (Bae & Grosse 2020): with `fn` mapping a
    hyperparameter through a centred hypernetwork to the network's outputs, `out` is the
    prediction at the current hyperparameters (which trains the general weights) and
    `out_lin` the prediction linearised in the perturbation $\delta$ (which trains the
    response weights), both from one forward pass. Works under `jax.vmap` (per-example
    perturbations) and `jax.grad`.

    **Arguments:**

    - `fn`: `(primal, *args) -> out`, any pytree output.
    - `primal`: the point $\lambda_0$, a pytree of floating-point arrays.
    - `tangent`: the perturbation $\delta$, with the structure and shapes of `primal`.
    - `*args`: further arguments passed to `fn`, not differentiated.

    **Returns:**

    `(out, out_lin)`, two pytrees with the structure of `fn`'s output.
    """
    check_callable("fn", fn)
    check_same_structure("tangent", tangent, primal, "primal")
    out, directional = jax.jvp(lambda p: fn(p, *args), (primal,), (tangent,))
    return out, jax.tree.map(lambda o, d: o + d, out, directional)
