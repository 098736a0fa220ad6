"""A run's life: its output directory, its configuration, the data it reads, its resumable
loops and stages, and its results.

An experiment builds its parser with `experiments._cli.parser`, resolves its defaults into the
parsed arguments, then calls `start`, which returns a `Run`. Its work goes through `Run.loop` (a
resumable loop, checkpointed as it goes) and `Run.stage` (a result computed once and kept), and
its results and figures through `Run.finish`; `experiments._cli.cli` runs its `main`. A run
directory holds:

- `run.json`: the experiment, its run id (made at its first start), its configuration (every
    option that shapes the results, with the defaults resolved), the data files it read (each
    path in the data directory with its SHA-256), the versions, git commit and devices;
    written when the run starts, and as it reads data.
- `run.lock`: the file a live run holds a lock on (see `experiments/_claim.py`).
- `checkpoints/<name>/<n>/`: the state of each loop and stage, with the run id, as an
    orbax-checkpoint save (the last complete save is kept; see `experiments/_checkpoint.py`).
- `results.json` and the figures, when the run ends. `results.json` repeats the run id,
    configuration, data files and environment under `"run"`, with `"progress"`: for each
    loop, the step this invocation started from and the step it ended at.

The rules:

- Without `--out`, each run gets a new directory, `runs/<name>-<date>-<time>`, so running the
    same command twice never collides (`--resume` without `--out` picks the latest of them).
- One live run per directory: a run claims its directory before it looks at it, by an
    exclusive `flock` on `run.lock` held until its process ends. Of two runs started into one
    directory at the same instant, exactly one proceeds; the other gets a `RunError` saying
    that another run holds it, with `--resume` and `--overwrite` too. The operating system
    releases the lock when the process ends, crash or `kill -9` included, so a `--resume` of a
    run that died is never blocked. (With `--distributed`, process 0 claims it for all.)
- A directory that already holds a run (`run.json`, `results.json` or `checkpoints/`) is
    refused unless `--resume` (continue it) or `--overwrite` (delete its outputs first).
- `--resume` compares the configuration with the saved one and refuses any difference, naming
    each option and both values, except for the experiment's allow-list (`may_grow`: numbers
    that may only increase, such as more steps; `may_change`: options that do not change what
    has been computed, such as how often to checkpoint).
- A run is computed from one set of data: each data file that `experiments.data` hands out
    from the run's data directory is recorded with its SHA-256 (`record_data`, no code in the
    experiment), and a file whose SHA-256 differs from the one the run read before (a
    `--resume` with another `--data-dir`) is refused with a `RunError` naming the file and
    both digests. The same files in another directory are the same data. Data that is not
    read through `experiments.data` (scikit-learn's bundled sets) is not recorded.
- A checkpoint belongs to its run: each carries the run id of `run.json`, and one with
    another run's id (copied from another run's directory, such as another seed's) is refused
    with a `CheckpointError` naming it. The id is made at the first start and kept by
    `--resume`, allowed changes included, so a run continued for more steps keeps loading its
    own checkpoints. (A run from before run ids gets one on its next `--resume`, and its
    earlier checkpoints, which carry none, are still loaded.)
- Checkpoints hold data only: arrays written by orbax-checkpoint (TensorStore) and the
    structure as JSON, never pickles, so opening a run directory someone shared runs no code.
    Every file and every save is written atomically.

Every written file gets the usual mode (0644 under the usual umask).
"""

import argparse
import datetime
import json
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from . import _claim, _distributed
from ._checkpoint import CHECKPOINTS, CheckpointError, Checkpoints
from ._console import console, progress
from ._distributed import is_main_process
from ._environment import environment
from ._outputs import to_json, write_json
from .data._files import data_root, record_reads


RUNS = pathlib.Path("runs")  # where default output directories go, relative to the working dir
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
# Options of the harness itself: where things go and how the processes meet, not what is computed.
HARNESS_OPTIONS = frozenset(
    {
        "out",
        "resume",
        "overwrite",
        "data_dir",
        "name",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)


class RunError(RuntimeError):
    """A run that cannot start or go on as asked: an output directory that holds another run
    (finished, or live in another process), or a `--resume` whose options or data differ from
    the saved run's. The message says what to do."""


def _normalise(config: Mapping) -> dict:
    """The configuration as JSON would give it back (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(dict(config), default=to_json))


def _holds_run(out: pathlib.Path) -> list[str]:
    return [n for n in (RUN_FILE, RESULTS_FILE, CHECKPOINTS) if (out / n).exists()]


def _claim_directory(out: pathlib.Path) -> None:
    """Claims `out` for this process until it ends (see `experiments/_claim.py`). Called before
    anything in `out` is looked at: of two runs started into one directory at the same instant,
    the second to claim it is refused, so that `run.json` and `results.json` describe one run.
    A run that died holds nothing, so `--resume` after a crash is never blocked."""
    try:
        _claim.claim(out)
    except _claim.DirectoryHeld as error:
        raise RunError(str(error)) from None


def _read_manifest(out: pathlib.Path) -> dict:
    """`run.json`, or `{}` if it is missing or unreadable."""
    try:
        manifest = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _update_manifest(out: pathlib.Path, **fields) -> None:
    """Sets `fields` in `run.json` (process 0 only), keeping the rest."""
    if is_main_process():
        write_json(out / RUN_FILE, {**_read_manifest(out), **fields})


def _default_out(name: str, resume: bool) -> pathlib.Path:
    """With `resume`, the latest `runs/<name>-*` that holds a run; else a new directory
    `runs/<name>-<date>-<time>[-<n>]`, created here so that two runs never share it."""
    if resume:
        runs = sorted(RUNS.glob(f"{name}-*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime_ns)
        if not runs:
            raise RunError(
                f"--resume without --out continues the latest {RUNS}/{name}-*, and there is "
                "none: pass the run's directory with --out."
            )
        return runs[-1].parent
    stamp = RUNS / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        out = stamp.with_name(stamp.name + (f"-{n}" if n > 1 else ""))
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            continue
    raise RunError(f"Cannot create a new directory {stamp}-<n>: pass --out.")


def _differences(saved: dict, now: dict, may_grow: Iterable[str], may_change: Iterable[str]):
    missing = object()
    differ = []
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key, missing), now.get(key, missing)
        if old == new or key in may_change:
            continue
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new))
        if key in may_grow and numbers and new >= old:  # type: ignore[operator]
            continue
        show = lambda v: "(not set)" if v is missing else json.dumps(v)
        differ.append(f"  --{key.replace('_', '-')}: {show(old)} in the saved run, {show(new)} now")
    return differ


def claim_outputs(args: argparse.Namespace, files: Iterable[str]) -> pathlib.Path:
    """For a run without checkpoints (a benchmark): the output directory, claimed for this
    process (see `start`), refusing to replace any of `files` in it unless `--overwrite`.

    **Raises:**

    `RunError` naming the files that exist, or saying that another live run holds the
    directory.
    """
    if args.out is None:
        args.out = _default_out(args.name, resume=False)
    out = pathlib.Path(args.out)
    _claim_directory(out)
    existing = [f for f in files if (out / f).exists()]
    if existing and not args.overwrite:
        raise RunError(
            f"{out} already holds {', '.join(existing)}: pass --overwrite to replace them, or "
            "another --out."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def start(
    args: argparse.Namespace,
    *,
    may_grow: Iterable[str] = (),
    may_change: Iterable[str] = (),
    x64: bool = True,
) -> "Run":
    """Starts (or resumes) a run; call it once, before building arrays and before reading data,
    with the experiment's defaults resolved into `args` (e.g. `args.steps = args.steps or 100`).

    The configuration is every option in `args` but the harness's own (`--out`, `--resume`,
    `--overwrite`, `--data-dir` and the distributed ones). The output directory is claimed
    for this process first (another live run there is refused, `--resume` and `--overwrite`
    included). With `--distributed` it joins the other processes (`jax.distributed.initialize`)
    and silences the console on every process but process 0, which alone claims the directory
    and writes files. It sets JAX's precision to `x64`. The data files read from here on (by
    `experiments.data`) are recorded in `run.json` and checked on `--resume` (see
    `Run.record_data`).

    **Arguments:**

    - `args`: the parsed command line.
    - `may_grow`: options that `--resume` lets increase (e.g. `"steps"`: a finished run
        continued for more steps is the run that would have had them from the start).
    - `may_change`: options that `--resume` lets change freely (they do not change what has
        been computed, e.g. `"checkpoint_every"`).

    **Raises:**

    `RunError` if another live run holds `--out`, if `--out` holds a run and neither `--resume`
    nor `--overwrite` is given, or if `--resume` finds options that differ from the saved
    run's.
    """
    resume = bool(getattr(args, "resume", False))
    distributed = bool(getattr(args, "distributed", False))
    if args.out is None:
        if distributed:
            raise RunError("--distributed needs --out: every process must write to one place.")
        args.out = _default_out(args.name, resume)
    out = pathlib.Path(args.out)
    config = _normalise({k: v for k, v in vars(args).items() if k not in HARNESS_OPTIONS})
    if not distributed:
        _claim_directory(out)
    found = _holds_run(out)
    if found and not (resume or args.overwrite):
        raise RunError(
            f"{out} already holds a run ({', '.join(found)}). Pass --resume to continue it, "
            "--overwrite to replace it, or another --out."
        )
    resumed = bool(found) and resume
    manifest = _resumable_manifest(out, config, may_grow, may_change) if resumed else {}
    # Every process has checked the directory before any of them writes to it.
    if _distributed.initialize_from_args(args) and not is_main_process():
        console.quiet = True
    if distributed and is_main_process():
        _claim_directory(out)
        if _holds_run(out) != found:
            raise RunError(f"{out} changed while this run started: another run started there.")
    # Hypergradients are compared with closed forms to ~1e-8, which float32 cannot resolve.
    jax.config.update("jax_enable_x64", x64)
    run = _new_run(args, out, config, manifest, resumed=resumed)
    if is_main_process():
        if found and args.overwrite:
            run.clear()
        out.mkdir(parents=True, exist_ok=True)
        _save_manifest(run, manifest)
    if resume and not found:
        console.print(f"Nothing to resume in {out}: starting afresh.")
    elif resumed:
        console.print(f"Resuming {out}.")
    global _current_run
    _current_run = run
    record_reads(record_data)
    return run


def _resumable_manifest(
    out: pathlib.Path, config: dict, may_grow: Iterable[str], may_change: Iterable[str]
) -> dict:
    """The saved `run.json` of the run that `--resume` continues, once its configuration is
    found to be `config` up to the allowed changes.

    **Raises:**

    `RunError` if `run.json` cannot be read, or naming each option that differs."""
    try:
        manifest = json.loads((out / RUN_FILE).read_text())
        saved = manifest["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunError(
            f"{out / RUN_FILE} is missing or unreadable ({error}), so the run's options "
            "cannot be checked: start afresh with --overwrite, or use another --out."
        ) from error
    differ = _differences(saved, config, may_grow, may_change)
    if differ:
        raise RunError(
            f"Cannot resume {out}: these options differ from the saved run's:\n"
            + "\n".join(differ)
            + "\nResume with the saved options, or start a new run (another --out, or "
            "--overwrite)."
        )
    return manifest


def _new_run(
    args: argparse.Namespace, out: pathlib.Path, config: dict, manifest: dict, *, resumed: bool
) -> "Run":
    """The `Run`, with its identity: the id that its first start wrote in `run.json` (a new one
    for a new run, or for a run from before run ids, whose checkpoints carry none) and the data
    it has read, from its data directory. Not the configuration's hash: an allowed change on
    `--resume` (more steps) keeps the run, and its checkpoints, its own."""
    run_id = manifest.get("run_id")
    unmarked = resumed and (run_id is None or bool(manifest.get("unmarked_checkpoints")))
    if run_id is None and is_main_process():
        run_id = uuid.uuid4().hex
    # Other processes of a new distributed run do not know process 0's new id: they check
    # nothing (they only read what process 0 wrote, which process 0 has checked).
    data = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    root = data_root(getattr(args, "data_dir", None))[0].resolve()
    return Run(
        args.name,
        out,
        config,
        resumed=resumed,
        run_id=run_id,
        unmarked=unmarked,
        data=data,
        data_root=root,
    )


def _save_manifest(run: "Run", manifest: dict) -> None:
    """Writes `run.json`: afresh for a new run; for a resumed one, only what changed (an
    allowed change of options, or a run id for a run from before run ids)."""
    if not run.resumed:
        manifest = dict(
            experiment=run.name,
            run_id=run.run_id,
            started=_now(),
            config=run.config,
            data={},
            environment=environment(),
        )
        write_json(run.out / RUN_FILE, manifest)
        return
    changed = False
    if manifest["config"] != run.config:
        # An allowed change: the run is now the one with these options, and later resumes
        # compare with them (more steps, then fewer, is refused).
        change = dict(at=_now(), config=manifest["config"])
        manifest.setdefault("earlier_configs", []).append(change)
        manifest["config"] = run.config
        changed = True
    if manifest.get("run_id") != run.run_id:  # started before run ids: its checkpoints have none
        manifest.update(run_id=run.run_id, unmarked_checkpoints=True)
        changed = True
    if changed:
        write_json(run.out / RUN_FILE, manifest)


# The run that the data files read in this process belong to: the latest started, until it
# writes its results.
_current_run: "Run | None" = None


def record_data(root: pathlib.Path, name: str, digest: str) -> None:
    """Told by `experiments.data` of each data file it hands out (after its checksum check; see
    `experiments.data._files.record_reads`, which `start` sets): the data directory, the file's
    path in it and its SHA-256. The current run records it (see
    `Run.record_data`) if `root` is the run's data directory, so every experiment that reads
    data gets its data's identity saved and checked on `--resume` without code of its own.
    Files read outside a run, or from another directory (a test's, or a notebook's, in a
    process where a run was started and not finished), are recorded nowhere."""
    run = _current_run
    if run is not None and run.data_root == pathlib.Path(root).resolve():
        run.record_data(name, digest)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Run:
    """A started run (see `start`): its output directory, configuration and checkpoints.

    **Attributes:**

    - `out`: the output directory.
    - `config`: the configuration, as saved in `run.json`.
    - `resumed`: whether it continues an earlier run.
    - `run_id`: the id its first start wrote in `run.json`, stored in each of its checkpoints
        (`None` where unknown: other processes than 0 of a new distributed run).
    - `data`: the data files it has read, each path in the data directory with its SHA-256.
    - `data_root`: its data directory, resolved (`--data-dir`, else `$BILEVAX_DATA`, else
        `../shared/data`): only files read from there are its data.
    - `checkpoints`: its `Checkpoints`, which refuse another run's.
    - `progress`: for each loop and stage, where this invocation started it and where it
        ended (`{"from": k0, "to": k1}`, in steps; a stage has one): `to - from` is the work
        this invocation did, 0 for everything a resumed finished run reads back.
    """

    def __init__(
        self,
        name: str,
        out: pathlib.Path,
        config: dict,
        *,
        resumed: bool = False,
        run_id: str | None = None,
        unmarked: bool = True,
        data: Mapping[str, str] | None = None,
        data_root: pathlib.Path | None = None,
    ):
        self.name = name
        self.out = pathlib.Path(out)
        self.config = config
        self.resumed = resumed
        self.run_id = run_id
        self.data = dict(data or {})
        self.data_root = data_root
        self.checkpoints = Checkpoints(self.out, run_id, unmarked=unmarked)
        self.progress: dict[str, dict[str, int]] = {}
        self.outputs: list[str] = []

    def record_data(self, name: str, digest: str) -> None:
        """Records that the run read data file `name` (its path in the data directory) with
        SHA-256 `digest`, in `run.json` and later `results.json`.

        **Raises:**

        `RunError`, naming the file and both digests, if the run read it with another digest
        before: a `--resume` with another data directory (valid checksums, other data) would
        otherwise continue checkpoints computed from the old data on the new, giving results
        of neither."""
        known = self.data.get(name)
        if known == digest:
            return
        if known is not None:
            raise RunError(
                f"Cannot continue {self.out} on other data: the data file {name} has SHA-256 "
                f"{digest} now, but the run was computed with SHA-256 {known} (recorded in "
                f"{self.out / RUN_FILE}). Resume with the run's data directory (--data-dir or "
                "$BILEVAX_DATA as when it started), or start a new run (another --out, or "
                "--overwrite)."
            )
        self.data[name] = digest
        _update_manifest(self.out, data=self.data)

    def clear(self) -> None:
        """Deletes what a run left in `out`: checkpoints, `run.json`, `results.json` and the
        outputs `run.json` lists."""
        try:
            listed = json.loads((self.out / RUN_FILE).read_text()).get("outputs", [])
        except (OSError, ValueError, AttributeError):
            listed = []
        for name in [*listed, RUN_FILE, RESULTS_FILE]:
            if "/" not in name and name not in ("", ".", ".."):
                (self.out / name).unlink(missing_ok=True)
        shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)

    def loop(
        self,
        name: str,
        total: int,
        fresh: Callable[[], dict],
        step: Callable[[int, dict], tuple[dict, str]],
        *,
        description: str | None = None,
        every: int = 1,
        prepare: Callable[[dict], dict] | None = None,
        until: Callable[[dict], bool] | None = None,
    ) -> dict:
        """Runs `state, info = step(k, state)` for `k` from the checkpoint's step (0 when
        there is none) to `total`, saving the state under `name` every `every` steps and after
        the last, with a progress bar showing `info`.

        **Arguments:**

        - `name`: the checkpoint's name.
        - `total`: the number of steps.
        - `fresh`: the state at step 0, a dict (called on resume too: the template that the
            checkpoint's Equinox modules and optax states are rebuilt from).
        - `step`: one step; it may change `state` in place and must return it.
        - `description`: the progress bar's label (default `name`).
        - `every`: steps between checkpoints.
        - `prepare`: applied to the state before the first step (e.g. to put it on devices).
        - `until`: stop before `total` once `until(state)` holds (tested before every step,
            so a resumed loop that had stopped takes no step; e.g. a budget of wall-clock
            seconds, `lambda s: s["seconds"] >= budget`).

        **Returns:**

        The final state, with `"step"` (the steps done) and `"seconds"` (the time spent in
        `step`, over all invocations) added.
        """
        template = fresh()
        state = self.checkpoints.load(name, like=template)
        if state is None:
            state = dict(template, step=0, seconds=0.0)
        begin = int(state["step"])
        if begin > total:
            raise CheckpointError(
                f"{self.checkpoints.path(name)}: at step {begin}, beyond this run's {total}."
            )
        if prepare is not None:
            state = prepare(state)
        with progress(description or name, total, begin) as advance:
            for k in range(begin, total):
                if until is not None and until(state):
                    break
                tic = time.perf_counter()
                state, info = step(k, state)
                state["seconds"] += time.perf_counter() - tic
                state["step"] = k + 1
                stopping = k + 1 == total or (until is not None and until(state))
                if (k + 1) % every == 0 or stopping:
                    self.checkpoints.save(name, state)
                advance(info)
        self.progress[name] = {"from": begin, "to": int(state["step"])}
        return state

    def stage(self, name: str, compute: Callable[[], Any], like: Any = None) -> Any:
        """`compute()`, saved under `name`; a resumed run reads it back instead."""
        saved = self.checkpoints.load(name, like)
        self.progress[name] = {"from": int(saved is not None), "to": 1}
        if saved is not None:
            return saved
        result = compute()
        self.checkpoints.save(name, result)
        return result

    def path(self, filename: str) -> pathlib.Path:
        """`out / filename`, recorded as one of the run's outputs (so `--overwrite` deletes
        it)."""
        if filename not in self.outputs:
            self.outputs.append(filename)
        return self.out / filename

    def finish(self, results: dict, figures: Mapping[str, Callable] | None = None) -> dict:
        """Draws each figure (`figures[filename](path)`, on process 0 only), writes
        `results.json` (`write_results`), says where, and returns `results`."""
        written = []
        if is_main_process():
            for filename, draw in (figures or {}).items():
                draw(self.path(filename))
                written.append(self.out / filename)
        written.insert(0, self.write_results(results))
        console.print("Wrote " + ", ".join(map(str, written)))
        return results

    def write_results(self, results: dict) -> pathlib.Path:
        """Adds to `results` a `"run"` entry that makes it self-describing (the experiment, its
        run id, configuration and data files, when it started and finished, whether it was
        resumed, `progress`, and the versions and devices), and writes it to
        `<out>/results.json` (process 0 only).

        **Returns:**

        The path written.
        """
        manifest = _read_manifest(self.out)
        manifest.update(
            outputs=list(dict.fromkeys([*manifest.get("outputs", []), *self.outputs])),
            finished=_now(),
        )
        results["run"] = dict(
            experiment=self.name,
            run_id=self.run_id,
            config=self.config,
            data=self.data,
            started=manifest.get("started"),
            finished=manifest["finished"],
            resumed=self.resumed,
            progress=self.progress,
            environment=environment(),
        )
        write_json(self.out / RUN_FILE, manifest)
        global _current_run
        if _current_run is self:  # the run is over: data read from here on is not its
            _current_run = None
        return write_json(self.out / RESULTS_FILE, results)
