"""The evaluation report (`python -m recsys_jax.report`): reading a run
directory's outputs, plotting them and writing one self-contained HTML page."""
