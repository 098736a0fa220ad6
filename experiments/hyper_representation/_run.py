"""The command line: meta-train each setting, select on meta-validation, test."""

import argparse
import time

import jax
import numpy as np

from .. import _cli, _console, _distributed, _harness, _outputs
from ..data import data_dir, load_omniglot, load_one_shot_runs
from ..data.omniglot import split_characters
from ._data import (
    EpisodeStream,
    fixed_episodes,
    runs_batch,
    runs_character_ids,
    split_holding_out,
)
from ._meta_step import (
    HEADS,
    AdaptOptions,
    Batch,
    episode_accuracies,
    init_state,
    make_mesh,
    make_meta_step,
    make_optimizer,
    replicate,
    shard_batch,
)
from ._model import CONV_LOWERINGS, HyperRepresentation


DESCRIPTION = "Hyper-representation few-shot learning on Omniglot (Franceschi et al. 2018)."
SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
NUM_QUERIES = 15  # per class, in meta-validation and meta-test episodes
# The full protocol (a GPU's worth) and the --quick one (CPU minutes). Every value is a flag.
FULL = dict(
    settings=list(SETTINGS),
    meta_steps=50_000,
    meta_batch=32,
    inner_steps=5,
    head="linear",  # "implicit": solved to a tolerance; "prototypes": ProtoNet; or whole-net
    # adaptation: "maml", "fomaml" (first-order) or "imaml", with these options (AdaptOptions)
    inner_lr=0.4,
    imaml_lambda=2.0,
    imaml_tol=0.0,
    imaml_solver="normal_cg",
    imaml_cg_steps=5,
    episode_map="vmap",  # or "map": the meta-batch's episodes one after another
    conv="xla",  # or "matmul": the same convolutions, faster on CPU for MAML and iMAML
    l2=0.1,  # the implicit head's initial L2 strength (learned)
    lr=1e-3,
    warmup=0,
    width=64,
    train_queries=15,
    step_size=0.5,
    max_step_size=2.0,
    eval_every=1000,
    val_episodes=600,
    test_episodes=600,
    eval_chunk=40,
    checkpoint_every=1000,
)
QUICK = dict(
    FULL,
    settings=["5w1s"],
    meta_steps=600,
    meta_batch=8,
    train_queries=5,
    width=32,
    lr=3e-3,
    eval_every=100,
    val_episodes=100,
    eval_chunk=20,
    checkpoint_every=100,
)


def ci95(x) -> float:
    """Half-width of the normal 95% confidence interval of the mean of `x`."""
    x = np.asarray(x, np.float64)
    return float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _train_batch(batch: Batch, mesh) -> Batch:
    """The meta-batch on the mesh: with one process `batch` is all of it; with several
    (`--distributed`) it is this process's share, and the global batch is assembled from every
    process's share without any process holding the others'."""
    if jax.process_count() == 1:
        return shard_batch(batch, mesh)
    return _distributed.global_batch_from_local(batch, mesh)


def adapt_options(cfg: dict) -> AdaptOptions:
    """The whole-network heads' options of a run's configuration."""
    keys = ("inner_lr", "imaml_lambda", "imaml_tol", "imaml_solver", "imaml_cg_steps")
    return AdaptOptions(**{k: cfg[k] for k in keys}, episode_map=cfg["episode_map"])


def evaluate(
    model,
    batches: list[Batch],
    n_way: int,
    num_steps: int,
    mesh,
    head: str = "linear",
    adapt: AdaptOptions = AdaptOptions(),
) -> np.ndarray:
    """Query accuracy of every episode of `batches`, each batch sharded over the mesh (padded
    with repeats of its first episode up to a multiple of the device count)."""
    num_devices = mesh.shape["tasks"]
    out = []
    for batch in batches:
        size = len(batch.support)
        pad = -size % num_devices
        if pad:
            batch = Batch(*(np.concatenate([x, np.repeat(x[:1], pad, 0)]) for x in batch))
        acc = episode_accuracies(model, shard_batch(batch, mesh), n_way, num_steps, head, adapt)
        out.append(_distributed.to_host(acc)[:size])  # gathered from every process
    return np.concatenate(out)


def train_setting(
    name: str, splits, cfg: dict, args, run: _harness.Run, mesh, runs, loop_name: str | None = None
) -> dict:
    """Meta-trains one setting with checkpoints (under `loop_name`, default `name`); returns
    its results."""
    n_way, k_shot = SETTINGS[name]
    train_images, val_images, test_images = (s.images for s in splits)
    T = cfg["inner_steps"]
    optimizer = make_optimizer(cfg["lr"], cfg["meta_steps"], warmup=cfg["warmup"])
    adapt = adapt_options(cfg)
    step_fn = make_meta_step(optimizer, n_way, T, cfg["head"], adapt)
    val = fixed_episodes(
        val_images,
        n_way,
        k_shot,
        NUM_QUERIES,
        cfg["val_episodes"],
        args.seed + 1,
        cfg["eval_chunk"],
    )
    meta_batch = cfg["meta_batch"]
    if meta_batch % jax.process_count():
        raise ValueError(
            f"`--meta-batch` ({meta_batch}) must be a multiple of the number of processes "
            f"({jax.process_count()})."
        )

    def fresh():
        model = HyperRepresentation(
            cfg["width"],
            step_size=cfg["step_size"],
            max_step_size=cfg["max_step_size"],
            l2=cfg["l2"],
            key=jax.random.key(args.seed),
            conv=cfg["conv"],
        )
        return dict(
            train_state=init_state(model, optimizer),
            best=dict(model=model, val_acc=-1.0, step=0),
            history=dict(step=[], val_acc=[], train_loss=[], train_acc=[], step_size=[], l2=[]),
            rng_state=args.seed,
            train_seconds=0.0,
            timed_steps=0,
            timed_seconds=0.0,
        )

    # Between evaluations: the losses and accuracies since the last one, and the timer.
    window: dict = dict(losses=[], accs=[], info="")

    def prepare(state):
        state["train_state"] = replicate(state["train_state"], mesh)
        # A resumed run's best model is on the host.
        state["best"]["model"] = replicate(state["best"]["model"], mesh)
        rng_state, batch = state["rng_state"], meta_batch
        if jax.process_count() > 1:
            # Each process samples only its share of every meta-batch, from a seed of its own:
            # the run's seed, its index and the step it starts from (the checkpointed
            # generator state is process 0's).
            seed = [args.seed, jax.process_index(), state["step"]]
            rng_state = np.random.default_rng(seed).bit_generator.state
            batch //= jax.process_count()
        window.update(
            stream=EpisodeStream(
                train_images, n_way, k_shot, cfg["train_queries"], batch, rng_state
            ),
            start=state["step"],
            tic=time.perf_counter(),
        )
        return state

    def step(k, state):
        state["train_state"], metrics = step_fn(
            state["train_state"], _train_batch(next(window["stream"]), mesh)
        )
        state["rng_state"] = window["stream"].state()
        window["losses"].append(metrics["loss"])
        window["accs"].append(metrics["accuracy"])
        if k == window["start"]:  # the first step compiles: keep it out of the rate
            jax.block_until_ready(metrics)
            toc = time.perf_counter()
            state["train_seconds"] += toc - window["tic"]
            window.update(tic=toc, first_timed=k + 1)
        done = k + 1
        if done % 50 == 0 or done == cfg["meta_steps"]:
            loss = float(np.mean(window["losses"][-50:]))
            acc = float(np.mean(window["accs"][-50:]))
            eta = float(metrics["step_size"])
            window["info"] = f"loss {loss:.3f}  acc {acc:.3f}  η {eta:.3f}"
        if done % cfg["eval_every"] == 0 or done == cfg["meta_steps"]:
            model = jax.block_until_ready(state["train_state"]).model
            toc = time.perf_counter()
            state["timed_steps"] += done - window["first_timed"]
            state["timed_seconds"] += toc - window["tic"]
            state["train_seconds"] += toc - window["tic"]
            val_acc = float(evaluate(model, val, n_way, T, mesh, cfg["head"], adapt).mean())
            history = state["history"]
            history["step"].append(done)
            history["val_acc"].append(val_acc)
            history["train_loss"].append(float(np.mean(jax.device_get(window["losses"]))))
            history["train_acc"].append(float(np.mean(jax.device_get(window["accs"]))))
            history["step_size"].append(float(model.step_size()))
            history["l2"].append(float(model.l2()))
            window.update(losses=[], accs=[])
            if val_acc > state["best"]["val_acc"]:
                state["best"] = dict(model=model, val_acc=val_acc, step=done)
            window["info"] += f"  val {val_acc:.3f} (best {state['best']['val_acc']:.3f})"
            window.update(tic=time.perf_counter(), first_timed=done)
        return state, window["info"]

    try:
        state = run.loop(
            loop_name or name,
            cfg["meta_steps"],
            fresh,
            step,
            every=cfg["checkpoint_every"],
            prepare=prepare,
        )
    finally:
        if "stream" in window:
            window["stream"].close()
    best, history = state["best"], state["history"]
    seconds, timed_steps, timed_seconds = (
        state["train_seconds"],
        state["timed_steps"],
        state["timed_seconds"],
    )

    test = fixed_episodes(
        test_images,
        n_way,
        k_shot,
        NUM_QUERIES,
        cfg["test_episodes"],
        args.seed + 2,
        cfg["eval_chunk"],
    )
    test_accs = evaluate(best["model"], test, n_way, T, mesh, cfg["head"], adapt)
    result = dict(
        test_acc=100 * float(test_accs.mean()),
        ci95=100 * ci95(test_accs),
        test_episodes=len(test_accs),
        val_acc=100 * best["val_acc"],
        best_step=best["step"],
        final_step_size=float(state["train_state"].model.step_size()),
        best_step_size=float(best["model"].step_size()),
        best_l2=float(best["model"].l2()),
        meta_steps=cfg["meta_steps"],
        train_seconds=seconds,
        meta_steps_per_s=timed_steps / timed_seconds if timed_seconds else float("nan"),
        history=history,
    )
    if runs is not None:
        run_accs = evaluate(
            best["model"], [runs], runs.support.shape[1], T, mesh, cfg["head"], adapt
        )
        result.update(
            lake_runs_acc=100 * float(run_accs.mean()), lake_runs_ci95=100 * ci95(run_accs)
        )
    return result


def plot(results: dict, path):
    plt = _outputs.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in SETTINGS:
        if name not in results:
            continue
        h = results[name]["history"]
        left.plot(h["step"], 100 * np.asarray(h["val_acc"]), marker=".", label=name)
        right.plot(h["step"], h["step_size"], label=name)
    left.set(xlabel="meta-steps", ylabel="meta-validation accuracy (%)", title="Omniglot")
    left.legend()
    right.set(xlabel="meta-steps", ylabel="learned inner step size η", title="Step size")
    right.legend()
    return _outputs.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("hyper_representation", DESCRIPTION, distributed=True)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="(default: all four)")
    p.add_argument(
        "--split",
        choices=["hold-out-runs", "random"],
        default="hold-out-runs",
        help="hold-out-runs: Lake's runs' characters only in meta-test (and the runs as a "
        "second test); random: the plain random split, no runs test",
    )
    for key, value in FULL.items():
        if key == "settings":
            continue
        flag = "--" + key.replace("_", "-")
        p.add_argument(flag, type=type(value), default=None, help=f"(default {value})")
    return p


def load_splits(args):
    """The meta-train, meta-validation and meta-test characters (`args.split`, `args.seed`),
    and Lake's one-shot runs as one batch (`None` with the random split)."""
    data = data_dir(args, "omniglot")
    chars = load_omniglot(data)
    if args.split == "hold-out-runs":
        raw_runs = load_one_shot_runs(data)
        splits = split_holding_out(chars, runs_character_ids(chars, raw_runs), seed=args.seed)
        return splits, runs_batch(raw_runs)
    return split_characters(chars, seed=args.seed), None


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in FULL:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
        setattr(args, key, cfg[key])  # resolved: the run's configuration
    if cfg["head"] not in HEADS:
        raise ValueError(f"`--head` must be one of {HEADS}, got {cfg['head']!r}.")
    if cfg["conv"] not in CONV_LOWERINGS:
        raise ValueError(f"`--conv` must be one of {CONV_LOWERINGS}, got {cfg['conv']!r}.")
    adapt_options(cfg)  # bad options raise here, before the data loads
    # Each setting is trained on its own; the test sets are drawn after training.
    run = _harness.start(
        args, x64=False, may_change=("settings", "checkpoint_every", "test_episodes")
    )
    splits, runs = load_splits(args)
    mesh = make_mesh()
    _console.console.print(
        f"{len(jax.devices())} device(s): {jax.devices()[0].device_kind}; "
        f"classes {[len(s) for s in splits]}"
    )
    results = {}
    for name in cfg["settings"]:
        results[name] = done = run.stage(
            f"{name}_done", lambda: train_setting(name, splits, cfg, args, run, mesh, runs)
        )
        line = f"{name}: test {done['test_acc']:.2f} ± {done['ci95']:.2f}"
        if "lake_runs_acc" in done:
            line += f"  Lake's runs {done['lake_runs_acc']:.2f} ± {done['lake_runs_ci95']:.2f}"
        _console.console.print(line)
    results["config"] = run.config
    results["device"] = dict(
        kind=jax.devices()[0].device_kind,
        platform=jax.devices()[0].platform,
        count=len(jax.devices()),
    )
    return run.finish(results, {"hyper_representation.png": lambda path: plot(results, path)})
