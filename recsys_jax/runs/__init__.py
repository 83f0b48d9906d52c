"""The runs (train, evaluate, export, predict, recommend) as plain functions.

gin configures them from the entry points (`python -m recsys_jax.train` ...);
tests call them directly with Python objects.
"""

from recsys_jax.runs.evaluate_run import evaluate
from recsys_jax.runs.export_run import export
from recsys_jax.runs.predict_run import predict
from recsys_jax.runs.recommend_run import recommend
from recsys_jax.runs.restore import EXPORT_MANIFEST
from recsys_jax.runs.restore import EXPORT_SUBDIR
from recsys_jax.runs.restore import read_export_manifest
from recsys_jax.runs.train_run import train
