"""Self-tuning networks (Bae & Grosse 2020): Δ-STN, centred STN and STN against random search
and TPE. Run as `python -m experiments.delta_stn TASK`; see `__main__.py` and
`docs/delta-stn.md`.

Modules: `_tasks` (data, models and losses of each task, and the closed forms on diabetes),
`_loop` (the alternating self-tuning loop and plain training), `_baselines` (random search and
TPE), `_plots`.
"""
