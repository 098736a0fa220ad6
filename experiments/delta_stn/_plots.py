"""Hyperparameter trajectories and validation loss against epochs, for every method."""

import numpy as np

from .. import _outputs


def plot(results: dict, path, methods: dict):
    plt = _outputs.pyplot()
    names = results["config"]["hparam_names"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for m, label in methods.items():
        if m not in results:
            continue
        run = results[m]["seeds"][0]  # trajectories of the first seed
        c = colours[m]
        if "hparams_curve" in run:
            curve = np.asarray(run["hparams_curve"])
            for i in range(curve.shape[1]):
                left.plot(
                    run["epochs"],
                    curve[:, i],
                    color=c,
                    lw=1.2,
                    alpha=0.8,
                    label=label if i == 0 else None,
                )
            right.plot(run["epochs"], run["val_curve"], color=c, label=label)
        else:
            trial_h = np.asarray([t["hparams"] for t in run["trials"]])
            for i in range(trial_h.shape[1]):
                left.scatter(
                    run["epochs"],
                    trial_h[:, i],
                    color=c,
                    s=8,
                    alpha=0.6,
                    label=label if i == 0 else None,
                )
            right.step(
                run["epochs"],
                run["best_so_far"],
                where="post",
                color=c,
                label=f"{label} (best trial so far)",
            )
    if "closed_form" in results:
        ref = results["closed_form"]
        for i, v in enumerate(np.atleast_1d(ref["seeds"][0]["hparams"])):
            left.axhline(
                v, color="k", ls=":", lw=1, label="closed-form optimum" if i == 0 else None
            )
        right.axhline(
            ref["seeds"][0]["val_loss"], color="k", ls=":", lw=1, label="closed-form optimum"
        )
    left.set(
        xlabel="epoch",
        ylabel="hyperparameter value",
        title=f"{results['config']['task']}: {', '.join(names[:4])}"
        + (" ..." if len(names) > 4 else ""),
    )
    right.set(
        xlabel="epoch (RS/TPE: cumulative over trials)",
        ylabel="validation loss (eval mode)",
        title="Validation loss against epochs",
    )
    curves = [
        np.asarray(run.get("val_curve", run.get("best_so_far")), dtype=float)
        for run in (results[m]["seeds"][0] for m in methods if m in results)
    ]
    finite = np.concatenate([c[np.isfinite(c)] for c in curves])
    if finite.size:
        # Log scale from the best value to a few times the typical one: early epochs and
        # diverged runs go off the top.
        right.set_yscale("log")
        right.set_ylim(0.9 * finite.min(), 3 * np.median(finite))
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return _outputs.save_figure(fig, path, dpi=110)
