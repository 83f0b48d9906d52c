r"""`python -m recsys_jax.predict --gin_file=... --gin.MODEL_DIR="'runs/x'"`.

Writes what a trained model predicts, per user, as JSONL under
MODEL_DIR/predict/ (ranking models: top-k items with titles). Defaults come
from gin/runs/predict.gin (parsed first); the user's gin files and
`--gin.NAME=VALUE` overrides follow. See README.md and docs/.
"""

from recsys_jax.cli import entry
from recsys_jax import runs

if __name__ == "__main__":
  entry.run_configured("runs/predict.gin", runs.predict)
