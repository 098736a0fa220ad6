"""The command line: meta-train each setting, select on meta-validation, test."""

import argparse
import time

import jax
import numpy as np

from .. import _common, _distributed
from ..data import load_omniglot, load_one_shot_runs
from ..data.omniglot import split_characters
from ._data import (
    EpisodeStream,
    fixed_episodes,
    runs_batch,
    runs_character_ids,
    split_holding_out,
)
from ._meta_step import (
    Batch,
    episode_accuracies,
    init_state,
    make_mesh,
    make_meta_step,
    make_optimizer,
    replicate,
    shard_batch,
)
from ._model import HyperRepresentation


DESCRIPTION = "Hyper-representation few-shot learning on Omniglot (Franceschi et al. 2018)."
SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
NUM_QUERIES = 15  # per class, in meta-validation and meta-test episodes
# The full protocol (a GPU's worth) and the --quick one (CPU minutes). Every value is a flag.
FULL = dict(
    settings=list(SETTINGS),
    meta_steps=50_000,
    meta_batch=32,
    inner_steps=5,
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


def evaluate(model, batches: list[Batch], n_way: int, num_steps: int, mesh) -> np.ndarray:
    """Query accuracy of every episode of `batches`, each batch sharded over the mesh (padded
    with repeats of its first episode up to a multiple of the device count)."""
    num_devices = mesh.shape["tasks"]
    out = []
    for batch in batches:
        size = len(batch.support)
        pad = -size % num_devices
        if pad:
            batch = Batch(*(np.concatenate([x, np.repeat(x[:1], pad, 0)]) for x in batch))
        acc = episode_accuracies(model, shard_batch(batch, mesh), n_way, num_steps)
        out.append(_distributed.to_host(acc)[:size])  # gathered from every process
    return np.concatenate(out)


def train_setting(name: str, splits, cfg: dict, args, ckpt, mesh, runs) -> dict:
    """Meta-trains one setting with checkpoints; returns its results."""
    n_way, k_shot = SETTINGS[name]
    train_images, val_images, test_images = (s.images for s in splits)
    T = cfg["inner_steps"]
    optimizer = make_optimizer(cfg["lr"], cfg["meta_steps"], warmup=cfg["warmup"])
    step_fn = make_meta_step(optimizer, n_way, T)
    val = fixed_episodes(
        val_images,
        n_way,
        k_shot,
        NUM_QUERIES,
        cfg["val_episodes"],
        args.seed + 1,
        cfg["eval_chunk"],
    )

    key = jax.random.key(args.seed)
    model = HyperRepresentation(
        cfg["width"],
        step_size=cfg["step_size"],
        max_step_size=cfg["max_step_size"],
        key=key,
    )
    fresh = dict(
        step=0,
        train_state=init_state(model, optimizer),
        best=dict(model=model, val_acc=-1.0, step=0),
        history=dict(step=[], val_acc=[], train_loss=[], train_acc=[], step_size=[]),
        rng_state=args.seed,
        seconds=0.0,
        timed_steps=0,
        timed_seconds=0.0,
    )
    saved = ckpt.load(name, fresh)
    state = replicate(saved["train_state"], mesh)
    best, history = saved["best"], saved["history"]
    best = dict(best, model=replicate(best["model"], mesh))  # a resumed run's is on the host
    rng_state, meta_batch = saved["rng_state"], cfg["meta_batch"]
    if meta_batch % jax.process_count():
        raise ValueError(
            f"`--meta-batch` ({meta_batch}) must be a multiple of the number of processes "
            f"({jax.process_count()})."
        )
    if jax.process_count() > 1:
        # Each process samples only its share of every meta-batch, from a seed of its own: the
        # run's seed, its index and the step it starts from (the checkpointed generator state
        # is process 0's).
        seed = [args.seed, jax.process_index(), saved["step"]]
        rng_state = np.random.default_rng(seed).bit_generator.state
        meta_batch //= jax.process_count()
    stream = EpisodeStream(train_images, n_way, k_shot, cfg["train_queries"], meta_batch, rng_state)
    seconds, timed_steps, timed_seconds = (
        saved["seconds"],
        saved["timed_steps"],
        saved["timed_seconds"],
    )
    losses, accs = [], []
    start = saved["step"]
    try:
        with _common.progress(name, cfg["meta_steps"], start) as advance:
            tic = time.perf_counter()
            info = ""
            for k in range(start, cfg["meta_steps"]):
                state, metrics = step_fn(state, _train_batch(next(stream), mesh))
                losses.append(metrics["loss"])
                accs.append(metrics["accuracy"])
                if k == start:  # the first step compiles: keep it out of the rate
                    jax.block_until_ready(metrics)
                    toc = time.perf_counter()
                    seconds += toc - tic
                    tic, first_timed = toc, k + 1
                done = k + 1
                if done % 50 == 0 or done == cfg["meta_steps"]:
                    loss, acc = float(np.mean(losses[-50:])), float(np.mean(accs[-50:]))
                    info = f"loss {loss:.3f}  acc {acc:.3f}  η {float(metrics['step_size']):.3f}"
                if done % cfg["eval_every"] == 0 or done == cfg["meta_steps"]:
                    jax.block_until_ready(state)
                    toc = time.perf_counter()
                    timed_steps += done - first_timed
                    timed_seconds += toc - tic
                    seconds += toc - tic
                    model = state.model
                    val_acc = float(evaluate(model, val, n_way, T, mesh).mean())
                    history["step"].append(done)
                    history["val_acc"].append(val_acc)
                    history["train_loss"].append(float(np.mean(jax.device_get(losses))))
                    history["train_acc"].append(float(np.mean(jax.device_get(accs))))
                    history["step_size"].append(float(model.step_size()))
                    losses, accs = [], []
                    if val_acc > best["val_acc"]:
                        best = dict(model=model, val_acc=val_acc, step=done)
                    info += f"  val {val_acc:.3f} (best {best['val_acc']:.3f})"
                    tic, first_timed = time.perf_counter(), done
                if done % cfg["checkpoint_every"] == 0 or done == cfg["meta_steps"]:
                    jax.block_until_ready(state)
                    ckpt.save(
                        name,
                        dict(
                            step=done,
                            train_state=state,
                            best=best,
                            history=history,
                            rng_state=stream.state(),
                            seconds=seconds,
                            timed_steps=timed_steps,
                            timed_seconds=timed_seconds,
                        ),
                    )
                advance(info)
    finally:
        stream.close()

    test = fixed_episodes(
        test_images,
        n_way,
        k_shot,
        NUM_QUERIES,
        cfg["test_episodes"],
        args.seed + 2,
        cfg["eval_chunk"],
    )
    test_accs = evaluate(best["model"], test, n_way, T, mesh)
    result = dict(
        test_acc=100 * float(test_accs.mean()),
        ci95=100 * ci95(test_accs),
        test_episodes=len(test_accs),
        val_acc=100 * best["val_acc"],
        best_step=best["step"],
        final_step_size=float(state.model.step_size()),
        best_step_size=float(best["model"].step_size()),
        meta_steps=cfg["meta_steps"],
        train_seconds=seconds,
        meta_steps_per_s=timed_steps / timed_seconds if timed_seconds else float("nan"),
        history=history,
    )
    if runs is not None:
        run_accs = evaluate(best["model"], [runs], runs.support.shape[1], T, mesh)
        result.update(
            lake_runs_acc=100 * float(run_accs.mean()), lake_runs_ci95=100 * ci95(run_accs)
        )
    return result


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = _common.parser("hyper_representation", DESCRIPTION, distributed=True)
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


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in FULL:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    out = _common.setup(args, x64=False)
    ckpt = _common.Checkpoints(out, args.resume)
    data = _common.data_dir(args, "omniglot").parent
    chars = load_omniglot(data)
    runs = None
    if args.split == "hold-out-runs":
        raw_runs = load_one_shot_runs(data)
        splits = split_holding_out(chars, runs_character_ids(chars, raw_runs), seed=args.seed)
        runs = runs_batch(raw_runs)
    else:
        splits = split_characters(chars, seed=args.seed)
    mesh = make_mesh()
    _common.console.print(
        f"{len(jax.devices())} device(s): {jax.devices()[0].device_kind}; "
        f"classes {[len(s) for s in splits]}"
    )
    results = {}
    for name in cfg["settings"]:
        done = ckpt.load(f"{name}_done")
        if done is None:
            done = train_setting(name, splits, cfg, args, ckpt, mesh, runs)
            ckpt.save(f"{name}_done", done)
        results[name] = done
        line = f"{name}: test {done['test_acc']:.2f} ± {done['ci95']:.2f}"
        if "lake_runs_acc" in done:
            line += f"  Lake's runs {done['lake_runs_acc']:.2f} ± {done['lake_runs_ci95']:.2f}"
        _common.console.print(line)
    results["config"] = dict(cfg, split=args.split, seed=args.seed, quick=args.quick)
    results["device"] = dict(
        kind=jax.devices()[0].device_kind,
        platform=jax.devices()[0].platform,
        count=len(jax.devices()),
    )
    if _common.is_main_process():
        plot(results, out / "hyper_representation.png")
    path = _common.write_results(out, results)
    _common.console.print(f"Wrote {path} and {out / 'hyper_representation.png'}")
    return results
