"""REGEN's item tables (ALS, export, text cache) and soft-token module
against NumPy references."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.data import prepared
from recsys_jax.model_lib import item_embeddings as ie
from recsys_jax.models import item_soft_tokens as ist
from tests import helpers

# -- ALS -----------------------------------------------------------------------


def _dense_als(counts, y, *, reg, alpha, iterations):
  """Implicit ALS on a dense [U, I] count matrix: every row's normal
  equations over ALL items (C_u = diag(1 + alpha n_u), p_u = n_u > 0)."""
  p = (counts > 0).astype(np.float64)
  c = 1.0 + alpha * counts
  u_n, i_n = counts.shape
  dim = y.shape[1]
  x = np.zeros((u_n, dim))
  for _ in range(iterations):
    for u in range(u_n):
      if counts[u].sum() == 0:
        x[u] = 0
        continue
      a = y.T @ (c[u][:, None] * y) + reg * np.eye(dim)
      x[u] = np.linalg.solve(a, y.T @ (c[u] * p[u]))
    for i in range(i_n):
      if counts[:, i].sum() == 0:
        y[i] = 0
        continue
      a = x.T @ (c[:, i][:, None] * x) + reg * np.eye(dim)
      y[i] = np.linalg.solve(a, x.T @ (c[:, i] * p[:, i]))
  return x, y


# Users 0..4 over items 0..5; repeats count; item 5 is never seen. With
# dim 3, rows with < 3 distinct partners take the Woodbury path, the rest
# the direct d x d solve: both are covered.
_USERS = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4, 2])
_ITEMS = np.array([0, 1, 1, 2, 1, 3, 4, 0, 1, 2, 3, 2, 4, 0, 4])


@pytest.mark.parametrize("iterations", [1, 2])
def test_als_factors_match_dense_solve(iterations):
  dim, reg, alpha = 3, 0.1, 10.0
  init = np.random.default_rng(1).normal(size=(6, dim))
  x, y = ie.als_factors(_USERS, _ITEMS, 5, 6, dim=dim, regularization=reg,
                        alpha=alpha, iterations=iterations, item_init=init)
  counts = np.zeros((5, 6))
  np.add.at(counts, (_USERS, _ITEMS), 1)
  rx, ry = _dense_als(counts, init.copy(), reg=reg, alpha=alpha,
                      iterations=iterations)
  np.testing.assert_allclose(x, rx, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(y, ry, rtol=1e-9, atol=1e-12)
  assert np.all(y[5] == 0)


def test_als_factors_long_rows_and_chunks(monkeypatch):
  """Many chunks of mixed widths (tiny block budget) against the dense
  solve, with rows wider than dim on both sides."""
  monkeypatch.setattr(ie, "_ALS_BLOCK_ELEMENTS", 40)
  rng = np.random.default_rng(0)
  users = rng.integers(0, 12, 150)
  items = rng.integers(0, 9, 150)
  init = rng.normal(size=(9, 4))
  x, y = ie.als_factors(users, items, 12, 9, dim=4, regularization=0.5,
                        alpha=3.0, iterations=2, item_init=init)
  counts = np.zeros((12, 9))
  np.add.at(counts, (users, items), 1)
  rx, ry = _dense_als(counts, init.copy(), reg=0.5, alpha=3.0, iterations=2)
  np.testing.assert_allclose(x, rx, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(y, ry, rtol=1e-8, atol=1e-12)


def test_als_factors_rejects_bad_hyperparameters():
  with pytest.raises(ValueError, match="regularization"):
    ie.als_factors(_USERS, _ITEMS, 5, 6, dim=3, regularization=0.0)


# Hand-made dataset: items a..h = vocabulary ids 1..8. 'g' occurs only as
# a validation / test target, 'h' nowhere: both are missing from the CF fit.
_VOCAB = ["a", "b", "c", "d", "e", "f", "g", "h"]
_SEQUENCES = [["a", "b", "a", "c", "g"],   # train part a b a
              ["b", "c", "d", "g", "e"],   # train part b c d (e elsewhere)
              ["e", "f", "g"],             # train part e
              ["c", "d", "e", "f", "a", "b"]]


@pytest.fixture(scope="module")
def hand_data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("regen_hand"))
  users = [prepared.UserRecord(user_id=f"u{k}", item_ids=list(seq))
           for k, seq in enumerate(_SEQUENCES)]
  prepared.write_prepared(out, users, vocab=_VOCAB, text_vocab_size=None)
  return out


def _train_counts():
  counts = np.zeros((len(_SEQUENCES), len(_VOCAB) + 1))
  for u, seq in enumerate(_SEQUENCES):
    for item in seq[:-2]:
      counts[u, _VOCAB.index(item) + 1] += 1
  return counts


def test_read_train_interactions(hand_data):
  users, items, n = ie.read_train_interactions(hand_data)
  assert n == 8
  got = np.zeros((4, 9))
  np.add.at(got, (users, items), 1)
  np.testing.assert_array_equal(got, _train_counts())


def test_fit_als_on_train_split(hand_data):
  dim = 3
  table, missing = ie.fit_als(hand_data, dim=dim, iterations=2, seed=7)
  assert table.shape == (9, dim) and table.dtype == np.float32
  # 0 = padding, 7 = 'g' (only validation/test targets), 8 = 'h' (unused).
  np.testing.assert_array_equal(np.nonzero(missing)[0], [0, 7, 8])
  assert np.all(table[missing] == 0)
  init = ie.als_factors(np.zeros(0), np.zeros(0), 0, 9, dim=dim,
                        iterations=0, seed=7)[1]
  _, ry = _dense_als(_train_counts(), init, reg=0.1, alpha=10.0,
                     iterations=2)
  np.testing.assert_allclose(table[~missing], ry[~missing], rtol=1e-5,
                             atol=1e-6)
  again, _ = ie.fit_als(hand_data, dim=dim, iterations=2, seed=7)
  np.testing.assert_array_equal(again, table)
  other, _ = ie.fit_als(hand_data, dim=dim, iterations=2, seed=8)
  assert not np.allclose(other, table)


# -- exported and cached tables ------------------------------------------------


def test_cf_from_export(tmp_path):
  emb = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
  emb[2] = 0  # item 3: an all-zero row
  export_dir = tmp_path / "export"
  export_dir.mkdir()
  np.save(export_dir / "item_embeddings.npy", emb)
  table, missing = ie.cf_from_export(str(export_dir), 4)
  np.testing.assert_array_equal(table[1:], emb)
  np.testing.assert_array_equal(table[0], 0)
  np.testing.assert_array_equal(missing, [True, False, False, True, False])
  direct, _ = ie.cf_from_export(str(export_dir / "item_embeddings.npy"), 4)
  np.testing.assert_array_equal(direct, table)
  with pytest.raises(ValueError) as e:
    ie.cf_from_export(str(export_dir), 5)
  assert "item_embeddings.npy" in str(e.value)
  assert "(4, 3)" in str(e.value) and "5" in str(e.value)
  with pytest.raises(FileNotFoundError, match="item_embeddings.npy"):
    ie.cf_from_export(str(tmp_path), 4)


def test_semantic_from_cache(tmp_path):
  pooled = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  pooled[1] = 0  # item 2: all-zero pooled vector
  texts = ["one", "two", "", "four", "five"]  # item 3: empty text
  path = str(tmp_path / "cache")
  helpers.write_item_text_cache(path, pooled, texts)
  table, missing = ie.semantic_from_cache(path, 5)
  np.testing.assert_array_equal(missing,
                                [True, False, True, True, False, False])
  np.testing.assert_array_equal(table[[1, 4, 5]], pooled[[0, 3, 4]])
  assert np.all(table[missing] == 0)
  with pytest.raises(ValueError, match="5 item rows.*6 items"):
    ie.semantic_from_cache(path, 6)


def test_load_item_tables(hand_data, tmp_path, capsys):
  pooled = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
  path = str(tmp_path / "cache")
  helpers.write_item_text_cache(path, pooled, ["t"] * 7 + [""])
  tables = ie.load_item_tables(hand_data, item_text_cache=path, cf_dim=3,
                               als_iterations=1)
  assert tables.cf.shape == (9, 3) and tables.semantic.shape == (9, 4)
  assert tables.identity()["cf_missing"] == 2
  assert tables.identity()["semantic_missing"] == 1
  err = capsys.readouterr().err
  assert "CF 3-d" in err and "2 of 8 items missing" in err
  assert "semantic 4-d" in err and "1 of 8 items missing" in err
  no_text = ie.load_item_tables(hand_data, cf_dim=3, als_iterations=1)
  assert no_text.semantic.shape == (9, 0)
  # An export: items never in the train split are missing too.
  emb = np.ones((8, 2), np.float32)
  np.save(tmp_path / "emb.npy", emb)
  exported = ie.load_item_tables(hand_data, cf=str(tmp_path / "emb.npy"))
  np.testing.assert_array_equal(np.nonzero(exported.cf_missing)[0],
                                [0, 7, 8])
  assert np.all(exported.cf[[7, 8]] == 0)


def test_item_tables_shape_check():
  with pytest.raises(ValueError, match="semantic_missing"):
    ie.ItemTables(cf=np.zeros((3, 2)), semantic=np.zeros((3, 1)),
                  cf_missing=np.zeros(3, bool),
                  semantic_missing=np.zeros(4, bool))


# -- the module ----------------------------------------------------------------

V, DC, DS, D = 7, 3, 5, 4


def _tables(seed=0, cf_scale=1.0, sem_scale=1.0):
  rng = np.random.default_rng(seed)
  cf_missing = np.array([1, 0, 0, 1, 0, 0, 0], bool)   # item 3: no CF
  sem_missing = np.array([1, 0, 0, 0, 1, 0, 0], bool)  # item 4: no text
  cf = rng.normal(size=(V, DC)).astype(np.float32) * cf_scale
  sem = rng.normal(size=(V, DS)).astype(np.float32) * sem_scale
  cf[cf_missing] = 0
  sem[sem_missing] = 0
  return ie.ItemTables(cf=cf, semantic=sem, cf_missing=cf_missing,
                       semantic_missing=sem_missing)


def _init(config, tables, batch, seed=0):
  module = ist.ItemSoftTokens(config, tables)
  params = module.init({"params": jax.random.PRNGKey(seed)}, batch)["params"]
  return module, params


def _apply(module, params, batch, **kw):
  return module.apply({"params": params}, batch, **kw)


def _np_vectors(params, config, tables, ids):
  """NumPy: the normalised (learned where missing) source vectors."""
  p = nn.meta.unbox(params)
  out = {}
  for source in config.used_sources:
    table = np.asarray(getattr(tables, source))
    missing = np.asarray(getattr(tables, f"{source}_missing"))[ids]
    x = np.where(missing[..., None], np.asarray(p[f"{source}_missing"]),
                 table[ids])
    if config.normalize:
      x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    out[source] = x
  return out


def _np_linear(params, config, tables, ids):
  """NumPy: normalise, concatenate, ONE matmul with the stacked kernels."""
  p = nn.meta.unbox(params)
  vec = _np_vectors(params, config, tables, ids)
  x = np.concatenate([vec[s] for s in config.used_sources], axis=-1)
  w = np.concatenate([np.asarray(p[f"{s}_proj"]["kernel"])
                      for s in config.used_sources], axis=0)
  y = x @ w + np.asarray(p["bias"])
  return y.reshape(ids.shape + (config.tokens_per_item, config.d_model))


def _np_mlp(params, config, tables, ids):
  p = nn.meta.unbox(params)
  vec = _np_vectors(params, config, tables, ids)
  h = sum(vec[s] @ np.asarray(p[f"{s}_proj"]["kernel"])
          for s in config.used_sources) + np.asarray(p["hidden_bias"])
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  y = h @ np.asarray(p["output"]["kernel"]) + np.asarray(p["output"]["bias"])
  return y.reshape(ids.shape + (config.tokens_per_item, config.d_model))


HISTORY = np.array([[1, 2, 3, 0], [4, 5, 6, 1]], np.int32)
NEXT = np.array([[5], [0]], np.int32)


@pytest.mark.parametrize("k,next_item", [(1, False), (2, False), (3, True)])
def test_shapes_and_mask(k, next_item):
  config = ist.ItemSoftTokensConfig(d_model=D, tokens_per_item=k,
                                    next_item=next_item)
  batch = {"history_items": HISTORY, "next_item": NEXT}
  module, params = _init(config, _tables(), batch)
  embeds, mask = _apply(module, params, batch)
  n = HISTORY.shape[1] + int(next_item)
  assert embeds.shape == (2, n * k, D) and mask.shape == (2, n * k)
  ids = np.concatenate([HISTORY, NEXT], 1) if next_item else HISTORY
  np.testing.assert_array_equal(mask, np.repeat(ids > 0, k, axis=1))
  assert np.all(np.asarray(embeds)[~np.asarray(mask)] == 0)
  assert np.all(np.isfinite(embeds))


def _history_embeds_and_reference(config, tables, np_adapter):
  """(module, params, embeds, reference) of HISTORY alone: the module's
  soft tokens and `np_adapter`'s, zero where the mask is off."""
  batch = {"history_items": HISTORY}
  module, params = _init(config, tables, batch)
  embeds, mask = _apply(module, params, batch)
  ref = np_adapter(params, config, tables, HISTORY).reshape(2, -1, D)
  return (module, params, embeds,
          np.where(np.asarray(mask)[..., None], ref, 0))


def test_linear_adapter_matches_numpy():
  config = ist.ItemSoftTokensConfig(d_model=D, tokens_per_item=2)
  _, _, embeds, ref = _history_embeds_and_reference(config, _tables(),
                                                    _np_linear)
  np.testing.assert_allclose(embeds, ref, rtol=1e-5, atol=1e-6)


def test_mlp_adapter_matches_numpy():
  config = ist.ItemSoftTokensConfig(d_model=D, adapter="mlp", mlp_dim=6,
                                    tokens_per_item=2, dropout_rate=0.3)
  module, params, embeds, ref = _history_embeds_and_reference(
      config, _tables(), _np_mlp)
  np.testing.assert_allclose(embeds, ref, rtol=1e-5, atol=1e-6)
  dropped, _ = _apply(module, params, {"history_items": HISTORY},
                      deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(dropped, embeds)


def test_unnormalized_inputs():
  config = ist.ItemSoftTokensConfig(d_model=D, normalize=False)
  _, _, embeds, ref = _history_embeds_and_reference(
      config, _tables(cf_scale=5.0), _np_linear)
  np.testing.assert_allclose(embeds, ref, rtol=1e-5, atol=1e-5)


def test_next_item_marker():
  config = ist.ItemSoftTokensConfig(d_model=D, tokens_per_item=2,
                                    next_item=True)
  tables = _tables()
  batch = {"history_items": HISTORY, "next_item": NEXT}
  module, params = _init(config, tables, batch)
  embeds, _ = _apply(module, params, batch)
  marker = np.asarray(nn.meta.unbox(params)["next_marker"])
  ref = _np_linear(params, config, tables, NEXT[:, 0])  # [B, k, D]
  np.testing.assert_allclose(embeds[0, -2:], ref[0] + marker, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(embeds[1, -2:], 0)  # next_item 0: masked
  # The same item in the history has no marker.
  hist = _np_linear(params, config, tables, HISTORY)
  np.testing.assert_allclose(embeds[1, 2:4], hist[1, 1], rtol=1e-5,
                             atol=1e-6)


def test_changed_item_changes_only_its_tokens():
  k = 2
  config = ist.ItemSoftTokensConfig(d_model=D, tokens_per_item=k,
                                    adapter="mlp", mlp_dim=8)
  batch = {"history_items": HISTORY}
  module, params = _init(config, _tables(), batch)
  before, _ = _apply(module, params, batch)
  changed = HISTORY.copy()
  changed[1, 2] = 2
  after, _ = _apply(module, params, {"history_items": changed})
  diff = np.any(np.asarray(before) != np.asarray(after), axis=-1)
  expect = np.zeros_like(diff)
  expect[1, 2 * k:3 * k] = True
  np.testing.assert_array_equal(diff, expect)


def test_padding_never_matters_and_is_finite():
  config = ist.ItemSoftTokensConfig(d_model=D)
  tables = _tables()
  batch = {"history_items": HISTORY}
  module, params = _init(config, tables, batch)
  embeds, _ = _apply(module, params, batch)
  # Row 0 of the tables holds anything (even NaN): padding never reads it.
  bad = _tables()
  bad.cf[0] = np.nan
  bad.semantic[0] = np.inf
  module_bad = ist.ItemSoftTokens(config, bad)
  again, mask = _apply(module_bad, params, batch)
  np.testing.assert_array_equal(again, embeds)
  assert not mask[0, 3] and np.all(np.asarray(again)[0, 3] == 0)
  # Zero missing vectors (a degenerate normalisation): value and gradient
  # stay finite.
  zero = jax.tree_util.tree_map(lambda x: x, nn.meta.unbox(params))
  zero["cf_missing"] = jnp.zeros_like(zero["cf_missing"])

  def loss(p):
    e, m = _apply(module, p, batch)
    return jnp.sum(jnp.where(m[..., None], e, 0) ** 2)

  grads = jax.grad(loss)(zero)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_missing_items_use_the_learned_vector():
  config = ist.ItemSoftTokensConfig(d_model=D)
  tables = _tables()
  params = _init(config, tables, {"history_items": HISTORY})[1]
  module = ist.ItemSoftTokens(config, tables)
  params = nn.meta.unbox(params)

  def loss(p, ids):
    e, _ = _apply(module, p, {"history_items": ids})
    return jnp.sum(e ** 2)

  # Item 3 has no CF row, item 4 no semantic row.
  g3 = jax.grad(loss)(params, np.array([[3, 0]]))
  assert np.any(g3["cf_missing"] != 0) and np.all(g3["semantic_missing"] == 0)
  g4 = jax.grad(loss)(params, np.array([[4, 0]]))
  assert np.all(g4["cf_missing"] == 0) and np.any(g4["semantic_missing"] != 0)
  g_none = jax.grad(loss)(params, np.array([[1, 2]]))
  assert np.all(g_none["cf_missing"] == 0)
  assert np.all(g_none["semantic_missing"] == 0)
  # The value: that of the learned vector (its norm does not matter when
  # normalised).
  learned = dict(params, cf_missing=params["cf_missing"] * 3.0)
  a, _ = _apply(module, params, {"history_items": np.array([[3]])})
  b, _ = _apply(module, learned, {"history_items": np.array([[3]])})
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  ref = _np_linear(params, config, tables, np.array([[3]]))
  np.testing.assert_allclose(a, ref.reshape(1, 1, D), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sources", ["cf", "semantic"])
def test_single_source_ignores_the_other_table(sources):
  config = ist.ItemSoftTokensConfig(d_model=D, sources=sources)
  tables = _tables()
  batch = {"history_items": HISTORY}
  module, params = _init(config, tables, batch)
  other = "semantic" if sources == "cf" else "cf"
  assert f"{other}_proj" not in params and f"{other}_missing" not in params
  embeds, mask = _apply(module, params, batch)
  changed = _tables(seed=5)
  setattr(changed, sources, getattr(tables, sources))
  setattr(changed, f"{sources}_missing", getattr(tables, f"{sources}_missing"))
  again, _ = _apply(ist.ItemSoftTokens(config, changed), params, batch)
  np.testing.assert_array_equal(again, embeds)
  ref = _np_linear(params, config, tables, HISTORY).reshape(2, -1, D)
  np.testing.assert_allclose(
      embeds, np.where(np.asarray(mask)[..., None], ref, 0), rtol=1e-5,
      atol=1e-6)
  # An empty table of the source it reads is refused.
  empty = ie.ItemTables(cf=np.zeros((V, 0)), semantic=np.zeros((V, 0)),
                        cf_missing=np.ones(V, bool),
                        semantic_missing=np.ones(V, bool))
  with pytest.raises(ValueError, match=f"reads the {sources} table"):
    _init(config, empty, batch)


def test_every_param_has_logical_axes():
  for adapter in ist.ADAPTERS:
    config = ist.ItemSoftTokensConfig(d_model=D, adapter=adapter, mlp_dim=6,
                                      next_item=True)
    batch = {"history_items": HISTORY, "next_item": NEXT}
    _, params = _init(config, _tables(), batch)
    leaves = jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
      assert len(leaf.names) == leaf.value.ndim
    specs = nn.get_partition_spec(params)
    assert specs["next_marker"] == jax.sharding.PartitionSpec("embed")


def test_initialised_from_a_zero_batch_and_jits():
  config = ist.ItemSoftTokensConfig(d_model=D, next_item=True)
  zeros = {"history_items": np.zeros((2, 4), np.int32),
           "next_item": np.zeros((2, 1), np.int32)}
  module, params = _init(config, _tables().device(), zeros)
  out = jax.jit(lambda p, b: _apply(module, p, b))(
      params, {"history_items": HISTORY, "next_item": NEXT})
  ref = _apply(ist.ItemSoftTokens(config, _tables()), params,
               {"history_items": HISTORY, "next_item": NEXT})
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)


def test_config_validation():
  with pytest.raises(ValueError, match="sources"):
    ist.ItemSoftTokensConfig(d_model=4, sources="both")
  with pytest.raises(ValueError, match="adapter"):
    ist.ItemSoftTokensConfig(d_model=4, adapter="conv")
  with pytest.raises(ValueError, match="tokens_per_item"):
    ist.ItemSoftTokensConfig(d_model=4, tokens_per_item=0)
  with pytest.raises(ValueError, match="dropout_rate"):
    ist.ItemSoftTokensConfig(d_model=4, dropout_rate=1.0)
  with pytest.raises(ValueError, match="dtype"):
    ist.ItemSoftTokensConfig(d_model=4, dtype="float99")


def test_missing_batch_features_are_named():
  config = ist.ItemSoftTokensConfig(d_model=D, next_item=True)
  module = ist.ItemSoftTokens(config, _tables())
  with pytest.raises(KeyError, match="next_item"):
    module.init({"params": jax.random.PRNGKey(0)},
                {"history_items": HISTORY})


# -- contribution analysis -----------------------------------------------------


def test_contributions_match_numpy(tmp_path):
  k = 2
  config = ist.ItemSoftTokensConfig(d_model=D, tokens_per_item=k)
  tables = _tables(cf_scale=3.0)
  _, params = _init(config, tables, {"history_items": HISTORY})
  ids = np.arange(1, V)
  result = ist.contributions(params, config, tables, ids)
  p = nn.meta.unbox(params)
  vec = _np_vectors(params, config, tables, ids)
  cf = np.linalg.norm((vec["cf"] @ np.asarray(p["cf_proj"]["kernel"])
                       ).reshape(-1, k, D), axis=-1)
  sem = np.linalg.norm((vec["semantic"] @ np.asarray(
      p["semantic_proj"]["kernel"])).reshape(-1, k, D), axis=-1)
  np.testing.assert_allclose(result["cf_norm"], cf, rtol=1e-5)
  np.testing.assert_allclose(result["semantic_norm"], sem, rtol=1e-5)
  np.testing.assert_allclose(result["cf_share"], cf / (cf + sem), rtol=1e-5)
  np.testing.assert_array_equal(result["cf_missing"],
                                tables.cf_missing[ids])

  paths = ist.write_contribution_report(result, str(tmp_path))
  with open(paths["json"]) as f:
    report = json.load(f)
  share = (cf / (cf + sem)).reshape(-1)
  assert report["cf_share"]["count"] == share.size
  assert math.isclose(report["cf_share"]["mean"], share.mean(), rel_tol=1e-5)
  assert math.isclose(report["cf_share"]["median"], np.median(share),
                      rel_tol=1e-5)
  counts, _ = np.histogram(share, bins=20, range=(0, 1))
  assert report["cf_share_histogram"]["counts"] == counts.tolist()
  assert len(report["cf_share_per_token"]) == k
  assert report["cf_missing"] == 1 and report["semantic_missing"] == 1
  if paths["png"] is None:
    assert "matplotlib" in report["png"]
  else:
    assert os.path.exists(paths["png"])


def test_contributions_refuse_the_mlp_adapter():
  config = ist.ItemSoftTokensConfig(d_model=D, adapter="mlp", mlp_dim=6)
  _, params = _init(config, _tables(), {"history_items": HISTORY})
  with pytest.raises(ValueError, match="linear adapter only"):
    ist.contributions(params, config, _tables(), np.arange(1, V))
