"""ILM phase 1 (model_lib/ilm_pretrain.py): losses against NumPy, the wrapper.

The loss functions are checked against loop-by-loop NumPy references on tiny
inputs; the wrapper gets one jitted gradient step per batch kind (compiled
with XLA's fast options: the tiny programs compile in seconds).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.model_lib import base
from recsys_jax.model_lib import ilm_pretrain as ilm
from recsys_jax.model_lib import losses
from recsys_jax.models import qformer as qformer_lib

# -- NumPy references ---------------------------------------------------------


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max()
  return z - m - np.log(np.exp(z - m).sum())


def np_contrastive(logits, positive, weights, ls=0.0, exclude=None):
  """Loop reference of `contrastive_loss`: (loss sum, correct sum)."""
  b = len(weights)
  exclude = np.zeros((b, b), bool) if exclude is None else exclude
  total = correct = 0.0
  for z_all, pos_all, excl in ((logits, positive, exclude),
                               (logits.T, positive.T, exclude.T)):
    for i in range(b):
      if weights[i] == 0:
        continue
      cand = [j for j in range(b) if j == i or (
          weights[j] > 0 and not excl[i, j])]
      pos = [j for j in cand if j == i or pos_all[i, j]]
      logp = _log_softmax(z_all[i, cand])
      target = np.array([(1 - ls) * (j in pos) / len(pos) + ls / len(cand)
                         for j in cand])
      total += 0.5 * weights[i] * -(target * logp).sum()
      correct += 0.5 * weights[i] * (cand[int(np.argmax(z_all[i, cand]))]
                                     in pos)
  return total, correct


def np_itc_sim(item_feats, text_feats, temperature):
  b = item_feats.shape[0]
  sim = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      sim[i, j] = max(item_feats[i, n] @ text_feats[j]
                      for n in range(item_feats.shape[1])) / temperature
  return sim


def np_itg(logits, tokens, weights, ls):
  total = rows = 0.0
  for r in range(tokens.shape[0]):
    per_token = []
    for t in range(tokens.shape[1] - 1):
      target = tokens[r, t + 1]
      if target == 0:
        continue
      logp = _log_softmax(logits[r, t])
      per_token.append(-(1 - ls) * logp[target] - ls * logp.mean())
    if per_token and weights[r] > 0:
      total += weights[r] * np.mean(per_token)
      rows += weights[r]
  return total, rows


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- the pure losses ----------------------------------------------------------


def test_temperature_clamped_like_blip():
  got = ilm.clamp_temperature(jnp.array([1e-5, 0.07, 2.0]))
  np.testing.assert_allclose(np.asarray(got), [0.001, 0.07, 0.5], rtol=1e-6)


def test_itc_max_over_queries_and_duplicate_items_as_positives():
  rng = np.random.default_rng(0)
  b, n, e = 5, 3, 4
  item = _unit(rng.normal(size=(b, n, e))).astype(np.float32)
  text = _unit(rng.normal(size=(b, e))).astype(np.float32)
  items = np.array([3, 5, 3, 7, 0])       # rows 0 and 2: one item; 4: padding
  weights = (items > 0).astype(np.float32)
  sim = ilm.itc_similarity(item, text, jnp.float32(0.05))
  want_sim = np_itc_sim(item.astype(np.float64), text.astype(np.float64),
                        0.05)
  np.testing.assert_allclose(np.asarray(sim), want_sim, rtol=1e-5, atol=1e-4)
  same = items[:, None] == items[None, :]
  loss, correct, count = ilm.contrastive_loss(
      jnp.asarray(want_sim, jnp.float32), jnp.asarray(same),
      jnp.asarray(weights), label_smoothing=0.1)
  want_loss, want_correct = np_contrastive(want_sim, same, weights, ls=0.1)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(correct), want_correct, atol=1e-6)
  assert float(count) == 4.0
  # Soft targets matter: with the duplicate counted as a negative the loss
  # differs.
  hard, _, _ = ilm.contrastive_loss(jnp.asarray(want_sim, jnp.float32),
                                    jnp.eye(b, dtype=bool),
                                    jnp.asarray(weights), label_smoothing=0.1)
  assert abs(float(hard) - want_loss) > 1e-3


def test_contrastive_without_duplicates_is_info_nce():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(4, 6)).astype(np.float32)
  b = rng.normal(size=(4, 6)).astype(np.float32)
  w = np.array([1.0, 1.0, 0.0, 1.0], np.float32)
  want, want_n = losses.info_nce(jnp.asarray(a), jnp.asarray(b), 0.1,
                                 weights=jnp.asarray(w))
  logits = _unit(a) @ _unit(b).T / 0.1
  got, _, n = ilm.contrastive_loss(jnp.asarray(logits, jnp.float32),
                                   jnp.eye(4, dtype=bool), jnp.asarray(w))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  assert float(n) == float(want_n) == 3.0


def test_item_item_infonce_positives_and_excluded_self_matches():
  rng = np.random.default_rng(2)
  a_items = np.array([3, 4, 3, 6, 8])
  b_items = np.array([4, 6, 9, 1, 4])
  # (3, 4), (3, 9): row 0 and 2 share item 3; rows 0 and 4 share partner 4;
  # b_0 = 4 = a_1: item 4 is no candidate of itself.
  w = np.array([1.0, 1.0, 1.0, 1.0, 1.0], np.float32)
  logits = rng.normal(size=(5, 5)) * 3
  positive = ((a_items[:, None] == a_items[None, :])
              | (b_items[:, None] == b_items[None, :]))
  exclude = (a_items[:, None] == b_items[None, :]) & ~positive
  assert exclude[1, 0] and exclude[3, 1]
  got, correct, n = ilm.contrastive_loss(
      jnp.asarray(logits, jnp.float32), jnp.asarray(positive),
      jnp.asarray(w), exclude=jnp.asarray(exclude))
  want, want_correct = np_contrastive(logits, positive, w, exclude=exclude)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(float(correct), want_correct, atol=1e-6)
  assert float(n) == 5.0


def test_itm_negatives_never_positive_nor_same_item_and_follow_softmax():
  items = jnp.array([1, 2, 1, 3, 0])      # row 4 is padding
  weights = (items > 0).astype(jnp.float32)
  sim = jnp.array(np.random.default_rng(3).normal(size=(5, 5)) * 2,
                  jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  draw = jax.jit(jax.vmap(lambda k: ilm.itm_negatives(k, sim, items,
                                                      weights)))
  neg_item, has_item, neg_text, has_text = (np.asarray(x) for x in draw(keys))
  items_np, sim_np = np.asarray(items), np.asarray(sim)
  for neg, has, logits in ((neg_text, has_text, sim_np),
                           (neg_item, has_item, sim_np.T)):
    for i in range(4):
      assert has[:, i].all()
      drawn = neg[:, i]
      assert (items_np[drawn] != items_np[i]).all()   # never same item
      assert (drawn != 4).all()                       # never padding
      cand = [j for j in range(5) if items_np[j] not in (0, items_np[i])]
      p = np.exp(logits[i, cand] - logits[i, cand].max())
      p /= p.sum()
      freq = np.array([(drawn == j).mean() for j in cand])
      np.testing.assert_allclose(freq, p, atol=0.04)
  # No candidate at all: flagged, and the row itself is returned.
  same = jnp.array([5, 5, 5])
  out = ilm.itm_negatives(jax.random.PRNGKey(1), sim[:3, :3], same,
                          jnp.ones(3))
  np.testing.assert_array_equal(np.asarray(out[0]), [0, 1, 2])
  assert not np.asarray(out[1]).any() and not np.asarray(out[3]).any()


def test_itm_loss_value():
  logits = np.array([[0.2, 1.5], [2.0, -1.0], [0.3, 0.1], [1.0, 1.2]])
  labels = np.array([1, 0, 1, 0])
  weights = np.array([1.0, 1.0, 0.0, 1.0])
  loss, correct, n = ilm.itm_loss(jnp.asarray(logits, jnp.float32),
                                  jnp.asarray(labels), jnp.asarray(weights))
  want = sum(-w * _log_softmax(z)[y]
             for z, y, w in zip(logits, labels, weights))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(correct) == 2.0 and float(n) == 3.0  # rows 0, 1 right; 3 not


def test_itg_decoder_tokens_and_loss():
  tokens = np.array([[7, 4, 5, 6, 0],
                     [7, 9, 0, 0, 0],
                     [7, 0, 0, 0, 0],      # CLS only: no target
                     [0, 0, 0, 0, 0],      # padding row
                     [7, 3, 3, 2, 8]])
  dec = ilm.itg_decoder_tokens(jnp.asarray(tokens), 11)
  want_dec = tokens.copy()
  want_dec[[0, 1, 2, 4], 0] = 11
  np.testing.assert_array_equal(np.asarray(dec), want_dec)
  logits = np.random.default_rng(4).normal(size=(5, 5, 12)) * 2
  weights = np.array([1.0, 0.5, 1.0, 1.0, 1.0])
  for ls in (0.0, 0.1):
    got, rows = ilm.itg_loss(jnp.asarray(logits, jnp.float32),
                             jnp.asarray(tokens), jnp.asarray(weights),
                             label_smoothing=ls)
    want, want_rows = np_itg(logits, tokens, weights, ls)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(rows) == want_rows == 2.5


def test_mean_history_memory():
  table = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
  history = np.array([[1, 3, 0], [0, 0, 0], [5, 5, 2]])
  memory, has = ilm.mean_history_memory(jnp.asarray(table),
                                        jnp.asarray(history), 2)
  want = np.stack([table[[1, 3]].mean(0), np.zeros(4),
                   table[[5, 5, 2]].mean(0)]).reshape(3, 2, 2)
  np.testing.assert_allclose(np.asarray(memory), want, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(has), [True, False, True])


# -- the wrapper --------------------------------------------------------------

# XLA:CPU options that compile these tiny programs several times faster
# (the fusion emitters alone cost more than half the compile time).
_FAST = {"xla_backend_optimization_level": 0,
         "xla_llvm_disable_expensive_passes": True,
         "xla_cpu_use_fusion_emitters": False}
CFG = qformer_lib.QFormerConfig(vocab_size=24, hidden=8, num_layers=1,
                                num_heads=2, mlp_dim=16, num_queries=2,
                                memory_dim=4, max_text_len=6,
                                dropout_rate=0.0, attention_dropout_rate=0.0)
CLS, DEC = 1, 2
TEXT_BATCH = {
    "item": np.array([3, 4, 3, 7], np.int32),     # item 3 twice
    "text_tokens": np.array([[CLS, 5, 6, 7, 0, 0], [CLS, 8, 9, 0, 0, 0],
                             [CLS, 5, 6, 7, 0, 0], [CLS, 3, 4, 5, 6, 7]],
                            np.int32),
    "task_index": np.zeros(4, np.int32)}
PAIR_BATCH = {"item": np.array([3, 4, 5, 7], np.int32),
              "pair_item": np.array([4, 5, 6, 3], np.int32),
              "task_index": np.ones(4, np.int32)}
USER_BATCH = {"item": np.array([3, 4, 5, 7], np.int32),
              "user_items": np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6],
                                      [0, 0, 0]], np.int32),
              "task_index": np.full(4, 2, np.int32)}


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST)(*args)


def _table():
  table = np.random.default_rng(5).normal(size=(11, 8)).astype(np.float32)
  table[0] = 0.0
  return table


_CACHE = {}


def _model(config=CFG, **weights):
  """(model, params); params are shared by every weight setting (and
  dropout rate)."""
  model = ilm.ILMPretrainModel(config, _table(), num_chunks=2, embed_dim=4,
                               cls_id=CLS, dec_id=DEC, **weights)
  if "params" not in _CACHE:
    variables = _compiled(model.get_initial_variables, jax.random.PRNGKey(0))
    _CACHE["params"] = nn.meta.unbox(variables["params"])
  return model, _CACHE["params"]


def _grad_step(model, params, batch, rng):
  return _compiled(jax.grad(model.loss_fn, has_aux=True), params, batch, rng)


def _norm(tree):
  return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _check_sums(model, aux):
  assert set(aux) == set(model.metric_sums())
  for v in aux.values():
    assert v.shape == () and v.dtype == jnp.float32


def test_item_text_step_all_losses():
  model, params = _model(dataclasses.replace(
      CFG, dropout_rate=0.1, attention_dropout_rate=0.1))
  grads, aux = _grad_step(model, params, TEXT_BATCH, jax.random.PRNGKey(1))
  _check_sums(model, aux)
  aux = {k: float(v) for k, v in aux.items()}
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
  for name in ("qformer", "itc_item_proj", "itc_text_proj", "itm_head",
               "temperature"):
    assert _norm(grads[name]) > 0, name
  assert _norm(grads["qformer"]["lm_head"]) > 0
  assert aux[base.WEIGHT_SUM] == aux[ilm.TEXT_ROWS] == 4.0
  assert aux[ilm.ITM_PAIRS] == 12.0   # every row has a negative of each kind
  np.testing.assert_allclose(
      aux[base.LOSS_SUM],
      aux[ilm.ITC_SUM] + aux[ilm.ITM_SUM] / 3 + aux[ilm.ITG_SUM], rtol=1e-5)
  for k in (ilm.ITEM_ITEM_SUM, ilm.ITEM_ITEM_ROWS, ilm.USER_ITEM_SUM,
            ilm.USER_ITEM_ROWS):
    assert aux[k] == 0.0
  summary = model.summarize_metrics(aux)
  assert set(summary) == {"loss", "itc", "itc_acc", "itg", "itm", "itm_acc"}
  np.testing.assert_allclose(summary["itm"], aux[ilm.ITM_SUM] / 12, rtol=1e-6)


def test_itc_only_matches_reference_and_switched_off_heads_get_no_gradient():
  model, params = _model(itm_weight=0.0, itg_weight=0.0)
  grads, aux = _grad_step(model, params, TEXT_BATCH, None)
  _check_sums(model, aux)
  # Switched-off losses: exactly zero gradient to their heads, zero sums.
  for leaf in jax.tree.leaves(grads["itm_head"]):
    assert not np.asarray(leaf).any()
  for leaf in jax.tree.leaves(grads["qformer"]["lm_head"]):
    assert not np.asarray(leaf).any()
  assert float(aux[ilm.ITM_SUM]) == float(aux[ilm.ITG_SUM]) == 0.0
  assert float(aux[ilm.ITM_PAIRS]) == 0.0
  assert _norm(grads["temperature"]) > 0
  # The wrapper's ITC is the reference on its own features.
  items, tokens = TEXT_BATCH["item"], TEXT_BATCH["text_tokens"]
  item_feats, text_feats = _compiled(
      lambda p: (model.item_features(p, items), model.text_features(p, tokens)),
      params)
  assert item_feats.shape == (4, CFG.num_queries, 4)
  assert text_feats.shape == (4, 4)
  np.testing.assert_allclose(np.linalg.norm(item_feats, axis=-1), 1.0,
                             rtol=1e-5)
  np.testing.assert_array_equal(item_feats[0], item_feats[2])  # same item
  sim = np_itc_sim(np.asarray(item_feats, np.float64),
                   np.asarray(text_feats, np.float64), 0.07)
  want, want_correct = np_contrastive(sim, items[:, None] == items[None, :],
                                      np.ones(4), ls=0.1)
  np.testing.assert_allclose(float(aux[ilm.ITC_SUM]), want, rtol=1e-4)
  np.testing.assert_allclose(float(aux[ilm.ITC_CORRECT]), want_correct)
  assert set(model.summarize_metrics(
      {k: float(v) for k, v in aux.items()})) == {"loss", "itc", "itc_acc"}


@pytest.mark.parametrize("batch,kind", [(PAIR_BATCH, "item_item"),
                                        (USER_BATCH, "user_item")])
def test_pair_steps(batch, kind):
  model, params = _model()
  grads, aux = _grad_step(model, params, batch, None)
  _check_sums(model, aux)
  aux = {k: float(v) for k, v in aux.items()}
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
  for name in ("qformer", "itc_item_proj", "temperature"):
    assert _norm(grads[name]) > 0, name
  for name in ("itc_text_proj", "itm_head"):
    assert _norm(grads[name]) == 0.0, name
  rows = 4.0 if kind == "item_item" else 3.0  # a user without history
  assert aux[f"{kind}_rows"] == aux[base.WEIGHT_SUM] == rows
  assert aux[base.LOSS_SUM] == aux[f"{kind}_sum"] > 0
  assert aux[ilm.TEXT_ROWS] == aux[ilm.ITC_SUM] == 0.0
  assert set(model.summarize_metrics(aux)) == {"loss", kind}
  if kind == "item_item":  # the wrapper's loss is the reference's
    a_items, b_items = batch["item"], batch["pair_item"]
    a, b = _compiled(lambda p: (model.pooled_item_features(p, a_items),
                                model.pooled_item_features(p, b_items)),
                     params)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-5)
    positive = ((a_items[:, None] == a_items[None, :])
                | (b_items[:, None] == b_items[None, :]))
    exclude = (a_items[:, None] == b_items[None, :]) & ~positive
    assert exclude.sum() == 3  # items 4, 5 and 3 are each other's partners
    logits = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T / 0.07
    want, _ = np_contrastive(logits, positive, np.ones(4), exclude=exclude)
    np.testing.assert_allclose(aux[ilm.ITEM_ITEM_SUM], want, rtol=1e-4)


def test_zero_weight_pair_loss_is_not_computed():
  model, params = _model(user_item_weight=0.0)
  (loss, aux), grads = _compiled(
      jax.value_and_grad(model.loss_fn, has_aux=True), params, USER_BATCH,
      None)
  _check_sums(model, aux)
  assert float(loss) == 0.0 and float(aux[ilm.USER_ITEM_SUM]) == 0.0
  assert float(aux[ilm.USER_ITEM_ROWS]) == 3.0
  assert _norm(grads) == 0.0
  assert "user_item" not in model.summarize_metrics(
      {k: float(v) for k, v in aux.items()})


def test_summaries_divide_by_their_own_counts():
  model, _ = _model()
  sums = {k: 0.0 for k in model.metric_sums()}
  sums.update({base.LOSS_SUM: 30.0, base.WEIGHT_SUM: 10.0,
               ilm.TEXT_ROWS: 4.0, ilm.ITC_SUM: 8.0, ilm.ITC_CORRECT: 3.0,
               ilm.ITG_SUM: 12.0, ilm.ITM_SUM: 6.0, ilm.ITM_CORRECT: 9.0,
               ilm.ITM_PAIRS: 12.0, ilm.USER_ITEM_SUM: 5.0,
               ilm.USER_ITEM_ROWS: 6.0})
  assert model.summarize_metrics(sums) == {
      "loss": 3.0, "itc": 2.0, "itc_acc": 0.75, "itg": 3.0, "itm": 0.5,
      "itm_acc": 0.75, "user_item": 5.0 / 6.0}


def test_bad_configurations():
  table = _table()
  with pytest.raises(ValueError, match="memory_dim"):
    ilm.ILMPretrainModel(CFG, table, num_chunks=4, cls_id=CLS, dec_id=DEC)
  with pytest.raises(ValueError, match="at least one"):
    ilm.ILMPretrainModel(CFG, table, num_chunks=2, cls_id=CLS, dec_id=DEC,
                         itc_weight=0, itg_weight=0, itm_weight=0,
                         item_item_weight=0, user_item_weight=0)
  with pytest.raises(ValueError, match="dec_id"):
    ilm.ILMPretrainModel(CFG, table, num_chunks=2, cls_id=CLS, dec_id=CLS)
  with pytest.raises(ValueError, match="vocab_size"):
    ilm.ILMPretrainModel(CFG, table, num_chunks=2, cls_id=CLS, dec_id=99)
  model, params = _model()
  with pytest.raises(ValueError, match="name no task"):
    model.loss_fn(params, {"item": np.ones(2, np.int32)}, None)
