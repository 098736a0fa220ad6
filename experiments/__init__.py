"""Runnable experiments: `python -m experiments.<name> [--quick]`."""
