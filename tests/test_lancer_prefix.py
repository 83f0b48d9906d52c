"""LANCER's prompt module (models/lancer.py) against NumPy references.

Tiny T5 sizes (`T5Config.tiny`: 2 + 2 layers, 4 heads of 8) and small random
`ItemTables` (items 1..9; item 3 has no CF vector, item 4 no text vector).
Checked: the history window against a list reference; the knowledge and
reasoning prompts against NumPy with the module's own parameters; which
window positions matter; 'both' = [knowledge ; reasoning]; the parameter
trees of the projections, modes and stacks; inside `EncoderDecoderModel`:
the logits follow the history, gradients reach the prompts, greedy and beam
decoding run (greedy's score is the teacher-forced score of its tokens);
the knowledge stage initialises the next through `init_from`; bad
configurations and inputs give one-line errors; the builders and gin's
uncalled `@builders.lancer_prefix`.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from recsys_jax.core import init_from
from recsys_jax.core import param_tree
from recsys_jax.model_lib import builders
from recsys_jax.model_lib import encoder_decoder as ed
from recsys_jax.model_lib import item_embeddings as ie
from recsys_jax.models import lancer
from recsys_jax.models import t5 as t5_lib
from tests import helpers

T5 = t5_lib.T5Config.tiny(dropout_rate=0.0)
H, D = T5.num_heads, T5.d_kv
LAYERS = T5.num_encoder_layers + T5.num_decoder_layers
P, W = 4, 3
V, DC, DS = 10, 3, 5
# Oldest first, 0-padded at the end: 6 items (window = the last 3), 2 items
# (1 masked position), none (all masked), 3 items, one without CF (item 3)
# and one without text (item 4).
HISTORY = np.array([[1, 2, 5, 6, 7, 8],
                    [9, 2, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0],
                    [3, 4, 5, 0, 0, 0]], np.int32)


def _tables():
  rng = np.random.default_rng(0)
  cf = rng.normal(size=(V, DC)).astype(np.float32)
  sem = rng.normal(size=(V, DS)).astype(np.float32)
  cf_missing = np.isin(np.arange(V), [0, 3])
  sem_missing = np.isin(np.arange(V), [0, 4])
  cf[cf_missing] = 0
  sem[sem_missing] = 0
  return ie.ItemTables(cf=cf, semantic=sem, cf_missing=cf_missing,
                       semantic_missing=sem_missing)


TABLES = _tables()


def _config(**kw):
  fields = dict(prefix_length=P, history_window=W, mode="both",
                sources="fused", dropout_rate=0.0)
  return lancer.LancerConfig.for_t5(T5, **{**fields, **kw})


def _module(tables=TABLES, **kw):
  return lancer.LancerPrefix(_config(**kw), tables)


def _init(module, batch=None, seed=0):
  batch = {"history_items": HISTORY} if batch is None else batch
  return nn.meta.unbox(module.init(jax.random.PRNGKey(seed), batch)[
      "params"])


def _apply(module, params, history=HISTORY, **kw):
  fn = jax.jit(lambda p, h: module.apply({"params": p},
                                         {"history_items": h}, **kw))
  return fn(params, history)


def _stack(prefix):
  """Per-layer PrefixKV -> keys, values `[layers, B, N, H, D]`, masks."""
  return (np.stack([np.asarray(p.keys) for p in prefix]),
          np.stack([np.asarray(p.values) for p in prefix]),
          np.stack([np.asarray(p.mask) for p in prefix]))


def _all_layers(out):
  """(encoder, decoder) -> keys, values `[LAYERS, B, N, H, D]`, mask."""
  enc, dec = out
  layers_ = tuple(enc or ()) + tuple(dec or ())
  return _stack(layers_)


# -- NumPy reference -----------------------------------------------------------


def _np_dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])


def _np_window(row):
  items = [int(x) for x in row if x > 0][-W:]
  return items + [0] * (W - len(items)), [True] * len(items) + [False] * (
      W - len(items))


def _np_knowledge_states(params):
  k = params["knowledge"]
  return np.tanh(_np_dense(k["hidden"], np.asarray(k["table"], np.float64)))


def _np_item_vectors(params, ids):
  items = params["reasoning"]["items"]
  out = []
  for source in ("cf", "semantic"):
    table = np.asarray(getattr(TABLES, source), np.float64)
    missing = np.asarray(getattr(TABLES, f"{source}_missing"))[ids]
    x = np.where(missing[..., None], np.asarray(items[f"{source}_missing"]),
                 table[ids])
    out.append(x / np.linalg.norm(x, axis=-1, keepdims=True))
  return np.concatenate(out, axis=-1)


def _np_reasoning(params, history, projection):
  """Keys, values `[LAYERS, B, W, H, D]` and mask `[B, W]`."""
  windows = [_np_window(row) for row in history]
  ids = np.array([w[0] for w in windows])
  mask = np.array([w[1] for w in windows])
  r = params["reasoning"]
  hs = _np_knowledge_states(params)
  q = _np_dense(r["query"], _np_item_vectors(params, ids))  # [B, W, hidden]
  k, v = _np_dense(r["key"], hs), _np_dense(r["value"], hs)
  logits = q @ k.T / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = probs @ v
  owner = params["knowledge"] if projection == "shared" else r
  flat = _np_dense(owner["output"], out) * mask[..., None]
  kv = flat.reshape(len(ids), W, LAYERS, 2, H, D).transpose(2, 3, 0, 1, 4, 5)
  return kv[:, 0], kv[:, 1], mask


# -- the window ----------------------------------------------------------------


def test_history_window_against_a_list_reference():
  rows = np.array([[1, 2, 3, 4, 5], [7, 0, 0, 0, 0], [0, 0, 0, 0, 0],
                   [4, 5, 6, 0, 0], [0, 8, 0, 9, 0],  # padding anywhere
                   [-1, 2, 0, 3, 0]], np.int32)       # negative = padding
  for window in (1, 3, 5, 7):
    ids, mask = jax.jit(lancer.history_window, static_argnums=1)(rows,
                                                                 window)
    for row, got_ids, got_mask in zip(rows, np.asarray(ids),
                                      np.asarray(mask)):
      items = [int(x) for x in row if x > 0][-window:]
      pad = window - len(items)
      np.testing.assert_array_equal(got_ids, items + [0] * pad, str(row))
      np.testing.assert_array_equal(got_mask, [True] * len(items) +
                                    [False] * pad, str(row))


def test_window_uses_only_the_last_items_and_masks_the_rest():
  module = _module(mode="reasoning")
  params = _init(module)
  keys, values, mask = _all_layers(_apply(module, params))
  np.testing.assert_array_equal(
      mask[0], [[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]])
  assert np.all(np.isfinite(keys)) and np.all(np.isfinite(values))
  # Masked positions hold zeros (the all-padding row: every position).
  assert np.all(keys[:, ~mask[0]] == 0) and np.all(values[:, 2] == 0)
  # Row 0 has 6 items: changing one before its last 3 changes nothing;
  # changing one inside the window changes that position only.
  older, inside = HISTORY.copy(), HISTORY.copy()
  older[0, 1] = 9
  inside[0, 4] = 9
  same = _all_layers(_apply(module, params, older))[0]
  np.testing.assert_array_equal(same, keys)
  moved = _all_layers(_apply(module, params, inside))[0]
  changed = np.any(moved != keys, axis=(0, 3, 4))  # [B, W]
  np.testing.assert_array_equal(changed, [[0, 1, 0], [0] * 3, [0] * 3,
                                          [0] * 3])


# -- the prompts against NumPy -------------------------------------------------


@pytest.mark.parametrize("projection", ["shared", "own"])
def test_reasoning_prompt_matches_numpy(projection):
  module = _module(mode="reasoning", reasoning_projection=projection)
  params = _init(module)
  keys, values, masks = _all_layers(_apply(module, params))
  want_k, want_v, want_mask = _np_reasoning(params, HISTORY, projection)
  np.testing.assert_allclose(keys, want_k, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(values, want_v, rtol=2e-5, atol=2e-6)
  for mask in masks:
    np.testing.assert_array_equal(mask, want_mask)


def test_knowledge_prompt_matches_numpy_and_is_the_same_for_every_row():
  module = _module(mode="knowledge", tables=None)
  # Knowledge mode reads no history: the batch size is the tokens'.
  batch = {"encoder_input_tokens": np.ones((3, 2), np.int32)}
  params = _init(module, batch)
  assert set(params) == {"knowledge"}
  out = jax.jit(lambda p: module.apply({"params": p}, batch))(params)
  keys, values, masks = _all_layers(out)
  assert keys.shape == (LAYERS, 3, P, H, D) and masks.all()
  flat = _np_dense(params["knowledge"]["output"],
                   _np_knowledge_states(params))
  kv = flat.reshape(P, LAYERS, 2, H, D).transpose(1, 2, 0, 3, 4)
  for row in range(3):
    np.testing.assert_allclose(keys[:, row], kv[:, 0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(values[:, row], kv[:, 1], rtol=2e-5,
                               atol=2e-6)
  # Training-mode dropout draws one mask for the prompt, not one per row.
  module = _module(mode="knowledge", tables=None, dropout_rate=0.5)
  out = module.apply({"params": params}, batch, deterministic=False,
                     rngs={"dropout": jax.random.PRNGKey(1)})
  dropped = _all_layers(out)[0]
  assert np.any(dropped != keys)
  np.testing.assert_array_equal(dropped, np.broadcast_to(dropped[:, :1],
                                                         dropped.shape))


@pytest.mark.parametrize("projection", ["shared", "own"])
def test_both_is_knowledge_then_reasoning(projection):
  both = _module(mode="both", reasoning_projection=projection)
  params = _init(both)
  keys, values, masks = _all_layers(_apply(both, params))
  assert keys.shape == (LAYERS, len(HISTORY), P + W, H, D)
  know = _module(mode="knowledge")
  k_keys, k_values, k_masks = _all_layers(
      _apply(know, {"knowledge": params["knowledge"]}))
  reason = _module(mode="reasoning", reasoning_projection=projection)
  r_keys, r_values, r_masks = _all_layers(_apply(reason, params))
  np.testing.assert_array_equal(keys, np.concatenate([k_keys, r_keys], 2))
  np.testing.assert_array_equal(values,
                                np.concatenate([k_values, r_values], 2))
  np.testing.assert_array_equal(masks, np.concatenate([k_masks, r_masks], 2))


# -- parameter trees and stacks ------------------------------------------------


def _shapes(params):
  return {k: tuple(v.shape) for k, v in param_tree.flatten(params).items()}


def test_parameter_trees_of_the_projections():
  hidden, out = T5.d_model, LAYERS * 2 * H * D
  knowledge = {"knowledge/table": (P, hidden),
               "knowledge/hidden/kernel": (hidden, hidden),
               "knowledge/hidden/bias": (hidden,)}
  knowledge_out = {"knowledge/output/kernel": (hidden, out),
                   "knowledge/output/bias": (out,)}
  reasoning = {"reasoning/items/cf_missing": (DC,),
               "reasoning/items/semantic_missing": (DS,),
               "reasoning/query/kernel": (DC + DS, hidden),
               "reasoning/query/bias": (hidden,),
               "reasoning/key/kernel": (hidden, hidden),
               "reasoning/key/bias": (hidden,),
               "reasoning/value/kernel": (hidden, hidden),
               "reasoning/value/bias": (hidden,)}
  own_out = {"reasoning/output/kernel": (hidden, out),
             "reasoning/output/bias": (out,)}
  assert _shapes(_init(_module(mode="both"))) == {
      **knowledge, **knowledge_out, **reasoning}
  assert _shapes(_init(_module(mode="both", reasoning_projection="own"))) == {
      **knowledge, **knowledge_out, **reasoning, **own_out}
  # The paper's reasoning stage: the knowledge output layer is unused.
  assert _shapes(_init(_module(mode="reasoning",
                               reasoning_projection="own"))) == {
                                   **knowledge, **reasoning, **own_out}
  assert _shapes(_init(_module(mode="knowledge"))) == {**knowledge,
                                                       **knowledge_out}
  # One source: its table only; a wider hidden.
  cf_only = _init(_module(mode="reasoning", sources="cf", hidden=16))
  assert _shapes(cf_only)["reasoning/query/kernel"] == (DC, 16)
  assert "reasoning/items/semantic_missing" not in _shapes(cf_only)


@pytest.mark.parametrize("stacks", [("encoder",), ("decoder",),
                                    ("decoder", "encoder"), "encoder"])
def test_stacks(stacks):
  module = _module(mode="both", stacks=stacks)
  params = _init(module)
  enc, dec = _apply(module, params)
  listed = (stacks,) if isinstance(stacks, str) else stacks
  assert module.config.stacks == tuple(s for s in lancer.STACKS
                                       if s in listed)
  for name, prefix, count in (("encoder", enc, T5.num_encoder_layers),
                              ("decoder", dec, T5.num_decoder_layers)):
    if name not in listed:
      assert prefix is None
      continue
    assert len(prefix) == count
    for layer in prefix:
      assert layer.keys.shape == (len(HISTORY), P + W, H, D)
      assert layer.values.shape == layer.keys.shape
      assert layer.mask.shape == (len(HISTORY), P + W)
  width = module.config.num_layers * 2 * H * D
  assert params["knowledge"]["output"]["kernel"].shape == (T5.d_model, width)


def test_architecture_record_is_json():
  record = _config(stacks=["decoder", "encoder"]).architecture_record()
  assert record["stacks"] == ["encoder", "decoder"]
  assert "dropout_rate" not in record and "dtype" not in record
  assert record["mode"] == "both" and record["prefix_length"] == P


# -- inside the encoder-decoder ------------------------------------------------


def _lm_batch(history):
  rng = np.random.default_rng(0)
  b = len(history)
  enc = rng.integers(3, 60, size=(b, 5)).astype(np.int32)
  enc[1, 3:] = 0
  tgt = rng.integers(3, 60, size=(b, 4)).astype(np.int32)
  tgt[:, -1] = 1
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "history_items": history}


def _lm(**kw):
  return ed.EncoderDecoderModel(
      T5, prefix_module=_module(**kw),
      prefix_inputs={"history_items": ((HISTORY.shape[1],), "int32")},
      max_decode_len=5)


def test_in_the_encoder_decoder_model():
  model = _lm(mode="both", dropout_rate=0.2)
  params = nn.meta.unbox(model.get_initial_variables(
      jax.random.PRNGKey(0))["params"])
  assert set(params["prefix"]) == {"knowledge", "reasoning"}
  assert model.architecture()["prefix_module"]["config"]["mode"] == "both"
  batch = _lm_batch(HISTORY)
  logits = jax.jit(model.logits)
  base = np.asarray(logits(params, batch))
  # A changed window item changes its own row's logits only.
  changed = HISTORY.copy()
  changed[3, 0] = 7
  moved = np.asarray(logits(params, dict(batch, history_items=changed)))
  row_changed = np.abs(moved - base).max(axis=(1, 2)) > 1e-6
  np.testing.assert_array_equal(row_changed, [False, False, False, True])
  # Gradients (with prefix dropout on) reach every prompt parameter that
  # this batch reads (item 3 has no CF vector: its learned one is read).
  grads = jax.jit(jax.grad(lambda p: model.loss_fn(
      p, batch, jax.random.PRNGKey(1))[0]))(params)
  for path, g in param_tree.flatten(grads["prefix"]).items():
    assert np.any(np.asarray(g) != 0), path
  # Cached greedy decoding with both prefixes: its score is the
  # teacher-forced score of the tokens it generated.
  tokens, scores = jax.jit(model.predict_batch)(params, batch)
  assert tokens.shape == (len(HISTORY), 5)
  as_targets = np.asarray(tokens)
  # Generated positions: up to the first EOS (an id 0 may be generated).
  ended_before = np.cumsum(as_targets == t5_lib.EOS_ID, axis=1) - (
      as_targets == t5_lib.EOS_ID)
  rescored = jax.jit(model.score_batch)(params, dict(
      batch, decoder_target_tokens=as_targets,
      decoder_loss_weights=(ended_before == 0).astype(np.float32),
      decoder_input_tokens=np.concatenate(
          [np.zeros((len(HISTORY), 1), np.int32), as_targets[:, :-1]], 1)))
  np.testing.assert_allclose(rescored, scores, rtol=1e-4, atol=1e-4)
  beams, beam_scores = jax.jit(
      lambda p, b: model.predict_batch(p, b, num_beams=3,
                                       return_all_beams=True))(params, batch)
  assert beams.shape == (len(HISTORY), 3, 5)
  assert np.all(np.diff(np.asarray(beam_scores), axis=1) <= 1e-6)


def test_knowledge_stage_initialises_the_reasoning_stage():
  """init_from's plan maps a knowledge run's prompt onto a later stage."""
  def shapes(model):
    tree = jax.eval_shape(lambda: nn.meta.unbox(
        model.get_initial_variables(jax.random.PRNGKey(0))["params"]))
    return {k: tuple(v.shape) for k, v in param_tree.flatten(tree).items()}
  source = shapes(_lm(mode="knowledge"))
  spec = init_from.InitFrom(path="unused", mapping=[
      ("prefix/knowledge/.*", r"\g<0>")])
  for mode, projection in (("both", "shared"), ("reasoning", "own")):
    target = shapes(_lm(mode=mode, reasoning_projection=projection))
    plan = init_from.plan(target, source, spec)
    want = sorted(k for k in target if k.startswith("prefix/knowledge/"))
    assert sorted(plan) == want and len(want) >= 3


# -- errors --------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("mode", "prompt"), ("sources", "text"), ("reasoning_projection", "mlp"),
    ("stacks", ("encoder", "encoder")), ("stacks", ()), ("stacks", ("lm",)),
    ("prefix_length", 0), ("history_window", 2.5), ("hidden", True),
    ("dropout_rate", 1.0), ("dtype", "float99"), ("normalize", "yes")])
def test_bad_config_values(field, value):
  with pytest.raises(ValueError, match=rf"^LancerConfig\.{field}=") as e:
    _config(**{field: value})
  assert "\n" not in str(e.value)


def test_stacks_without_layers():
  with pytest.raises(ValueError, match="have no layers"):
    lancer.LancerConfig(num_heads=2, d_kv=4, num_encoder_layers=0,
                        num_decoder_layers=2, hidden=8, stacks=("encoder",))
  with pytest.raises(ValueError, match="num_decoder_layers=-1"):
    lancer.LancerConfig(num_heads=2, d_kv=4, num_encoder_layers=1,
                        num_decoder_layers=-1, hidden=8)


def test_bad_inputs():
  params = _init(_module(mode="reasoning"))
  with pytest.raises(ValueError, match="reads item tables"):
    _module(mode="reasoning", tables=None).apply(
        {"params": params}, {"history_items": HISTORY})
  with pytest.raises(KeyError, match="reads batch\\['history_items'\\]"):
    _module(mode="reasoning").apply(
        {"params": params}, {"encoder_input_tokens": HISTORY})
  with pytest.raises(ValueError, match="expected \\[batch, H >= 1\\]"):
    _module(mode="reasoning").apply({"params": params},
                                    {"history_items": HISTORY[0]})
  no_text = ie.ItemTables(cf=TABLES.cf, semantic=np.zeros((V, 0)),
                          cf_missing=TABLES.cf_missing,
                          semantic_missing=TABLES.semantic_missing)
  with pytest.raises(ValueError, match="LancerConfig.sources='fused' reads "
                     "the semantic table, which is empty"):
    _module(mode="reasoning", tables=no_text).apply(
        {"params": params}, {"history_items": HISTORY})
  with pytest.raises(KeyError, match="batch size"):
    _module(mode="knowledge").apply({"params": params}, {})


# -- builders and gin ----------------------------------------------------------


def test_builders_and_gin_binding():
  import gin  # pylint: disable=g-import-not-at-top
  data_dir = helpers.prepared_dataset()
  sizes = dict(d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
               num_decoder_layers=2, dropout_rate=0.0)
  gin.clear_config()
  try:
    gin.parse_config("""
from __gin__ import dynamic_registration
from recsys_jax.model_lib import builders
builders.t5.prefix_module = @builders.lancer_prefix
builders.t5.prefix_inputs = @builders.lancer_prefix_inputs()
builders.lancer_prefix_inputs.max_history = 7
builders.lancer_prefix:
  mode = 'knowledge'
  prefix_length = 5
  stacks = ['decoder']
""")
    model = gin.get_configurable(builders.t5)(data_dir=data_dir, **sizes)
  finally:
    gin.clear_config()
  module = model.prefix_module
  assert isinstance(module, lancer.LancerPrefix) and module.tables is None
  cfg = module.config
  assert (cfg.num_heads, cfg.d_kv, cfg.hidden) == (2, 8, 16)
  assert (cfg.num_layers, cfg.prefix_length, cfg.stacks) == (2, 5,
                                                              ("decoder",))
  assert model.prefix_inputs == {"history_items": ((7,), "int32")}
  # A ready module is taken as is; the reasoning stage loads its tables.
  t5_config = model.config
  reasoning = builders.lancer_prefix(
      t5_config, data_dir=data_dir, mode="reasoning", sources="cf", cf="als",
      cf_dim=4, als_iterations=1)
  assert np.shape(reasoning.tables.cf) == (151, 4)
  assert np.shape(reasoning.tables.semantic) == (151, 0)
  again = builders.t5(data_dir=data_dir, **sizes, prefix_module=reasoning)
  assert again.prefix_module is reasoning
  with pytest.raises(ValueError, match="needs item_text_cache"):
    builders.lancer_prefix(t5_config, data_dir=data_dir, mode="both")
  with pytest.raises(ValueError, match="needs cf"):
    builders.lancer_prefix(t5_config, data_dir=data_dir, sources="fused",
                           item_text_cache="somewhere")
  with pytest.raises(ValueError, match="needs data_dir"):
    builders.lancer_prefix(t5_config, sources="cf", cf="als")
  with pytest.raises(ValueError, match="max_history=0"):
    builders.lancer_prefix_inputs(0)
  with pytest.raises(ValueError, match="prefix_module=3"):
    builders.t5(data_dir=data_dir, **sizes, prefix_module=3)
