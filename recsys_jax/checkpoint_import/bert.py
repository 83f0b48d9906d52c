"""Imports Hugging Face BERT checkpoints (BertModel, MiniLM, ...) into `BertEncoder`.

HF key (after an optional `bert.` prefix)          -> our path
  embeddings.word_embeddings.weight                 embeddings/word_embeddings/embedding
  embeddings.position_embeddings.weight             embeddings/position_embeddings/embedding
  embeddings.token_type_embeddings.weight           embeddings/token_type_embeddings/embedding
  embeddings.LayerNorm.{weight,bias}                embeddings/LayerNorm/{scale,bias}
  encoder.layer.{i}.attention.self.{q,k,v}          layer_{i}/attention/{query,key,value}  (kernel = W.T)
  encoder.layer.{i}.attention.output.dense          layer_{i}/attention/out
  encoder.layer.{i}.attention.output.LayerNorm      layer_{i}/attention_norm
  encoder.layer.{i}.intermediate.dense              layer_{i}/intermediate
  encoder.layer.{i}.output.dense                    layer_{i}/output
  encoder.layer.{i}.output.LayerNorm                layer_{i}/output_norm

Keys that are read and deliberately dropped are listed in `IGNORED_KEYS`.
"""

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.checkpoint_import import common
from recsys_jax.models import bert

CheckpointImportError = common.CheckpointImportError
CONFIG_FILE = "config.json"
ORBAX_CONFIG_FILE = "bert_config.json"
PARAMS_DIR = "params"

# Regexes (full match, after the `bert.` prefix is stripped) of checkpoint
# keys that carry no `BertEncoder` parameter: the NSP pooler (sentence-
# transformers uses mean pooling instead), the position-id buffer, and the
# pre-training heads of BertForPreTraining / BertForMaskedLM.
IGNORED_KEYS = (
    r"pooler\..*",
    r"embeddings\.position_ids",
    r"cls\..*",
)

_LINEAR_NAMES = {
    "attention.self.query": "attention/query",
    "attention.self.key": "attention/key",
    "attention.self.value": "attention/value",
    "attention.output.dense": "attention/out",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
}
_NORM_NAMES = {
    "attention.output.LayerNorm": "attention_norm",
    "output.LayerNorm": "output_norm",
}


def abstract_params(config: bert.BertConfig) -> Any:
  """Boxed ShapeDtypeStructs of `BertEncoder(config)` params (no compute)."""
  model = bert.BertEncoder(config)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]


def init_params(config: bert.BertConfig, rng: jax.Array) -> Any:
  """Boxed (logically partitioned) random params of `BertEncoder(config)`."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return bert.BertEncoder(config).init(rng, tokens)["params"]


def param_mapping(config: bert.BertConfig) -> Dict[str, common.Source]:
  """`{our param path: Source(HF key without prefix, transform)}`."""
  m = {}
  for name in ("word_embeddings", "position_embeddings",
               "token_type_embeddings"):
    m[f"embeddings/{name}/embedding"] = common.Source(
        f"embeddings.{name}.weight")
  m["embeddings/LayerNorm/scale"] = common.Source("embeddings.LayerNorm.weight")
  m["embeddings/LayerNorm/bias"] = common.Source("embeddings.LayerNorm.bias")
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}", f"layer_{i}"
    for hf_name, name in _LINEAR_NAMES.items():
      m[f"{ours}/{name}/kernel"] = common.Source(f"{hf}.{hf_name}.weight",
                                                 common.transpose)
      m[f"{ours}/{name}/bias"] = common.Source(f"{hf}.{hf_name}.bias")
    for hf_name, name in _NORM_NAMES.items():
      m[f"{ours}/{name}/scale"] = common.Source(f"{hf}.{hf_name}.weight")
      m[f"{ours}/{name}/bias"] = common.Source(f"{hf}.{hf_name}.bias")
  return m


def _normalize_keys(state_dict: Mapping[str, np.ndarray], source: str
                    ) -> Dict[str, np.ndarray]:
  """Strips a `bert.` prefix and renames TF-era LayerNorm gamma/beta."""
  prefixed = any(k.startswith("bert.embeddings.") for k in state_dict)
  out = {}
  for key, value in state_dict.items():
    # Other top-level keys (cls.* heads, strays) keep their names so they
    # are ignored or reported as unexpected by name.
    if prefixed and key.startswith("bert."):
      key = key[len("bert."):]
    if key.endswith("LayerNorm.gamma"):
      key = key[:-len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
      key = key[:-len("beta")] + "bias"
    if key in out:
      raise CheckpointImportError(
          f"{source}: key {key!r} appears twice (with and without the "
          "'bert.' prefix, or as both gamma/beta and weight/bias)")
    out[key] = value
  return out


def bert_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                config: bert.BertConfig, *,
                                source: str = "checkpoint"
                                ) -> Dict[str, Any]:
  """Maps an HF BERT state dict onto `BertEncoder` params (float32 NumPy).

  Raises:
    CheckpointImportError naming missing, unexpected and mis-shaped keys.
  """
  sd = _normalize_keys(state_dict, source)
  return common.assign_params(sd, abstract_params(config),
                              param_mapping(config), ignore=IGNORED_KEYS,
                              source=source)


def load_bert_config(path: str) -> bert.BertConfig:
  """`BertConfig` from `path/config.json`."""
  config_path = os.path.join(path, CONFIG_FILE)
  raw = common.read_json(config_path)
  if not isinstance(raw, dict):
    raise CheckpointImportError(f"{config_path}: expected a JSON object")
  try:
    return bert.BertConfig.from_hf_config(raw)
  except (TypeError, ValueError) as e:
    raise CheckpointImportError(f"{config_path}: {e}") from e


def load_hf_bert(path: str) -> Tuple[bert.BertConfig, Dict[str, Any]]:
  """Reads an HF BERT directory (config.json + weights) -> (config, params).

  Args:
    path: directory with config.json and model.safetensors (or
      pytorch_model.bin, read with weights_only=True).

  Returns:
    The config and a nested dict of float32 NumPy arrays for
    `BertEncoder(config).apply({'params': params}, ...)`.
  """
  if not os.path.isdir(path):
    raise CheckpointImportError(
        f"{path}: expected an HF model directory with {CONFIG_FILE} and "
        "model.safetensors or pytorch_model.bin")
  config = load_bert_config(path)
  state_dict = common.load_hf_state_dict(path)
  return config, bert_params_from_state_dict(state_dict, config, source=path)


def save_as_orbax(params: Any, config: bert.BertConfig, out_dir: str) -> str:
  """Writes `out_dir/params` (orbax) and `out_dir/bert_config.json`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(out_dir, ORBAX_CONFIG_FILE), "w",
            encoding="utf-8") as f:
    json.dump(dataclasses.asdict(config), f, indent=2, sort_keys=True)
  return out_dir


def load_orbax(out_dir: str) -> Tuple[bert.BertConfig, Dict[str, Any]]:
  """Reads what `save_as_orbax` wrote (params restored as host arrays)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  cfg_path = os.path.join(out_dir, ORBAX_CONFIG_FILE)
  raw = common.read_json(cfg_path)
  try:
    config = bert.BertConfig(**raw)
  except (TypeError, ValueError) as e:
    raise CheckpointImportError(f"{cfg_path}: {e}") from e
  params = ocp.StandardCheckpointer().restore(os.path.join(out_dir, PARAMS_DIR))
  common.check_tree(params, abstract_params(config), source=out_dir,
                    rewrite=f"python -m recsys_jax.checkpoint_import.bert "
                    f"--hf_dir=<the HF directory> --output_dir={out_dir}")
  return config, params
