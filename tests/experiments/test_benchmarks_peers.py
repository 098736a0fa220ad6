"""The contenders of the benchmarks in `experiments/benchmarks/` (unrolled memory, forward vs
reverse, PyTorch peers, task batching) compute the same hypergradients, on tiny sizes: the
benchmarks time them, these tests check that what is timed is right. No timings here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import relerr

from experiments.benchmarks import (
    against_torch,
    forward_vs_reverse,
    task_batching,
    unrolled_memory,
)


@pytest.mark.slow
def test_unrolled_contenders_agree_with_a_plain_loop():
    train, val, group, lam = unrolled_memory.make_problem(n=20, d=12, groups=3)
    num_steps = 12

    def plain(lam):  # a hand-written unroll, differentiated by jax.grad
        w = jnp.zeros(12)
        for _ in range(num_steps):
            w = w - jax.grad(unrolled_memory.inner_loss)(w, lam, (train, group))
        return unrolled_memory.outer_loss(w, lam, val)

    reference = jax.jit(jax.grad(plain))(lam)
    for name in ("full", "checkpoints", "forward"):
        _, hgrad = jax.jit(unrolled_memory.contender(name, num_steps))(lam, train, val, group)
        assert relerr(hgrad, reference) <= 1e-10, name
    # Truncation back-propagates through the last steps only: a different number.
    _, truncated = unrolled_memory.contender("truncate", num_steps)(lam, train, val, group)
    assert relerr(truncated, reference) > 1e-6


@pytest.mark.slow
def test_checkpointing_lowers_xla_peak_memory():
    train, val, group, lam = unrolled_memory.make_problem(n=20, d=50, groups=3)
    args = (lam, train, val, group)
    memory = {
        name: unrolled_memory.memory_analysis(unrolled_memory.contender(name, 2_000), *args)
        for name in ("full", "checkpoints")
    }
    if memory["full"]["peak"] < 0:
        pytest.skip("this backend has no compiled memory analysis")
    # 2,000 stored states of 50 float64 against ~2·√2000 ≈ 90: at most a fifth.
    assert memory["checkpoints"]["peak"] < 0.2 * memory["full"]["peak"]


@pytest.mark.slow
def test_forward_and_reverse_agree():
    train, val = forward_vs_reverse.make_problem(n=30, d=12)
    H = 4
    group = jnp.asarray(np.arange(12) % H)
    lam = jnp.linspace(-2.0, 0.0, H)
    w_star, grad_norm = forward_vs_reverse.newton(jnp.zeros(12), lam, (train, group))
    assert float(grad_norm) <= 1e-12
    fns = forward_vs_reverse.contenders(num_steps=15, learning_rate=0.3)
    out = {name: jax.jit(fn)(w_star, lam, train, val, group)[1] for name, fn in fns.items()}
    assert relerr(out["unrolled_forward"], out["unrolled_reverse"]) <= 1e-12
    assert relerr(out["implicit_forward"], out["implicit_reverse"]) <= 1e-8
    # The implicit hypergradient against a dense solve.
    L = lambda w, lam: forward_vs_reverse.inner_loss(w, lam, (train, group))
    v = jnp.linalg.solve(
        jax.hessian(L)(w_star, lam), jax.grad(forward_vs_reverse.log_loss)(w_star, val)
    )
    dense = -jax.grad(lambda lam: jnp.vdot(jax.grad(L)(w_star, lam), v))(lam)
    assert relerr(out["implicit_reverse"], dense) <= 1e-8


@pytest.mark.slow
def test_task_batching_vmap_equals_loop():
    tasks = jax.tree.map(jnp.asarray, task_batching.make_tasks(3))
    lam = jnp.linspace(-3.0, -1.0, task_batching.D)
    values, grads = jax.jit(jax.vmap(task_batching.hypergrad, in_axes=(None, 0)))(lam, tasks)
    single = jax.jit(task_batching.hypergrad)
    for i in range(3):
        value, grad = single(lam, task_batching.task(tasks, i))
        assert relerr(grad, grads[i]) <= 1e-12
        assert abs(float(value) - float(values[i])) <= 1e-14


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torchopt calls functorch.vjp
def test_torch_peers_agree():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchopt")
    # Logistic regression, implicit: torchopt's custom_root against bilevax, same CG steps.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 8))
    y = (X @ rng.standard_normal(8) > 0).astype(float)
    train = (jnp.asarray(X[:40]), jnp.asarray(y[:40]))
    val = (jnp.asarray(X[40:]), jnp.asarray(y[40:]))
    lam = jnp.linspace(-2.0, 0.0, 8)
    w, _ = against_torch.logistic.newton_cg(jnp.zeros(8), lam, train)
    import lineax as lx

    cg = lx.CG(rtol=0.0, atol=0.0, max_steps=8)
    _, ours = jax.jit(against_torch.logistic.bilevax_hypergrad(cg))(w, lam, train, val)
    fn, as_t = against_torch.torchopt_implicit(train, val, w, 8, "cpu")
    _, theirs = fn(as_t(lam))
    assert relerr(theirs.numpy(), ours) <= 1e-10
    # MLP meta-step: torch.func and torchopt's MetaSGD against bilevax.
    (xs, ys), (xq, yq) = against_torch.few_shot_tasks(2, 3, 2, 3, 6)
    theta = against_torch.init_mlp(6, 5, 3)
    support, query = (jnp.asarray(xs), jnp.asarray(ys)), (jnp.asarray(xq), jnp.asarray(yq))
    theta_j = jax.tree.map(jnp.asarray, theta)
    _, grads = jax.jit(against_torch.bilevax_meta_step(3, 0.4))(theta_j, support, query)
    t = lambda a, dtype=torch.float64: torch.as_tensor(a, dtype=dtype)
    data = (t(xs), t(ys, torch.long), t(xq), t(yq, torch.long))
    _, func_grads = against_torch.torch_func_meta_step(3, 0.4)(
        {k: t(v) for k, v in theta.items()}, *data
    )
    _, opt_grads = against_torch.torchopt_meta_step(theta, 3, 0.4, "cpu")(*data)
    for k in theta:
        assert relerr(func_grads[k].detach().numpy(), grads[k]) <= 1e-12, k
        assert relerr(opt_grads[k].detach().numpy(), grads[k]) <= 1e-12, k
