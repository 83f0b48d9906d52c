"""The export run: params-only checkpoint, item embeddings and a manifest."""

import json
import logging
import os
from typing import Optional

import jax
import numpy as np

from recsys_jax.core import checkpoints
from recsys_jax.core import partitioning
from recsys_jax.data import prepared
from recsys_jax.runs import restore
from recsys_jax.serving import catalogue
from recsys_jax.serving import config_text
from recsys_jax.text import item_texts


def export(*, model_dir: str, model, mesh_config: partitioning.MeshConfig,
           checkpoint_step: Optional[int] = None,
           output_dir: Optional[str] = None,
           data_dir: Optional[str] = None) -> str:
  """Writes a params-only checkpoint, the run's config and a manifest (and,
  for models with an item table, item_embeddings.npy / item_bias.npy and
  the titles of its items, item_titles.json, so that `recommend` needs
  nothing but the export).

  Args:
    data_dir: the prepared dataset whose titles are copied; default the
      DATA_DIR (or the model builder's data_dir) of the run's config.gin.
  """
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
      dtype = _compute_dtype(model)
      if dtype:
        manifest["compute_dtype"] = dtype
      manifest.update(_copy_titles(model_dir, data_dir, output_dir,
                                   emb.shape[0]))
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


def _compute_dtype(model) -> Optional[str]:
  """The model's compute dtype (architecture records leave it out)."""
  config = getattr(model, "config", None)
  config = getattr(config, "backbone", config)
  dtype = getattr(config, "compute_dtype", None)
  return None if dtype is None else str(dtype)


def _copy_titles(model_dir: str, data_dir: Optional[str], output_dir: str,
                 num_items: int) -> dict:
  """Writes item_titles.json from the run's dataset; the manifest fields
  naming it ({} and a printed reason when there is no such dataset)."""
  if data_dir is None:
    config = config_text.read(model_dir)
    if config is not None:
      data_dir = config.model_arg("data_dir") or config.macro("DATA_DIR")
  items = (os.path.join(data_dir, prepared.ITEMS_FILE)
           if isinstance(data_dir, str) else None)
  if items is None or not os.path.exists(items):
    print(f"No item titles copied: {items or 'the run names no DATA_DIR'} "
          "not found (recommend then needs --data_dir)", flush=True)
    return {}
  rows = item_texts.read_rows(data_dir)
  if len(rows) != num_items:
    print(f"No item titles copied: {items} has {len(rows)} items, the model "
          f"{num_items}", flush=True)
    return {}
  path = os.path.join(output_dir, catalogue.TITLES_FILE)
  catalogue.write_titles(
      path, [""] + [str(r.get(item_texts.TITLE) or r.get("item_id") or "")
                    for r in rows])
  print(f"Copied the titles of {num_items} items from {items} to {path}",
        flush=True)
  return {"item_titles": catalogue.TITLES_FILE,
          "data_dir": os.path.abspath(data_dir)}
