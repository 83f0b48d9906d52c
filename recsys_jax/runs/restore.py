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
    if manifest["num_items"] != model.num_items:
      raise ValueError(
          f"{exported_dir}: exported for {manifest['num_items']} items but "
          f"the dataset has {model.num_items}")
    checkpoints.check_architecture(
        manifest.get(checkpoints.ARCHITECTURE_KEY), model.architecture(),
        f"the export in {exported_dir}")
    params = checkpoints.restore_params(
        os.path.join(exported_dir, "params"), abstract)
    return params, int(manifest["step"])
  ckpt = checkpoints.Checkpointer(model_dir, keep=None)
  step = checkpoint_step if checkpoint_step is not None else ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint_<step> in {model_dir}; train "
                            "first or pass --gin.EXPORTED_DIR")
  if step not in ckpt.all_steps():
    raise FileNotFoundError(f"{model_dir}/checkpoint_{step} does not exist; "
                            f"available steps: {sorted(ckpt.all_steps())}")
  checkpoints.check_architecture(
      ckpt.restore_meta(step).get(checkpoints.ARCHITECTURE_KEY),
      model.architecture(), f"{model_dir}/checkpoint_{step}")
  # Only the params of the saved TrainState are read (no optimizer needed).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  target = {"params": abstract}
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(ckpt.directory, f"{checkpoints.STEP_PREFIX}_{step}",
                   "state"),
      args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  ckpt.close()
  return restored["params"], int(step)


def read_export_manifest(exported_dir: str) -> dict:
  path = os.path.join(exported_dir, EXPORT_MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{exported_dir}: not an exported model (no "
                            f"{EXPORT_MANIFEST}); run python -m "
                            "recsys_jax.export first")
  with open(path) as f:
    return json.load(f)
