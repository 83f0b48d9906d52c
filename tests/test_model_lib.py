"""Bert4RecModel: losses vs NumPy, scoring, gradients, learning, sharding."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.models import bert4rec

N = 20
MASK = N + 1
# One small config for every test here (compiles dominate the run time);
# dropout is tested in test_bert4rec.py.
CFG = bert4rec.Bert4RecConfig(num_items=N, max_len=8, hidden=32, num_layers=1,
                              num_heads=2, mlp_dim=64, dropout_rate=0.0,
                              attention_dropout_rate=0.0)
LOG_POP = np.log(np.linspace(1.0, 3.0, N) / np.linspace(1.0, 3.0, N).sum())

# Three rows; row 2 has three masked positions, row 1 one, row 0 two.
ITEM_IDS = np.array([[1, MASK, 3, 4, MASK, 0, 0, 0],
                     [5, 6, 7, MASK, 9, 10, 11, 12],
                     [MASK, 14, MASK, 16, 17, MASK, 19, 0]], np.int32)
TARGETS = np.array([[0, 2, 0, 0, 5, 0, 0, 0],
                    [0, 0, 0, 8, 0, 0, 0, 0],
                    [13, 0, 2, 0, 0, 18, 0, 0]], np.int32)
BATCH = {"item_ids": ITEM_IDS, "targets": TARGETS,
         "loss_weights": (TARGETS > 0).astype(np.float32)}


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def make_model(**kwargs):
  return model_lib.Bert4RecModel(CFG, **kwargs)


@pytest.fixture(scope="module")
def boxed():
  return jax.jit(make_model().get_initial_variables)(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def params(boxed):
  return nn.meta.unbox(boxed)["params"]


@pytest.fixture(scope="module")
def all_logits(params):
  module = bert4rec.Bert4Rec(CFG)
  return np.asarray(jax.jit(lambda p: module.apply(
      {"params": p}, ITEM_IDS, method=bert4rec.Bert4Rec.all_logits))(params))


def value_and_grad(model):
  return jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))


def test_initial_variables_are_boxed(boxed):
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert set(boxed) == {"params"}
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned)
                        for x in leaves)
  specs = nn.get_partition_spec(jax.eval_shape(
      make_model().get_initial_variables, jax.random.PRNGKey(0)))
  assert specs["params"]["item_embed"]["embedding"] == P("vocab", "embed")


def test_full_loss_matches_numpy_and_gather_path(params, all_logits):
  lsm = np_log_softmax(all_logits)
  w = BATCH["loss_weights"]
  nll = -np.take_along_axis(lsm, TARGETS[..., None], -1)[..., 0]
  correct = (all_logits.argmax(-1) == TARGETS) & (w > 0)
  (loss, aux), grads = value_and_grad(make_model())(params, BATCH, None)
  np.testing.assert_allclose(aux["loss_sum"], (nll * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(aux["weight_sum"], w.sum())
  np.testing.assert_allclose(aux["correct_sum"], correct.sum())
  np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-5)

  # Logits only at the (<= 3) masked positions: the same sums and gradients.
  (loss3, aux3), grads3 = value_and_grad(make_model(max_predictions=3))(
      params, BATCH, None)
  for k in aux:
    np.testing.assert_allclose(aux3[k], aux[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               grads, grads3)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))

  # A cap below a row's masks truncates it: one prediction per row here.
  _, aux1 = jax.jit(make_model(max_predictions=1).loss_fn)(params, BATCH,
                                                           None)
  assert float(aux1["weight_sum"]) == 3.0


def test_in_batch_loss_matches_numpy(params):
  model = make_model(loss="in_batch", item_log_popularity=LOG_POP)
  (_, aux), grads = value_and_grad(model)(params, BATCH, None)
  module = bert4rec.Bert4Rec(CFG)
  q = np.asarray(jax.jit(lambda p: module.apply(
      {"params": p}, module.apply({"params": p}, ITEM_IDS),
      method=bert4rec.Bert4Rec.output_query))(params))
  table = np.asarray(params["item_embed"]["embedding"], np.float64)
  bias = np.asarray(params["output_bias"], np.float64)
  rows, cols = np.nonzero(TARGETS)
  tgt = TARGETS[rows, cols]
  qs = q[rows, cols]
  log_q = LOG_POP[tgt - 1]
  ref, ref_correct = 0.0, 0
  for i in range(len(tgt)):
    pos = qs[i] @ table[tgt[i]] + bias[tgt[i]] - log_q[i]
    cands = [pos] + [qs[i] @ table[t] + bias[t] - log_q[j]
                     for j, t in enumerate(tgt) if t != tgt[i]]
    ref -= np_log_softmax(np.asarray(cands))[0]
    ref_correct += int(np.argmax(cands) == 0)
  np.testing.assert_allclose(aux["loss_sum"], ref, rtol=1e-5)
  np.testing.assert_allclose(aux["weight_sum"], len(tgt))
  np.testing.assert_allclose(aux["correct_sum"], ref_correct)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("loss", ["sampled_uniform", "sampled_popularity"])
def test_sampled_losses_have_finite_gradients(params, loss):
  model = make_model(loss=loss, num_negatives=7, item_log_popularity=LOG_POP,
                     max_predictions=3)
  vg = value_and_grad(model)
  (l1, aux1), grads = vg(params, BATCH, jax.random.PRNGKey(1))
  (l2, _), _ = vg(params, BATCH, jax.random.PRNGKey(2))
  assert np.isfinite(l1) and float(l1) != float(l2)  # fresh negatives
  assert float(aux1["weight_sum"]) == 6.0
  assert 0 <= float(aux1["correct_sum"]) <= 6.0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.abs(grads["item_embed"]["embedding"]).sum() > 0


def test_score_fn_and_export(params, all_logits):
  model = make_model()
  eval_ids = ITEM_IDS.copy()
  eval_ids[eval_ids == MASK] = 4
  mask_pos = np.array([3, 7, 0])
  eval_ids[np.arange(3), mask_pos] = MASK
  batch = {"item_ids": eval_ids}

  @jax.jit
  def everything(params, batch):
    full = model.item_scores_from_hidden(params,
                                         model.hidden_at_mask(params, batch))
    logits = model.module.apply({"params": params}, batch["item_ids"],
                                method=bert4rec.Bert4Rec.all_logits)
    return (model.score_fn(params, batch), full, logits,
            model.query_at_mask(params, batch), model.item_embeddings(params),
            model.item_bias(params))

  scores, full, ref, q, emb, bias = map(np.asarray, everything(params, batch))
  assert scores.shape == (3, N) and scores.dtype == np.float32
  np.testing.assert_allclose(scores, ref[np.arange(3), mask_pos, 1:N + 1],
                             rtol=1e-5, atol=1e-5)
  assert full.shape == (3, CFG.padded_vocab)
  np.testing.assert_allclose(full[:, 1:N + 1], scores, rtol=1e-5, atol=1e-5)
  assert np.all(full[:, 0] <= -1e8) and np.all(full[:, N + 1:] <= -1e8)
  assert emb.shape == (N, CFG.hidden) and bias.shape == (N,)
  np.testing.assert_allclose(
      emb, np.asarray(params["item_embed"]["embedding"])[1:N + 1])
  np.testing.assert_allclose(q @ emb.T + bias, scores, rtol=1e-4, atol=1e-4)


def test_constructor_validation():
  with pytest.raises(ValueError, match="expected one of"):
    make_model(loss="softmax")
  with pytest.raises(ValueError, match="num_negatives"):
    make_model(loss="sampled_uniform")
  with pytest.raises(ValueError, match="item_log_popularity"):
    make_model(loss="sampled_popularity", num_negatives=4)
  with pytest.raises(ValueError, match=r"\(20,\)"):
    make_model(loss="in_batch", item_log_popularity=np.zeros(21))
  with pytest.raises(ValueError, match="max_predictions"):
    make_model(max_predictions=9)


def toy_batch(gen, batch, length, num_items, mask_prob=0.25):
  """Cyclic runs `s, s+1, ...` (next = prev + 1 mod N), cloze-masked."""
  start = gen.integers(0, num_items, size=(batch, 1))
  items = (start + np.arange(length)) % num_items + 1
  masked = gen.random((batch, length)) < mask_prob
  masked[np.arange(batch), gen.integers(0, length, size=batch)] = True
  return {"item_ids": np.where(masked, num_items + 1, items).astype(np.int32),
          "targets": np.where(masked, items, 0).astype(np.int32),
          "loss_weights": masked.astype(np.float32)}


def test_learns_next_equals_prev_plus_one(params):
  model = make_model(max_predictions=4)
  steps = 500
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 5e-3, 30, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    (_, aux), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        params, batch, None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  gen = np.random.default_rng(0)
  first_acc = None
  for _ in range(steps):
    batch = toy_batch(gen, 64, CFG.max_len, N)
    w = batch["loss_weights"]
    w[w.cumsum(1) > 4] = 0  # the pipeline's cap on predictions per row
    params, opt_state, aux = step(params, opt_state, batch)
    if first_acc is None:
      first_acc = float(aux["correct_sum"] / aux["weight_sum"])
  assert first_acc < 0.3, first_acc

  # Next-item prediction in the evaluation format: [MASK] at the end.
  items = (np.arange(N)[:, None] + np.arange(CFG.max_len)) % N + 1
  eval_ids = items.copy()
  eval_ids[:, -1] = MASK
  scores = np.asarray(jax.jit(model.score_fn)(params, {"item_ids": eval_ids}))
  hit1 = np.mean(scores.argmax(1) + 1 == items[:, -1])
  assert hit1 >= 0.9, hit1
  # And the cloze accuracy on fresh batches.
  batch = toy_batch(np.random.default_rng(1), 64, CFG.max_len, N)
  w = batch["loss_weights"]
  w[w.cumsum(1) > 4] = 0
  _, _, aux = step(params, opt_state, batch)
  acc = float(aux["correct_sum"] / aux["weight_sum"])
  assert acc > 0.9, acc


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import flax.linen as nn, jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from recsys_jax.model_lib import sequence as model_lib
    from recsys_jax.models import bert4rec
    cfg = bert4rec.Bert4RecConfig(num_items=200, max_len=8, hidden=16,
                                  num_layers=1, num_heads=2, mlp_dim=32)
    model = model_lib.Bert4RecModel(cfg, max_predictions=3)
    rules = [("batch", "data"), ("vocab", "model"), ("mlp", "model"),
             ("heads", "model")]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    gen = np.random.default_rng(0)
    ids = gen.integers(1, 201, size=(8, 8)).astype(np.int32)
    masked = gen.random((8, 8)) < 0.3
    masked[:, 7] = True
    batch = {"item_ids": np.where(masked, 201, ids).astype(np.int32),
             "targets": np.where(masked, ids, 0).astype(np.int32),
             "loss_weights": masked.astype(np.float32)}
    rng = jax.random.PRNGKey(0)
    params = nn.meta.unbox(jax.jit(model.get_initial_variables)(rng))["params"]
    def loss_and_scores(params, batch):
      return model.loss_fn(params, batch, None), model.score_fn(params, batch)
    (ref_loss, ref_aux), ref_scores = jax.jit(loss_and_scores)(params, batch)
    with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
      abstract = jax.eval_shape(model.get_initial_variables, rng)["params"]
      shardings = nn.logical_to_mesh_sharding(
          nn.get_partition_spec(abstract), mesh, rules)
      sharded = jax.device_put(params, shardings)
      emb = sharded["item_embed"]["embedding"]
      assert emb.sharding.spec == P("model", None), emb.sharding.spec
      (loss, aux), scores = jax.jit(loss_and_scores)(sharded, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["correct_sum"], ref_aux["correct_sum"])
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    print("SHARDED_OK", float(loss))
""")


def test_vocab_sharded_matches_single_device():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, repo],
                       capture_output=True, text=True, env=env, timeout=300)
  assert "SHARDED_OK" in out.stdout, out.stdout + out.stderr[-3000:]


# -- causal (SASRec-style) mode ---------------------------------------------

CAUSAL_CFG = bert4rec.Bert4RecConfig(
    num_items=N, max_len=8, hidden=32, num_layers=1, num_heads=2, mlp_dim=64,
    dropout_rate=0.0, attention_dropout_rate=0.0, causal=True,
    output_transform=False)


def test_next_item_batch_by_hand():
  # Row 0: one user with two masked items; row 1: two packed users.
  batch = {"item_ids": np.array([[4, MASK, 6, MASK, 0],
                                 [1, 2, MASK, 7, 8]], np.int32),
           "targets": np.array([[0, 5, 0, 9, 0], [0, 0, 3, 0, 0]], np.int32),
           "loss_weights": np.array([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]],
                                    np.float32),
           "segment_ids": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 2, 2]])}
  restored, targets, weights = model_lib.next_item_batch(batch)
  np.testing.assert_array_equal(restored["item_ids"],
                                [[4, 5, 6, 9, 0], [1, 2, 3, 7, 8]])
  np.testing.assert_array_equal(targets, [[5, 6, 9, 0, 0], [2, 3, 0, 8, 0]])
  np.testing.assert_array_equal(weights, targets > 0)
  # Unpacked rows: the nonzero ids are one sequence.
  del batch["segment_ids"]
  _, targets, _ = model_lib.next_item_batch(batch)
  np.testing.assert_array_equal(targets[0], [5, 6, 9, 0, 0])


def test_causal_loss_matches_numpy_and_scores_from_last_item():
  model = model_lib.Bert4RecModel(CAUSAL_CFG, max_predictions=2)
  module = bert4rec.Bert4Rec(CAUSAL_CFG)
  params = nn.meta.unbox(jax.jit(model.get_initial_variables)(
      jax.random.PRNGKey(3)))["params"]
  items = np.array([[3, 8, 2, 11, 6, 0, 0, 0],
                    [5, 1, 19, 4, 7, 9, 13, 10]], np.int32)
  # The same rows cloze-masked: the causal loss restores them.
  masked = items.copy()
  masked[0, 1], masked[1, 5] = MASK, MASK
  targets = np.where(masked == MASK, items, 0)
  batch = {"item_ids": masked, "targets": targets,
           "loss_weights": (targets > 0).astype(np.float32)}
  logits = np.asarray(jax.jit(lambda p: module.apply(
      {"params": p}, items, method=bert4rec.Bert4Rec.all_logits))(params))
  lsm = np_log_softmax(logits)
  nxt = np.concatenate([items[:, 1:], np.zeros((2, 1), np.int32)], 1)
  w = ((items > 0) & (nxt > 0)).astype(np.float64)
  nll = -np.take_along_axis(lsm, nxt[..., None], -1)[..., 0]
  (loss, aux), grads = value_and_grad(model)(params, batch, None)
  assert float(aux["weight_sum"]) == w.sum() == 11  # max_predictions unused
  np.testing.assert_allclose(aux["loss_sum"], (nll * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))

  # Causal: a later item never changes an earlier hidden state.
  changed = items.copy()
  changed[1, 6:] = [2, 3]
  h = jax.jit(lambda p, x: module.apply({"params": p}, x))
  np.testing.assert_allclose(np.asarray(h(params, changed))[1, :6],
                             np.asarray(h(params, items))[1, :6],
                             rtol=1e-5, atol=1e-6)

  # Scoring the evaluation row (history + [MASK]) uses the last history
  # item's hidden state: the logits of position 3 of the plain history.
  eval_ids = np.array([[3, 8, 2, 11, MASK, 0, 0, 0]], np.int32)
  scores = np.asarray(jax.jit(model.score_fn)(params, {"item_ids": eval_ids}))
  np.testing.assert_allclose(scores[0], logits[0, 3, 1:N + 1], rtol=1e-5,
                             atol=1e-5)


def test_causal_config_needs_positions_from_start():
  with pytest.raises(ValueError, match="causal=True needs positions_from_end"):
    bert4rec.Bert4RecConfig(num_items=N, causal=True, positions_from_end=True)
