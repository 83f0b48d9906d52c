"""The export run: params-only checkpoint, item embeddings and a manifest."""

import json
import logging
import os
from typing import Optional

import jax
import numpy as np

from recsys_jax.core import checkpoints
from recsys_jax.core import partitioning
from recsys_jax.runs import restore


def export(*, model_dir: str, model, mesh_config: partitioning.MeshConfig,
           checkpoint_step: Optional[int] = None,
           output_dir: Optional[str] = None) -> str:
  """Writes a params-only checkpoint, the run's config and a manifest (and,
  for models with an item table, item_embeddings.npy / item_bias.npy)."""
  mesh = mesh_config.make_mesh()
  rules = mesh_config.logical_rules()
  params, step = restore.restore_params(model, model_dir, mesh, rules,
                                 checkpoint_step)
  output_dir = output_dir or os.path.join(model_dir, restore.EXPORT_SUBDIR)
  checkpoints.save_params(os.path.join(output_dir, "params"), params)
  if jax.process_index() == 0:
    manifest = {"step": step, **model.checkpoint_meta(),
                checkpoints.ARCHITECTURE_KEY: model.architecture(),
                "source_model_dir": os.path.abspath(model_dir)}
    what = "params"
    if callable(getattr(model, "item_embeddings", None)):
      # Ranking models: the item table that serving and other runs read
      # (ILM / REGEN take it as collaborative embeddings).
      emb = np.asarray(jax.device_get(model.item_embeddings(params)))
      bias = np.asarray(jax.device_get(model.item_bias(params)))
      np.save(os.path.join(output_dir, "item_embeddings.npy"), emb)
      np.save(os.path.join(output_dir, "item_bias.npy"), bias)
      manifest["embedding_shape"] = list(emb.shape)
      what = f"item embeddings {emb.shape}"
    config_src = os.path.join(model_dir, "config.gin")
    if os.path.exists(config_src):
      with open(config_src) as f, open(
          os.path.join(output_dir, "config.gin"), "w") as g:
        g.write(f.read())
    with open(os.path.join(output_dir, restore.EXPORT_MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
    print(f"Exported step {step} to {output_dir} ({what})", flush=True)
  logging.info("export done: %s", output_dir)
  return output_dir
