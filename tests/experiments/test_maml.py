"""`experiments.hyper_representation`'s whole-network heads on a tiny conv net in float64:
MAML's meta-gradient against central finite differences, first-order MAML against a
hand-written meta-gradient with the inner Jacobian dropped, iMAML's against a dense solve of
its implicit formula, the vmapped meta-batch against the per-episode loop, and iMAML's linear
solvers at an inner iterate where $H + \\lambda I$ is indefinite."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import hyper_representation as hr


N_WAY, SIDE = 3, 4


def tiny_net(seed=0, width=2):
    """One conv block on 4x4 images: 2x2x`width` = 8 features; 49 adapted parameters with
    the 3-way head."""
    return hr.HyperRepresentation(width, 1, key=jax.random.key(seed), dtype=jnp.float64)


def tiny_batch(meta_batch=2, seed=0, shots=1, queries=2):
    key_s, key_q = jax.random.split(jax.random.key(seed))
    support = jax.random.uniform(key_s, (meta_batch, N_WAY * shots, SIDE, SIDE, 1), jnp.float64)
    query = jax.random.uniform(key_q, (meta_batch, N_WAY * queries, SIDE, SIDE, 1), jnp.float64)
    labels = lambda m: jnp.tile(jnp.repeat(jnp.arange(N_WAY, dtype=jnp.int32), m), (meta_batch, 1))
    return hr.Batch(support, labels(shots), query, labels(queries))


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def theta_of(model):
    """θ as `_maml.py` builds it: the net and a zero head."""
    d = 2 * 2 * model.net.blocks[0].weight.shape[-1]
    z = jnp.zeros
    return hr.Adapted(model.net, z((d, N_WAY), jnp.float64), z(N_WAY, jnp.float64))


def directional(f, x, direction, h=1e-5):
    shifted = lambda s: jax.tree.map(lambda p, v: p + s * h * v, x, direction)
    return (f(shifted(1.0)) - f(shifted(-1.0))) / (2 * h)


def tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def mean_loss(model, batch, head, adapt=hr.AdaptOptions(), num_steps=3):
    loss, _ = hr._meta_step.batch_loss(
        model, batch, n_way=N_WAY, num_steps=num_steps, head=head, adapt=adapt
    )
    return loss


# -- MAML and first-order MAML -----------------------------------------------------------------


@pytest.mark.slow
def test_maml_meta_gradient_matches_finite_differences():
    model = tiny_net()
    batch = tiny_batch()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss = jax.jit(lambda p: mean_loss(eqx.combine(p, static), batch, "maml"))
    grad = jax.jit(jax.grad(loss))(params)
    direction = random_like(params, 3)
    exact = tree_dot(grad, direction)
    fd = directional(loss, params, direction)
    assert abs(float(exact)) > 1e-3  # a real signal
    assert abs(float(fd - exact)) <= 1e-7 * abs(float(exact))
    # The step size and L2 strength belong to the other heads: no gradient here.
    assert float(grad.raw_step) == 0.0 and float(grad.raw_l2) == 0.0


@pytest.mark.slow
def test_first_order_maml_is_the_meta_gradient_without_the_inner_jacobian():
    # By hand: φ_T from T plain SGD steps on the support loss, then ∇L_Q(φ_T) with respect
    # to φ_T itself (dφ_T/dθ = I). FOMAML's meta-gradient for the net is that; MAML's is not.
    model = tiny_net(seed=1)
    support, support_labels, query, query_labels = [x[0] for x in tiny_batch(1, seed=1)]
    T, lr = 3, 0.4
    phi = theta_of(model)
    for _ in range(T):
        g = jax.grad(lambda p: cross_entropy(p(support), support_labels))(phi)
        phi = jax.tree.map(lambda x, gx: x - lr * gx, phi, g)
    want = jax.grad(lambda p: cross_entropy(p(query), query_labels))(phi).net

    def loss(net, head):
        m = eqx.tree_at(lambda m: m.net, model, net)
        adapt = hr.AdaptOptions(inner_lr=lr)
        episode = (support, support_labels, query, query_labels)
        return hr.episode_loss(m, *episode, n_way=N_WAY, num_steps=T, head=head, adapt=adapt)[0]

    fomaml = eqx.filter_jit(eqx.filter_grad(lambda n: loss(n, "fomaml")))(model.net)
    for a, b in zip(jax.tree.leaves(fomaml), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    maml = eqx.filter_jit(eqx.filter_grad(lambda n: loss(n, "maml")))(model.net)
    gap = ravel_pytree(maml)[0] - ravel_pytree(fomaml)[0]
    assert float(jnp.linalg.norm(gap)) > 1e-3 * float(jnp.linalg.norm(ravel_pytree(maml)[0]))


# -- iMAML ---------------------------------------------------------------------------------------


def imaml_query_loss(support, support_labels, query, query_labels, *, lam, lr, steps, solver):
    def loss(theta):
        phi = hr.imaml_adapt(
            theta, support, support_labels, lam=lam, inner_lr=lr, num_steps=steps, solver=solver
        )
        return cross_entropy(phi(query), query_labels)

    return loss


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["gmres", "normal_cg"])
def test_imaml_meta_gradient_matches_a_dense_solve(solver):
    # At the inner iterate φ (30 steps on the proximal loss, from θ), the meta-gradient is
    # (I + H/λ)⁻¹ ∇L_Q(φ), H the support loss's Hessian at φ: built densely here with
    # jax.hessian on the 49 flattened parameters and solved with numpy. λ = 8 keeps H + λI
    # positive definite at φ (checked), so normal CG's squared condition number stays small.
    model = tiny_net(seed=2)
    support, support_labels, query, query_labels = [x[0] for x in tiny_batch(1, seed=2)]
    lam, lr, steps = 8.0, 0.05, 30
    theta = theta_of(model)
    params, static = eqx.partition(theta, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    assert flat.size == 49
    linear = hr.linear_solver(solver, 49 if solver == "gmres" else 150)
    loss = imaml_query_loss(
        support, support_labels, query, query_labels, lam=lam, lr=lr, steps=steps, solver=linear
    )
    grad = jax.jit(jax.grad(lambda f: loss(eqx.combine(unravel(f), static))))(flat)

    # The same iterate by hand: plain gradient descent on the proximal loss.
    support_loss = lambda f: cross_entropy(eqx.combine(unravel(f), static)(support), support_labels)
    query_loss = lambda f: cross_entropy(eqx.combine(unravel(f), static)(query), query_labels)
    phi = flat
    for _ in range(steps):
        phi = phi - lr * (jax.grad(support_loss)(phi) + lam * (phi - flat))
    hessian = jax.hessian(support_loss)(phi)
    assert float(jnp.linalg.eigvalsh(hessian)[0]) > -lam  # the system is positive definite
    want = np.linalg.solve(
        np.eye(49) + np.asarray(hessian) / lam, np.asarray(jax.grad(query_loss)(phi))
    )
    assert np.linalg.norm(want) > 1e-3
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-9 * np.linalg.norm(want))
    # Not the first-order answer: the Hessian term is real.
    assert np.linalg.norm(want - np.asarray(jax.grad(query_loss)(phi))) > 1e-3 * np.linalg.norm(
        want
    )


@pytest.mark.slow
def test_imaml_linear_solvers_where_h_plus_lambda_i_is_indefinite():
    # torchopt's iMAML example's recipe (5 SGD steps, λ = 2), here at inner step 0.4 on a
    # two-block net of width 8 on 8x8 images (32 features, 845 adapted parameters): at the
    # inner iterate H + λI has a negative eigenvalue (measured -1.9, -3.0, -1.3 for seeds
    # 0..2). CG breaks down: a NaN meta-gradient, not a plausible wrong number. Normal-equation
    # CG and GMRES with the same budget give finite ones, and GMRES with a full budget reaches
    # the dense solve.
    model = hr.HyperRepresentation(8, 2, key=jax.random.key(0), dtype=jnp.float64)
    key_s, key_q = jax.random.split(jax.random.key(100))
    support = jax.random.uniform(key_s, (5, 8, 8, 1), jnp.float64)
    query = jax.random.uniform(key_q, (10, 8, 8, 1), jnp.float64)
    support_labels = jnp.arange(5, dtype=jnp.int32)
    query_labels = jnp.repeat(support_labels, 2)
    lam, lr, steps = 2.0, 0.4, 5
    z = jnp.zeros
    theta = hr.Adapted(model.net, z((32, 5), jnp.float64), z(5, jnp.float64))
    params, static = eqx.partition(theta, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)
    n = flat.size
    support_loss = lambda f: cross_entropy(eqx.combine(unravel(f), static)(support), support_labels)
    query_loss = lambda f: cross_entropy(eqx.combine(unravel(f), static)(query), query_labels)
    phi = flat
    for _ in range(steps):
        phi = phi - lr * (jax.grad(support_loss)(phi) + lam * (phi - flat))
    hessian = np.asarray(jax.jit(jax.hessian(support_loss))(phi))
    assert np.linalg.eigvalsh(hessian + lam * np.eye(n))[0] < -1.0  # indefinite
    want = np.linalg.solve(np.eye(n) + hessian / lam, np.asarray(jax.grad(query_loss)(phi)))

    def grad(name, iterations):
        loss = imaml_query_loss(
            support, support_labels, query, query_labels, lam=lam, lr=lr, steps=steps,
            solver=hr.linear_solver(name, iterations),
        )  # fmt: skip
        return jax.jit(jax.grad(lambda f: loss(eqx.combine(unravel(f), static))))(flat)

    assert bool(jnp.all(jnp.isnan(grad("cg", 5))))
    for name in ("normal_cg", "gmres"):
        assert bool(jnp.all(jnp.isfinite(grad(name, 5))))
    np.testing.assert_allclose(grad("gmres", n), want, rtol=1e-6, atol=1e-8 * np.linalg.norm(want))


# -- the meta-batch, bad input ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("head", ["maml", "imaml"])
def test_vmapped_meta_batch_equals_the_per_episode_loop(head):
    model = tiny_net(seed=3)
    batch = tiny_batch(meta_batch=3, seed=3)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    adapt = hr.AdaptOptions(inner_lr=0.1, imaml_solver="gmres", imaml_cg_steps=10)

    def loop(p):
        losses = [
            hr.episode_loss(eqx.combine(p, static), *e, n_way=N_WAY, num_steps=3, head=head,
                            adapt=adapt)[0]
            for e in zip(*batch)
        ]  # fmt: skip
        return sum(losses) / len(losses)

    want = jax.jit(jax.value_and_grad(loop))(params)
    for episode_map in ("vmap", "map"):
        options = eqx.tree_at(lambda a: a.episode_map, adapt, episode_map)
        got = jax.jit(
            jax.value_and_grad(lambda p: mean_loss(eqx.combine(p, static), batch, head, options))
        )(params)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="imaml_solver"):
        hr.AdaptOptions(imaml_solver="lu")
    with pytest.raises(ValueError, match="inner_lr"):
        hr.AdaptOptions(inner_lr=0.0)
    with pytest.raises(ValueError, match="episode_map"):
        hr.AdaptOptions(episode_map="pmap")
    with pytest.raises(ValueError, match="`--head` must be one of"):
        hr.main(["--head", "reptile", "--out", "/nonexistent/never-created"])
    with pytest.raises(ValueError, match="imaml_solver"):
        hr.main(["--head", "imaml", "--imaml-solver", "lu", "--out", "/nonexistent/never"])
    with pytest.raises(ValueError, match="`conv`"):
        hr.HyperRepresentation(4, conv="im2col", key=jax.random.key(0))
    with pytest.raises(ValueError, match="`--conv`"):
        hr.main(["--conv", "im2col", "--out", "/nonexistent/never"])


# -- The "matmul" lowering of the convolutions ---------------------------------------------------


@pytest.mark.slow  # 10 s of compiling
def test_matmul_lowering_is_the_same_block_to_second_order():
    """Patches times a matrix against XLA's convolution, on an odd image side (5: the pooling
    drops a row and a column): the values, the gradient and a Hessian-vector product (what
    MAML differentiates), jitted; and under `jit` of `vmap` over per-episode weights (what
    MAML and iMAML run) against a loop of the XLA lowering."""
    key_x, key_b, key_v = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (2, 3, 5, 5, 2), jnp.float64)
    keys = jax.random.split(key_b)
    blocks = {
        conv: [hr.ConvBlock(2, 3, key=k, dtype=jnp.float64, conv=conv) for k in keys]
        for conv in ("xla", "matmul")
    }
    loss = lambda block, x: jnp.sum(jnp.sin(block(x)))
    grad = eqx.filter_grad(lambda block_and_x: loss(*block_and_x))

    @eqx.filter_jit
    def value_grad_hvp(block, x):
        params, static = eqx.partition(block, eqx.is_inexact_array)
        g = lambda p, x: grad((eqx.combine(p, static), x))
        direction = (random_like(params, 1), jax.random.normal(key_v, x.shape, jnp.float64))
        return loss(block, x), jax.jvp(g, (params, x), direction)

    out = [value_grad_hvp(blocks[conv][0], x[0]) for conv in ("matmul", "xla")]
    for a, b in zip(*map(jax.tree.leaves, out)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

    stacked = jax.tree.map(lambda *a: jnp.stack(a), *blocks["matmul"])
    vmapped = eqx.filter_jit(eqx.filter_vmap(lambda block, x: grad((block, x))))(stacked, x)
    loop = [eqx.filter_jit(grad)((blocks["xla"][i], x[i])) for i in range(2)]
    for a, *b in zip(*map(jax.tree.leaves, [vmapped, *loop])):
        np.testing.assert_allclose(a, np.stack(b), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["maml", "imaml"])
def test_matmul_lowering_gives_the_same_meta_gradient(head):
    """Two conv blocks (the second has input channels, so the patches path runs), the
    meta-batch vmapped: the loss and the meta-gradient agree with the XLA lowering."""
    models = [
        hr.HyperRepresentation(4, 2, key=jax.random.key(1), dtype=jnp.float64, conv=conv)
        for conv in ("xla", "matmul")
    ]
    batch = tiny_batch()
    out = [eqx.filter_value_and_grad(mean_loss)(m, batch, head) for m in models]
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[0])):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_nan_support_gives_nan_meta_gradients():
    model = tiny_net()
    batch = tiny_batch(meta_batch=1)
    batch = batch._replace(support=batch.support.at[0, 0, 0, 0, 0].set(jnp.nan))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    for head in ("maml", "imaml"):
        loss, grad = jax.jit(
            jax.value_and_grad(lambda p: mean_loss(eqx.combine(p, static), batch, head))
        )(params)
        assert bool(jnp.isnan(loss))
        nan = [bool(jnp.all(jnp.isnan(g))) for g in jax.tree.leaves(grad.net)]
        if head == "imaml":
            # The implicit adjoint NaNs every derivative of a non-finite system.
            assert all(nan)
        else:
            # Through the unrolled steps JAX's own rules apply: the convolution's and batch
            # norm scale's gradients are NaN; the last offset's is not (ReLU's derivative at
            # NaN is 0), but the Adam step on the others makes the model NaN all the same.
            assert nan[0] and nan[1]


def test_the_t_study_adds_the_whole_network_heads_only_when_asked():
    from experiments.hyper_representation import unrolled_vs_implicit as study

    default = study.variants([1, 5], study.DEFAULT_HEADS, 5)
    assert [label for label, _, _ in default] == ["T=1", "T=5", "implicit", "ProtoNet"]
    asked = study.variants([1], ["linear", "maml", "fomaml", "imaml"], 7)
    assert asked == [("T=1", "linear", 1), ("MAML", "maml", 7), ("FOMAML", "fomaml", 7),
                     ("iMAML", "imaml", 7)]  # fmt: skip


def test_the_t_study_lowers_only_the_whole_network_heads_as_asked():
    """`--conv matmul --episode-map map` reach MAML and iMAML, not the heads on fixed features
    (where the matmul lowering is slower)."""
    from experiments.hyper_representation import unrolled_vs_implicit as study

    cfg = dict(study.QUICK, conv="matmul", episode_map="map")
    for head, T in [("linear", 3), ("implicit", 5), ("prototypes", 5)]:
        variant = study.variant_config(cfg, head, T)
        assert (variant["conv"], variant["episode_map"], variant["head"]) == ("xla", "vmap", head)
    for head in study.WHOLE_NETWORK:
        variant = study.variant_config(cfg, head, 5)
        assert (variant["conv"], variant["episode_map"]) == ("matmul", "map")
        assert variant["inner_steps"] == 5


def test_matmul_lowering_runs_a_matrix_product_not_a_convolution_of_the_weight():
    """The equality tests above would pass if `conv="matmul"` silently fell back to XLA's
    convolution: the traced block must hold a matrix product with the weight, and the XLA
    lowering none."""
    x = jnp.zeros((3, 5, 5, 2), jnp.float64)

    def primitives(conv):
        block = hr.ConvBlock(2, 3, key=jax.random.key(0), dtype=jnp.float64, conv=conv)
        return [e.primitive.name for e in jax.make_jaxpr(block)(x).jaxpr.eqns]

    assert "dot_general" in primitives("matmul")
    assert "dot_general" not in primitives("xla")
    # The first block (one input channel) stays a convolution in both.
    first = hr.ConvBlock(1, 3, key=jax.random.key(0), dtype=jnp.float64, conv="matmul")
    eqns = jax.make_jaxpr(first)(jnp.zeros((3, 5, 5, 1), jnp.float64)).jaxpr.eqns
    assert "dot_general" not in [e.primitive.name for e in eqns]
