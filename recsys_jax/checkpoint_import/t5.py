"""Imports Hugging Face T5 / T5 v1.1 / mT5 checkpoints into `models.t5` params.

  python -m recsys_jax.checkpoint_import.t5 --hf_dir=DIR --output_dir=OUT

DIR holds `config.json` and `model.safetensors` (or shards, or
`pytorch_model.bin`, read with `torch.load(weights_only=True)`); OUT receives
an orbax params checkpoint under `params/` and `t5_config.json`.
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from recsys_jax.checkpoint_import import common
from recsys_jax.checkpoint_import.common import CheckpointImportError
from recsys_jax.models import t5 as t5_lib
from recsys_jax.models.t5 import T5Config

CONFIG_FILE = "t5_config.json"
PARAMS_DIR = "params"

# Written by old T5 exports; HF ignores it too (cross-attention has no bias).
_IGNORED = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\."
            r"relative_attention_bias\.weight",)
_EMBEDDING_ALIASES = ("shared.weight", "encoder.embed_tokens.weight",
                      "decoder.embed_tokens.weight")


def _attention_rules(ours: str, theirs: str) -> Dict[str, common.Source]:
  names = {"query": "q", "key": "k", "value": "v", "out": "o"}
  return {f"{ours}/{a}/kernel": common.Source(f"{theirs}.{b}.weight",
                                              common.transpose)
          for a, b in names.items()}


def _mlp_rules(ours: str, theirs: str, gated: bool) -> Dict[str, common.Source]:
  names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  return {f"{ours}/{n}/kernel": common.Source(
      f"{theirs}.DenseReluDense.{n}.weight", common.transpose) for n in names}


def hf_t5_mapping(config: T5Config, *, encoder_only: bool = False,
                  embedding_key: str = "shared.weight",
                  lm_head_key: str = "lm_head.weight"
                  ) -> Dict[str, common.Source]:
  """`{our param path: Source(HF key, transform)}` for `config`'s tree."""
  gated, _ = t5_lib.t5_layers.parse_feed_forward_proj(config.feed_forward_proj)
  bias_t = common.transpose  # HF [buckets, heads] -> ours [heads, buckets]
  m: Dict[str, Any] = {"token_embedder/embedding": common.Source(embedding_key)}
  m["encoder/relpos_bias/rel_embedding"] = common.Source(
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      bias_t)
  for i in range(config.num_encoder_layers):
    ours, theirs = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
    m[f"{ours}/pre_attention_layer_norm/scale"] = common.Source(
        f"{theirs}.0.layer_norm.weight")
    m.update(_attention_rules(f"{ours}/attention", f"{theirs}.0.SelfAttention"))
    m[f"{ours}/pre_mlp_layer_norm/scale"] = common.Source(
        f"{theirs}.1.layer_norm.weight")
    m.update(_mlp_rules(f"{ours}/mlp", f"{theirs}.1", gated))
  m["encoder/encoder_norm/scale"] = common.Source(
      "encoder.final_layer_norm.weight")
  if encoder_only:
    return m
  m["decoder/relpos_bias/rel_embedding"] = common.Source(
      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      bias_t)
  for i in range(config.num_decoder_layers):
    ours, theirs = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
    m[f"{ours}/pre_self_attention_layer_norm/scale"] = common.Source(
        f"{theirs}.0.layer_norm.weight")
    m.update(_attention_rules(f"{ours}/self_attention",
                              f"{theirs}.0.SelfAttention"))
    m[f"{ours}/pre_cross_attention_layer_norm/scale"] = common.Source(
        f"{theirs}.1.layer_norm.weight")
    m.update(_attention_rules(f"{ours}/encoder_decoder_attention",
                              f"{theirs}.1.EncDecAttention"))
    m[f"{ours}/pre_mlp_layer_norm/scale"] = common.Source(
        f"{theirs}.2.layer_norm.weight")
    m.update(_mlp_rules(f"{ours}/mlp", f"{theirs}.2", gated))
  m["decoder/decoder_norm/scale"] = common.Source(
      "decoder.final_layer_norm.weight")
  if not config.tie_word_embeddings:
    m["lm_head/kernel"] = common.Source(lm_head_key, common.transpose)
  return m


def _param_shapes(config: T5Config, encoder_only: bool):
  return jax.eval_shape(
      lambda: t5_lib.init_params(config, jax.random.PRNGKey(0),
                                 encoder_only=encoder_only))


def convert_hf_t5(state_dict: Dict[str, np.ndarray], hf_config: Dict[str, Any],
                  *, encoder_only: bool = False, source: str = "checkpoint",
                  **config_overrides) -> Tuple[T5Config, Dict[str, Any]]:
  """`(T5Config, params)` from an in-memory HF state dict and config dict."""
  try:
    config = T5Config.from_hf_config(hf_config, **config_overrides)
  except (ValueError, TypeError) as e:
    raise CheckpointImportError(f"{source}: config.json: {e}") from e
  state_dict = dict(state_dict)
  embedding_key = common.check_same(state_dict, _EMBEDDING_ALIASES,
                                    source=source) or "shared.weight"
  ignore = list(_IGNORED)
  ignore += [a.replace(".", r"\.") for a in _EMBEDDING_ALIASES
             if a != embedding_key]
  lm_head_key = "lm_head.weight"
  if encoder_only:
    ignore += [r"decoder\..*", r"lm_head\.weight"]
  elif config.tie_word_embeddings:
    # Some writers also store the tied head; accept it only if it is tied.
    if lm_head_key in state_dict:
      common.check_same(state_dict, (embedding_key, lm_head_key),
                        source=source)
      ignore.append(r"lm_head\.weight")
  elif lm_head_key not in state_dict and hf_config.get(
      "tie_word_embeddings", True) and (
          "scale_decoder_outputs" in hf_config
          or hf_config.get("model_type") == "mt5"):
    # transformers>=5 ties lm_head to `shared` (without the output scaling)
    # and then saves only `shared`; the head is that same table.
    lm_head_key = embedding_key
  mapping = hf_t5_mapping(config, encoder_only=encoder_only,
                          embedding_key=embedding_key, lm_head_key=lm_head_key)
  params = common.assign_params(state_dict, _param_shapes(config, encoder_only),
                                mapping, ignore=ignore, source=source)
  return config, params


def load_hf_t5(path: str, *, encoder_only: bool = False,
               **config_overrides) -> Tuple[T5Config, Dict[str, Any]]:
  """Loads a local HF T5/mT5 directory as `(T5Config, params)`.

  Args:
    path: directory with config.json and model.safetensors (or shards, or
      pytorch_model.bin).
    encoder_only: return only the `T5Encoder` subtree (token_embedder,
      encoder); decoder keys are then ignored (works for T5EncoderModel
      checkpoints too).
    **config_overrides: T5Config fields to replace (e.g. dtype='bfloat16',
      dropout_rate=0.0).

  Returns:
    The config and a nested dict of float32 NumPy arrays matching
    `T5(config)` (or `T5Encoder(config)`) parameters.
  """
  if not os.path.isdir(path):
    raise CheckpointImportError(f"{path}: not a directory")
  hf_config = common.read_json(os.path.join(path, "config.json"))
  if not isinstance(hf_config, dict):
    raise CheckpointImportError(f"{path}/config.json: expected a JSON object")
  state_dict = common.load_hf_state_dict(path)
  return convert_hf_t5(state_dict, hf_config, encoder_only=encoder_only,
                       source=path, **config_overrides)


def save_as_orbax(params: Any, config: T5Config, out_dir: str) -> str:
  """Writes `out_dir/params` (orbax) and `out_dir/t5_config.json`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  return out_dir


def load_orbax(out_dir: str, *, encoder_only: bool = False
               ) -> Tuple[T5Config, Dict[str, Any]]:
  """Reads what `save_as_orbax` wrote (params restored as host arrays)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  cfg_path = os.path.join(out_dir, CONFIG_FILE)
  try:
    config = T5Config.from_dict(common.read_json(cfg_path))
  except (TypeError, ValueError) as e:
    if isinstance(e, CheckpointImportError):
      raise
    raise CheckpointImportError(f"{cfg_path}: {e}") from e
  params = ocp.StandardCheckpointer().restore(os.path.join(out_dir, PARAMS_DIR))
  saved_encoder_only = "decoder" not in params
  if saved_encoder_only and not encoder_only:
    raise CheckpointImportError(
        f"{out_dir}: holds the encoder only (written with --encoder_only); "
        "load it with encoder_only=True")
  common.check_tree(
      params, _param_shapes(config, saved_encoder_only), source=out_dir,
      rewrite="python -m recsys_jax.checkpoint_import.t5 --hf_dir=<the HF "
      f"directory> --output_dir={out_dir}" +
      (" --encoder_only" if saved_encoder_only else ""))
  if encoder_only:
    params = t5_lib.encoder_params(params)
  return config, params


def main(argv: Optional[list] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf_dir", required=True,
                      help="local HF checkpoint directory")
  parser.add_argument("--output_dir", required=True,
                      help="where to write params/ and t5_config.json")
  parser.add_argument("--encoder_only", action="store_true",
                      help="keep only token_embedder + encoder")
  args = parser.parse_args(argv)
  try:
    config, params = load_hf_t5(args.hf_dir, encoder_only=args.encoder_only)
  except CheckpointImportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  out = save_as_orbax(params, config, args.output_dir)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"wrote {n:,} parameters ({config.num_encoder_layers}+"
        f"{config.num_decoder_layers} layers, d_model={config.d_model}) to "
        f"{out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
