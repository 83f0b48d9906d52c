"""FLARE's Perceiver and model wrapper against references (no caches needed)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.model_lib import flare
from recsys_jax.model_lib import losses
from recsys_jax.models import bert4rec
from recsys_jax.models import flare as flare_lib
from recsys_jax.models import perceiver
from tests import helpers

# -- NumPy reference of the Perceiver -----------------------------------------


def _ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _mha(q_in, kv_in, p, key_valid):
  q = np.einsum("...e,ehd->...hd", q_in, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("...e,ehd->...hd", kv_in, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("...e,ehd->...hd", kv_in, p["value"]["kernel"]) + p["value"]["bias"]
  q = q / np.sqrt(q.shape[-1])
  logits = np.einsum("uqhd,ukhd->uhqk", q, k)
  if key_valid is not None:
    logits = np.where(key_valid[:, None, None, :], logits, -1e9)
  logits = logits - logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w = w / w.sum(-1, keepdims=True)
  out = np.einsum("uhqk,ukhd->uqhd", w, v)
  return np.einsum("uqhd,hde->uqe", out, p["out"]["kernel"]) + p["out"]["bias"]


def _mlp(x, p):
  h = _gelu(x @ p["wi"]["kernel"] + p["wi"]["bias"])
  return h @ p["wo"]["kernel"] + p["wo"]["bias"]


def perceiver_numpy(p, tokens, mask, types, num_layers):
  p = jax.tree_util.tree_map(np.asarray, p)
  mem = tokens @ p["input_projection"]["kernel"] + p["input_projection"]["bias"]
  mem = mem + p["type_embed"]["embedding"][types]
  x = np.broadcast_to(p["latents"][None], (tokens.shape[0],) +
                      p["latents"].shape).astype(np.float64)
  for i in range(num_layers):
    c = p[f"cross_{i}"]
    x = x + _mha(_ln(x, c["query_norm"]), _ln(mem, c["memory_norm"]),
                 c["attention"], mask)
    x = x + _mlp(_ln(x, c["mlp_norm"]), c["mlp"])
    s = p[f"latent_{i}"]
    h = _ln(x, s["attention_norm"])
    x = x + _mha(h, h, s["attention"], None)
    x = x + _mlp(_ln(x, s["mlp_norm"]), s["mlp"])
  return _ln(x, p["final_norm"])


def _perceiver(layers=2):
  cfg = perceiver.PerceiverConfig(num_latents=3, num_layers=layers, width=8,
                                  num_heads=2, mlp_dim=16)
  module = perceiver.Perceiver(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(4, 6, 5)).astype(np.float32)
  mask = rng.random((4, 6)) < 0.7
  mask[:, 0] = True
  types = rng.integers(0, 2, (4, 6))
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(3), tokens, mask,
                                     types))["params"]
  # Non-trivial biases / norms so that the reference checks them too.
  params = jax.tree_util.tree_map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size),
                                             x.shape), params)
  return module, params, tokens, mask, types, cfg


def test_perceiver_matches_numpy():
  module, params, tokens, mask, types, cfg = _perceiver()
  got = module.apply({"params": params}, tokens, mask, types)
  want = perceiver_numpy(params, tokens.astype(np.float64), mask, types,
                         cfg.num_layers)
  assert got.shape == (4, cfg.num_latents, cfg.width)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_padded_token_never_changes_output():
  module, params, tokens, mask, types, _ = _perceiver()
  base = module.apply({"params": params}, tokens, mask, types)
  noisy = np.where(mask[..., None], tokens, 1e3 * np.ones_like(tokens))
  other_types = np.where(mask, types, 1 - types)
  got = module.apply({"params": params}, noisy, mask, other_types)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(base))
  # Extra padded columns change nothing either.
  wide = np.concatenate([tokens, np.ones((4, 3, 5), np.float32)], axis=1)
  wide_mask = np.concatenate([mask, np.zeros((4, 3), bool)], axis=1)
  wide_types = np.concatenate([types, np.ones((4, 3), int)], axis=1)
  got = module.apply({"params": params}, wide, wide_mask, wide_types)
  np.testing.assert_allclose(np.asarray(got), np.asarray(base), atol=1e-6)


# -- the model wrapper ----------------------------------------------------------

N, T, D, C, TC = 20, 5, 8, 6, 3


def _tables(vocab):
  return helpers.random_flare_tables(vocab, N, T, D, C, TC)


_MODELS = {}


def _model(causal=False, **kwargs):
  """(model, params), built once per configuration (init is the slow part)."""
  key = (causal,) + tuple(sorted(
      (k, tuple(v.tolist()) if isinstance(v, np.ndarray) else v)
      for k, v in kwargs.items()))
  if key not in _MODELS:
    _MODELS[key] = _build_model(causal, **kwargs)
  model, params = _MODELS[key]
  return model, dict(params)


def _build_model(causal=False, **kwargs):
  bc = bert4rec.Bert4RecConfig(num_items=N, max_len=10, hidden=16,
                               num_heads=2, mlp_dim=32, causal=causal)
  cfg = flare_lib.FlareConfig(
      backbone=bc, perceiver=perceiver.PerceiverConfig(width=16, mlp_dim=32),
      text_dim=D, fusion=kwargs.pop("fusion", "sum"))
  model = flare.FlareModel(cfg, _tables(bc.padded_vocab), **kwargs)
  params = nn.meta.unbox(
      jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))["params"])
  # The text gate starts closed (tanh(0) = 0); open it so text matters.
  params["text_gate"] = jnp.float32(0.5)
  return model, params


def _pos_text(model, params, ids, crit, per_row=None):
  """`model._position_text` without dropout, jitted (op by op is slow)."""
  fn = jax.jit(lambda p, i, c: model._position_text(
      p, i, c, None, critiques_per_row=per_row))
  return fn(params, ids, crit)


def _vectors(model, params, rows):
  return jax.jit(lambda p, r: model._item_vectors(p, r, None))(params, rows)


def _text_vectors(model, params, tokens, mask, types):
  return jax.jit(lambda p: model._apply(p, tokens, mask, types,
                                        method="text_vectors"))(params)


def _train_batch():
  ids = np.array([[1, 2, 21, 4, 5, 0, 0, 0, 0, 0],
                  [7, 21, 9, 10, 11, 12, 13, 21, 3, 0]], np.int32)
  targets = np.zeros_like(ids)
  targets[0, 2], targets[1, 1], targets[1, 7] = 3, 8, 14
  return dict(item_ids=ids, targets=targets,
              loss_weights=(targets > 0).astype(np.float32),
              critique_ids=np.where(targets > 0, 2, 0).astype(np.int32))


def test_distinct():
  keys = jnp.array([5, 0, 3, 5, 9, 3, 0, 7])
  values, slot, found, count = flare.distinct(keys, 8)
  assert int(count) == 5
  np.testing.assert_array_equal(values[:5], [0, 3, 5, 7, 9])
  np.testing.assert_array_equal(values[slot], keys)
  assert bool(found.all())
  values, slot, found, _ = flare.distinct(keys, 3)  # cap: 7 and 9 dropped
  np.testing.assert_array_equal(values, [0, 3, 5])
  np.testing.assert_array_equal(np.asarray(found),
                                [True, True, True, True, False, True, True,
                                 False])
  np.testing.assert_array_equal(values[slot][found], keys[found])


def _per_position_text(model, params, ids):
  """Reference: the Perceiver run once per position (no deduplication)."""
  t = model.tables
  rows = jnp.where((ids >= 1) & (ids <= N), ids, 0).reshape(-1)
  vec = _text_vectors(model, params, t.item_tokens[rows], t.item_mask[rows],
                      jnp.zeros(t.item_mask[rows].shape, jnp.int32))
  vec = jnp.where((rows > 0)[:, None], vec, 0.0)
  return vec.reshape(ids.shape + (-1,))


def test_distinct_items_equal_per_position():
  model, params = _model()
  ids = jnp.asarray(_train_batch()["item_ids"])
  crit = jnp.zeros_like(ids)
  got, info = _pos_text(model, params, ids, crit)
  want = _per_position_text(model, params, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert float(info["dropped"]) == 0
  # A cap below the distinct count drops (and counts) the largest ids' text.
  capped, _ = _model(max_distinct_items=4)
  got, info = _pos_text(capped, params, ids, crit)
  distinct_items = sorted(set(np.asarray(ids).ravel()) - {0, 21})
  kept = distinct_items[:3]  # slot 0 holds id 0 (padding / [MASK])
  dropped = int(np.isin(np.asarray(ids), distinct_items[3:]).sum())
  assert float(info["dropped"]) == dropped
  keep = np.isin(np.asarray(ids), kept)
  np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep],
                             atol=1e-5)
  assert np.all(np.asarray(got)[~keep] == 0)


def test_item_without_text_gets_no_text_vector():
  model, params = _model()
  vec = _vectors(model, params, jnp.array([3, 0, 21, 1]))
  np.testing.assert_allclose(np.asarray(vec[0]),
                             np.asarray(params["no_text"]), atol=1e-6)
  assert np.all(np.asarray(vec[1:3]) == 0)  # padding, [MASK]
  assert np.abs(np.asarray(vec[3])).sum() > 0


def test_critique_concatenated_with_slot_inputs():
  model, params = _model()
  ids = jnp.array([[1, 2, 21, 0]])
  crit = jnp.array([[0, 0, 4, 0]])
  text, _ = _pos_text(model, params, ids, crit, 1)
  t = model.tables
  # [MASK]: no item tokens, the critique's under the critique type.
  tokens, mask = t.critique_tokens[4:5], t.critique_mask[4:5]
  types = jnp.ones((1, TC), jnp.int32)
  want = _text_vectors(model, params, tokens, mask, types)
  np.testing.assert_allclose(np.asarray(text[0, 2]), np.asarray(want[0]),
                             atol=1e-5)
  # Other positions: unchanged item text; without critique the [MASK] is 0.
  plain, _ = _pos_text(model, params, ids, jnp.zeros_like(crit))
  np.testing.assert_allclose(np.asarray(text[0, :2]),
                             np.asarray(plain[0, :2]), atol=1e-6)
  assert np.all(np.asarray(plain[0, 2]) == 0)
  # Bidirectional: a critique on an item slot is ignored.
  text, _ = _pos_text(model, params, ids, jnp.array([[0, 5, 0, 0]]), 1)
  np.testing.assert_allclose(np.asarray(text), np.asarray(plain), atol=1e-6)
  # Causal: the slot reads [item tokens; critique tokens].
  causal, cparams = _model(causal=True)
  text, _ = _pos_text(causal, cparams, ids, jnp.array([[0, 5, 0, 0]]), 1)
  tokens = jnp.concatenate([t.item_tokens[2:3], t.critique_tokens[5:6]], 1)
  mask = jnp.concatenate([t.item_mask[2:3], t.critique_mask[5:6]], 1)
  types = jnp.array([[0] * T + [1] * TC])
  want = _text_vectors(causal, cparams, tokens, mask, types)
  np.testing.assert_allclose(np.asarray(text[0, 1]), np.asarray(want[0]),
                             atol=1e-5)


def test_scoring_reads_input_critiques_only():
  model, params = _model()
  batch = dict(item_ids=np.array([[1, 2, 5, 21, 0, 0, 0, 0, 0, 0]], np.int32),
               targets=np.array([[0, 0, 0, 6, 0, 0, 0, 0, 0, 0]], np.int32))
  score = jax.jit(model.score_fn)
  plain = score(params, batch)
  with_data = score(params, dict(
      batch, critique_ids=np.array([[0, 0, 0, 3] + [0] * 6], np.int32)))
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_data))
  critiqued = score(params, dict(
      batch, input_critique_ids=np.array([[0, 0, 0, 3] + [0] * 6], np.int32)))
  assert np.abs(np.asarray(critiqued) - np.asarray(plain)).max() > 1e-4


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_fused_table_equals_per_item_fused_embeddings(fusion):
  model, params = _model(eval_table="fused", fusion=fusion)
  table, _ = jax.jit(model._table_and_bias)(params)
  for item in (1, 3, 7, N):
    idv = model._apply(params, jnp.array([item]), method="id_vectors")
    txt = _vectors(model, params, jnp.array([item]))
    want = model._apply(params, idv, txt, method="fuse")
    np.testing.assert_allclose(np.asarray(table[item]), np.asarray(want[0]),
                               atol=1e-5)
  emb = jax.jit(model.item_embeddings)(params)
  np.testing.assert_allclose(np.asarray(emb), np.asarray(table[1:N + 1]))


def test_training_critiques():
  model, _ = _model(data_critique_rate=1.0, proxy_critique_rate=1.0,
                    ood_critique_ids=(int(_tables(128).item_category[5]),))
  cat = np.asarray(model.tables.item_category)
  targets = jnp.array([[4, 5, 6, 0]])
  crit_data = jnp.array([[2, 2, 0, 0]])
  slots = jnp.array([[True, True, True, False]])
  got = np.asarray(model.training_critiques(crit_data, targets, slots,
                                            jax.random.PRNGKey(0)))
  # Data critique when present; target 5's category is out of domain (no
  # critique at all); target 6 gets its category name (proxy).
  assert got[0, 0] == 2 and got[0, 1] == 0 and got[0, 2] == cat[6]
  assert got[0, 3] == 0
  none, _ = _model(data_critique_rate=0.0, proxy_critique_rate=0.0)
  assert not np.asarray(none.training_critiques(
      crit_data, targets, slots, jax.random.PRNGKey(0))).any()


@pytest.mark.parametrize("causal", [False, True])
def test_loss_sums_and_infonce(causal):
  model, params = _model(causal=causal, max_predictions=None if causal else 4)
  batch = _train_batch()
  loss, aux = jax.jit(model.loss_fn)(params, batch, None)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(
      float(loss), float(aux["loss_sum"]) / max(float(aux["weight_sum"]), 1),
      rtol=1e-6)
  # The InfoNCE part equals losses.info_nce over the batch's distinct items
  # with text (3 has none; 0 / 21 are no items).
  ids = np.asarray(batch["item_ids"])
  if causal:
    ids = np.where(batch["loss_weights"] > 0, batch["targets"], ids)
  items = sorted(set(ids.ravel()) - {0, 21, 3})
  idv = model._apply(params, jnp.array(items), method="id_vectors")
  txt = _vectors(model, params, jnp.array(items))
  want, n = losses.info_nce(idv, txt, model.infonce_temperature)
  np.testing.assert_allclose(float(aux["infonce_sum"]), float(want),
                             rtol=1e-5)
  assert float(aux["infonce_weight"]) == float(n) == len(items)
  no_nce, _ = _model(causal=causal, infonce_weight=0.0,
                     max_predictions=None if causal else 4)
  _, aux0 = jax.jit(no_nce.loss_fn)(params, batch, None)
  np.testing.assert_allclose(
      float(aux["loss_sum"]),
      float(aux0["loss_sum"]) + model.infonce_weight * float(want), rtol=1e-5)
  grads = jax.jit(jax.grad(
      lambda p: model.loss_fn(p, batch, jax.random.PRNGKey(2))[0]))(params)
  assert float(jnp.abs(grads["perceiver"]["latents"]).sum()) > 0


@pytest.mark.parametrize("table", ["id", "fused"])
def test_new_items_scored_with_mean_id_and_bias(table):
  model, params = _model(eval_table=table, new_items=np.array([5, 9]))
  plain, _ = _model(eval_table=table)
  got, bias = jax.jit(model._table_and_bias)(params)
  ref, ref_bias = jax.jit(plain._table_and_bias)(params)
  trained = [i for i in range(1, N + 1) if i not in (5, 9)]
  ids = np.asarray(params["backbone"]["item_embed"]["embedding"])
  b = np.asarray(params["backbone"]["output_bias"])
  mean_id, mean_bias = ids[trained].mean(0), b[trained].mean()
  np.testing.assert_allclose(np.asarray(bias)[[5, 9]], mean_bias, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(bias)[trained],
                                np.asarray(ref_bias)[trained])
  np.testing.assert_allclose(np.asarray(got)[trained],
                             np.asarray(ref)[trained], atol=1e-6)
  if table == "id":
    np.testing.assert_allclose(np.asarray(got)[[5, 9]],
                               np.stack([mean_id] * 2), atol=1e-6)
  else:  # mean ID + the item's own text
    txt = _vectors(model, params, jnp.array([5, 9]))
    want = model._apply(params, jnp.asarray(np.stack([mean_id] * 2)), txt,
                        method="fuse")
    np.testing.assert_allclose(np.asarray(got)[[5, 9]], np.asarray(want),
                               atol=1e-5)
