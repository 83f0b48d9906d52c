"""Hyper-parameter sweeps: a grid of gin bindings, one run per point, a table.

`grid` parses `--grid` into named points, `gin_check` checks every point's
train configuration before anything runs, `runner` runs points as local
subprocesses (pinned, N at a time, stopped cleanly by signals), `run_dir`
reads what a run wrote and whether it finished, `collect` makes the table,
and `driver` ties them together for `python -m recsys_jax.sweep`.
"""
