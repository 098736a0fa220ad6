r"""The effect of $T$ in meta-learning (Franceschi et al. 2018), at both ends, beside ProtoNet.

One Omniglot setting (5-way 1-shot by default) meta-trained at one budget (`--budget quick`,
the hyper-representation's `--quick`, or `full`) once per variant, same seed, same episodes:

- the hyper-representation with $T \in$ `--ts` gradient steps on the head, differentiated
  through the steps (`head="linear"`);
- its limit $T \to \infty$: the L2-regularised head solved to a tolerance and differentiated by
  the implicit function theorem, the L2 strength learned (`head="implicit"`). Without the L2
  term the limit does not exist: one-shot support sets are separable, so gradient descent on
  the head runs off to infinity;
- ProtoNet (`head="prototypes"`), the same backbone, optimiser and budget.

For each it reports the meta-test accuracy with its 95% interval, the time per meta-step (both
over the whole training and, on one fixed meta-batch, interleaved across variants at
initialisation so that load on the machine falls on all alike) and XLA's compiled scratch
memory for one meta-step, and plots accuracy and time against $T$.

    python -m experiments.hyper_representation.unrolled_vs_implicit [--budget quick|full]
        [--ts 1 3 5] [--heads linear implicit prototypes maml fomaml imaml] [--out DIR] [--seed S]
        [--conv xla|matmul] [--episode-map vmap|map] [--resume | --overwrite]

`--conv` and `--episode-map` apply to the whole-network heads only (on a CPU, `matmul` and
`map` run them 3-6x faster, docs/hyper-representation.md); the heads on fixed features keep the
lowering and the vmap they are fastest with.
"""

import statistics
import time

import jax

from .. import _cli, _console, _harness, _outputs
from ._data import EpisodeStream
from ._meta_step import (
    HEADS,
    init_state,
    make_mesh,
    make_meta_step,
    make_optimizer,
    replicate,
    shard_batch,
    to_batch,
)
from ._model import CONV_LOWERINGS, HyperRepresentation
from ._run import FULL, QUICK, SETTINGS, adapt_options, load_splits, train_setting


DESCRIPTION = "The effect of T in hyper-representation meta-learning, the implicit limit, ProtoNet."
TS = [1, 3, 5, 10, 20]
# The whole-network heads and their labels; not in the default study (each costs several
# times a linear-head run): `--heads maml fomaml imaml` adds them.
WHOLE_NETWORK = {"maml": "MAML", "fomaml": "FOMAML", "imaml": "iMAML"}
DEFAULT_HEADS = ["linear", "implicit", "prototypes"]
TIMING_ROUNDS = 20  # interleaved calls of every variant's compiled meta-step


def variants(ts, heads, whole_network_steps: int = 5) -> list[tuple[str, str, int]]:
    """`(label, head, T)` for every run of the study, in order."""
    out = [(f"T={T}", "linear", T) for T in ts] if "linear" in heads else []
    if "implicit" in heads:
        out.append(("implicit", "implicit", 0))
    if "prototypes" in heads:
        out.append(("ProtoNet", "prototypes", 0))
    # Whole-network adaptation, with the harness's T (the budget's `inner_steps`).
    for head, label in WHOLE_NETWORK.items():
        if head in heads:
            out.append((label, head, whole_network_steps))
    return out


def variant_config(cfg: dict, head: str, T: int) -> dict:
    """The run configuration of one variant: the study's, with the head and its T, and the
    study's `conv` and `episode_map` only for the whole-network heads."""
    out = dict(cfg, head=head, inner_steps=0 if head in ("implicit", "prototypes") else T)
    if head not in WHOLE_NETWORK:
        out.update(conv=FULL["conv"], episode_map=FULL["episode_map"])
    return out


def time_meta_steps(cfg, variant_list, splits, mesh, seed: int) -> dict:
    """Compile time, compiled scratch memory and the median time of one meta-step of every
    variant on the same meta-batch, from the same initial model, the calls interleaved."""
    n_way, k_shot = SETTINGS[cfg["setting"]]
    stream = EpisodeStream(
        splits[0].images, n_way, k_shot, cfg["train_queries"], cfg["meta_batch"], seed
    )
    try:
        batch = shard_batch(to_batch(next(stream)), mesh)
    finally:
        stream.close()
    optimizer = make_optimizer(cfg["lr"], cfg["meta_steps"], warmup=cfg["warmup"])
    # One initial state per lowering of the convolutions (the same parameters).
    states = {
        conv: replicate(
            init_state(
                HyperRepresentation(
                    cfg["width"],
                    step_size=cfg["step_size"],
                    max_step_size=cfg["max_step_size"],
                    l2=cfg["l2"],
                    key=jax.random.key(seed),
                    conv=conv,
                ),
                optimizer,
            ),
            mesh,
        )
        for conv in {variant_config(cfg, head, T)["conv"] for _, head, T in variant_list}
    }
    compiled, state_of, out = {}, {}, {}
    for label, head, T in variant_list:
        tic = time.perf_counter()
        variant_cfg = variant_config(cfg, head, T)
        state_of[label] = state = states[variant_cfg["conv"]]
        step = make_meta_step(optimizer, n_way, T, head, adapt_options(variant_cfg))
        compiled[label] = step.lower(state, batch).compile()
        memory = compiled[label].memory_analysis()
        out[label] = dict(
            compile_seconds=time.perf_counter() - tic,
            temp_bytes=int(memory.temp_size_in_bytes) if memory is not None else -1,
            times=[],
        )
        jax.block_until_ready(compiled[label](state, batch))  # warm-up
    for _ in range(TIMING_ROUNDS):
        for label in compiled:
            tic = time.perf_counter()
            jax.block_until_ready(compiled[label](state_of[label], batch))
            out[label]["times"].append(time.perf_counter() - tic)
    for timing in out.values():
        timing["ms_per_step"] = 1e3 * statistics.median(timing.pop("times"))
    return out


def print_table(results: dict, variant_list) -> None:
    rows = []
    for label, _, _ in variant_list:
        r, t = results[label], results["timing"][label]
        rows.append(
            [
                label,
                f"{r['test_acc']:.2f} ± {r['ci95']:.2f}",
                f"{r.get('lake_runs_acc', float('nan')):.2f}",
                f"{1e3 / r['meta_steps_per_s']:.0f}",
                f"{t['ms_per_step']:.1f}",
                f"{t['temp_bytes'] / 2**20:.1f}",
                f"{t['compile_seconds']:.1f}",
            ]
        )
    _console.print_table(
        f"Effect of T, {results['config']['setting']}, budget {results['config']['budget']}",
        [
            "variant",
            "meta-test acc (%)",
            "Lake's runs",
            "ms/step (training)",
            "ms/step (interleaved)",
            "scratch MiB",
            "compile s",
        ],
        rows,
    )


def plot(results: dict, variant_list, path):
    plt = _outputs.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    unrolled = [(T, label) for label, head, T in variant_list if head == "linear"]
    ts = [T for T, _ in unrolled]
    for ax, value, error in (
        (left, lambda lab: results[lab]["test_acc"], lambda lab: results[lab]["ci95"]),
        (right, lambda lab: results["timing"][lab]["ms_per_step"], lambda lab: 0.0),
    ):
        if unrolled:
            ax.errorbar(
                ts,
                [value(lab) for _, lab in unrolled],
                yerr=[error(lab) for _, lab in unrolled],
                marker="o",
                capsize=3,
                label="unrolled, T steps",
            )
        for label, colour in (("implicit", "C1"), ("ProtoNet", "C2")):
            if label in results:
                ax.axhline(value(label), color=colour, linestyle="--", label=label)
                if error(label):
                    lo, hi = value(label) - error(label), value(label) + error(label)
                    ax.axhspan(lo, hi, color=colour, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xticks(ts or [1], [str(T) for T in ts] or ["1"])
        ax.legend()
    setting = results["config"]["setting"]
    left.set(xlabel="inner steps T", ylabel="meta-test accuracy (%)", title=f"Omniglot {setting}")
    right.set(xlabel="inner steps T", ylabel="ms per meta-step", title="Cost of a meta-step")
    return _outputs.save_figure(fig, path)


def build_parser():
    p = _cli.parser("hyper_representation.unrolled_vs_implicit", DESCRIPTION)
    p.add_argument("--budget", choices=["quick", "full"], default="quick")
    p.add_argument("--setting", choices=list(SETTINGS), default="5w1s")
    p.add_argument("--ts", type=int, nargs="+", default=TS, help=f"(default {TS})")
    p.add_argument("--heads", nargs="+", choices=list(HEADS), default=DEFAULT_HEADS)
    p.add_argument("--split", choices=["hold-out-runs", "random"], default="hold-out-runs")
    # Smaller runs than the budget's (the tests'): every variant gets the same.
    for key in ("meta_steps", "eval_every", "val_episodes", "test_episodes"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    whole_network = "(the whole-network heads only; default %(default)s)"
    p.add_argument("--conv", choices=list(CONV_LOWERINGS), default="xla", help=whole_network)
    p.add_argument("--episode-map", choices=["vmap", "map"], default="vmap", help=whole_network)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:  # the common flag: the quick budget
        args.budget = "quick"
    if any(T < 1 for T in args.ts):
        raise ValueError(f"`--ts` must be positive integers; got {args.ts}.")
    cfg = dict(
        QUICK if args.budget == "quick" else FULL,
        setting=args.setting,
        conv=args.conv,
        episode_map=args.episode_map,
    )
    for key in ("meta_steps", "eval_every", "val_episodes", "test_episodes"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
        setattr(args, key, cfg[key])
    cfg["checkpoint_every"] = min(cfg["checkpoint_every"], cfg["meta_steps"])
    args.ts = sorted(set(args.ts))
    variant_list = variants(args.ts, args.heads, cfg["inner_steps"])
    run = _harness.start(args, x64=False)
    splits, runs = load_splits(args)
    mesh = make_mesh()
    results: dict = {}
    for label, head, T in variant_list:
        variant_cfg = variant_config(cfg, head, T)
        results[label] = done = run.stage(
            f"{label}_done",
            lambda: train_setting(
                args.setting, splits, variant_cfg, args, run, mesh, runs, loop_name=label
            ),
        )
        _console.console.print(f"{label}: test {done['test_acc']:.2f} ± {done['ci95']:.2f}")
    results["timing"] = run.stage(
        "timing", lambda: time_meta_steps(cfg, variant_list, splits, mesh, args.seed)
    )
    results["config"] = run.config
    results["device"] = dict(kind=jax.devices()[0].device_kind, count=len(jax.devices()))
    print_table(results, variant_list)
    return run.finish(results, {"effect_of_t.png": lambda path: plot(results, variant_list, path)})


if __name__ == "__main__":
    _cli.cli(main)
