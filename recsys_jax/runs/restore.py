"""Reading a run's parameters back: a training checkpoint or an export."""

import json
import os
import jax

from recsys_jax.core import checkpoints
from recsys_jax.core import partitioning

EXPORT_SUBDIR = "export"
EXPORT_MANIFEST = "export.json"


def restore_params(model, model_dir, mesh, rules, checkpoint_step=None,
                    exported_dir=None):
  """Params of a training checkpoint (any step) or of an export."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with partitioning.with_rules(rules):
    abstract_boxed = jax.eval_shape(
        lambda r: model.get_initial_variables(r, 2)["params"],
        jax.random.PRNGKey(0))
  shardings = partitioning.abstract_shardings(abstract_boxed, mesh, rules)
  abstract = checkpoints.abstract_with_shardings(nn.meta.unbox(abstract_boxed),
                                                 shardings)
  if exported_dir:
    manifest = read_export_manifest(exported_dir)
    check_meta(manifest, model, f"the export in {exported_dir}")
    params = checkpoints.restore_params(
        os.path.join(exported_dir, "params"), abstract)
    return params, int(manifest["step"])
  ckpt = checkpoints.Checkpointer(model_dir, keep=None)
  try:
    step = (checkpoint_step if checkpoint_step is not None
            else ckpt.latest_step())
    if step is None:
      raise FileNotFoundError(f"no checkpoint_<step> in {model_dir}; train "
                              "first or pass --gin.EXPORTED_DIR")
    if step not in ckpt.all_steps():
      raise FileNotFoundError(
          f"{model_dir}/checkpoint_{step} does not exist; available steps: "
          f"{sorted(ckpt.all_steps())}")
    check_meta(ckpt.restore_meta(step), model, f"{model_dir}/checkpoint_{step}")
    # Only the params of the saved TrainState are read (no optimizer needed);
    # an unreadable file raises CheckpointReadError naming it (no fallback
    # to another step: evaluating other parameters than asked for would
    # mislead).
    return ckpt.restore_params(step, abstract), int(step)
  finally:
    ckpt.close()


def check_meta(saved: dict, model, where: str) -> None:
  """ValueError unless parameters saved with `saved` metadata (a checkpoint's
  or an export's) fit `model`: its architecture record and the values it
  writes into checkpoint metadata (`model.checkpoint_meta()`, e.g. the
  catalogue size) must agree where both have them."""
  for key, want in model.checkpoint_meta().items():
    if key in saved and saved[key] != want:
      raise ValueError(f"{where} was saved with {key}={saved[key]!r} but the "
                       f"configured model has {key}={want!r}")
  checkpoints.check_architecture(saved.get(checkpoints.ARCHITECTURE_KEY),
                                 model.architecture(), where)


def read_export_manifest(exported_dir: str) -> dict:
  path = os.path.join(exported_dir, EXPORT_MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{exported_dir}: not an exported model (no "
                            f"{EXPORT_MANIFEST}); run python -m "
                            "recsys_jax.export first")
  with open(path) as f:
    return json.load(f)
