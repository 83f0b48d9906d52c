"""models/qformer.py against hand-made masks, NumPy and BertEncoder."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.checkpoint_import import bert as bert_import
from recsys_jax.core import init_from
from recsys_jax.core import param_tree
from recsys_jax.core import partitioning
from recsys_jax.models import bert
from recsys_jax.models import qformer as qf

CFG = qf.QFormerConfig(vocab_size=23, hidden=16, num_layers=2, num_heads=2,
                       mlp_dim=24, num_queries=3, cross_attention_every=2,
                       memory_dim=4, max_text_len=8, layer_norm_eps=1e-6)
TOKENS = np.array([[5, 7, 9, 2, 0, 0],
                   [3, 11, 0, 0, 0, 0]], np.int32)
MEMORY_MASK = np.array([[True, True, True, True, True],
                        [True, False, True, True, False]])


def _memory(seed=0, batch=2, slots=5):
  return np.random.default_rng(seed).normal(
      size=(batch, slots, CFG.memory_dim)).astype(np.float32)


def _random_params(abstract, seed):
  """Random float32 values for a (boxed) ShapeDtypeStruct tree.

  N(0, 0.2), and 1 + N(0, 0.1) for LayerNorm scales: no bias or scale is
  trivial, so a swapped or dropped one shows.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape)
    if param_tree.path_str(path).endswith("scale"):
      return (1.0 + 0.1 * noise).astype(np.float32)
    return (0.2 * noise).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


def _abstract(model, *args, **kwargs):
  """Boxed ShapeDtypeStructs of `model`'s params (traced, not run)."""
  init = functools.partial(model.init, **kwargs)
  return jax.eval_shape(init, jax.random.PRNGKey(0), *args)["params"]


@pytest.fixture(scope="module")
def model_params():
  """(`QFormer(CFG).apply` jitted, random params).

  The tests share one jitted function and call it with few distinct
  signatures (`_run`): each signature is one compile, the bulk of the time.
  """
  apply = jax.jit(qf.QFormer(CFG).apply,
                  static_argnames=("mask_mode", "deterministic",
                                   "text_logits"))
  return apply, _random_params(_abstract(qf.QFormer(CFG), _memory()), 1)


def _run(apply_params, memory, tokens, mode="unimodal", **kwargs):
  """One of the few call signatures the tests use (see `model_params`)."""
  apply, params = apply_params
  if memory is not None:
    kwargs["memory_mask"] = MEMORY_MASK
  return apply({"params": params}, memory, tokens, mask_mode=mode,
               text_logits=memory is not None and tokens is not None,
               **kwargs)


# attention_mask and cf_memory by hand ----------------------------------------


def test_attention_mask_by_hand():
  text_mask = np.array([[1, 1, 0], [1, 0, 0]])
  got = {m: np.asarray(qf.attention_mask(m, 2, text_mask))
         for m in qf.MASK_MODES}
  # Columns q0 q1 t0 t1 t2; t2 (and t1 in row 1) are padding.
  unimodal = [[1, 1, 0, 0, 0],
              [1, 1, 0, 0, 0],
              [0, 0, 1, 1, 0],
              [0, 0, 1, 1, 0],
              [0, 0, 1, 1, 0]]
  bidirectional = [[1, 1, 1, 1, 0]] * 5
  causal = [[1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0]]
  for mode, want in [("unimodal", unimodal), ("bidirectional", bidirectional),
                     ("multimodal_causal", causal)]:
    assert got[mode].shape == (2, 5, 5) and got[mode].dtype == bool
    np.testing.assert_array_equal(got[mode][0], np.array(want, bool),
                                  err_msg=mode)
  np.testing.assert_array_equal(got["unimodal"][1], [[1, 1, 0, 0, 0],
                                                     [1, 1, 0, 0, 0],
                                                     [0, 0, 1, 0, 0],
                                                     [0, 0, 1, 0, 0],
                                                     [0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(got["multimodal_causal"][1],
                                [[1, 1, 0, 0, 0],
                                 [1, 1, 0, 0, 0],
                                 [1, 1, 1, 0, 0],
                                 [1, 1, 1, 0, 0],
                                 [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(got["bidirectional"][1],
                                [[1, 1, 1, 0, 0]] * 5)
  # Text only: BERT's key mask, or causal.
  np.testing.assert_array_equal(
      np.asarray(qf.attention_mask("unimodal", 0, [[1, 1, 0]]))[0],
      [[1, 1, 0]] * 3)
  np.testing.assert_array_equal(
      np.asarray(qf.attention_mask("multimodal_causal", 0, [[1, 1, 0]]))[0],
      [[1, 0, 0], [1, 1, 0], [1, 1, 0]])


def test_attention_mask_errors():
  with pytest.raises(ValueError, match=r"mask_mode='causal'.*unimodal"):
    qf.attention_mask("causal", 2, np.ones((1, 3)))
  with pytest.raises(ValueError, match=r"text_mask shape \(3,\)"):
    qf.attention_mask("unimodal", 2, np.ones(3))


def test_cf_memory():
  table = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
  ids = np.array([[2, 0], [3, 1]])
  got = np.asarray(qf.cf_memory(table, ids, 3))
  assert got.shape == (2, 2, 3, 2)
  np.testing.assert_array_equal(got, table[ids].reshape(2, 2, 3, 2))
  np.testing.assert_array_equal(got[0, 0, 1], [14.0, 15.0])  # row 2, chunk 1
  with pytest.raises(ValueError, match=r"D=6 is not divisible by.*M=4"):
    qf.cf_memory(table, ids, 4)


# The module against a NumPy forward ------------------------------------------


def _np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + p["bias"]


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np_attention(x, memory, p, heads, mask):
  """BERT attention (joined biased kernels, scaled); mask [B, Q, K] bool."""
  q, k, v = (_np_dense(inp, p[n]) for inp, n in
             ((x, "query"), (memory, "key"), (memory, "value")))
  split = lambda y: y.reshape(y.shape[:2] + (heads, -1))
  q, k, v = split(q), split(k), split(v)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = logits + np.where(mask[:, None], 0.0, -1e9)
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs = probs / probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v)
  return _np_dense(out.reshape(out.shape[:2] + (-1,)), p["out"])


def _np_ffn(x, p, eps):
  y = _np_dense(_np_gelu(_np_dense(x, p["intermediate"])), p["output"])
  return _np_layer_norm(x + y, p["output_norm"], eps)


def _np_layer(x, p, num_queries, mask, memory, memory_mask, cfg, cross):
  """One Q-Former layer in float64: BLIP-2's BertLayer with queries."""
  eps = cfg.layer_norm_eps
  h = _np_attention(x, x, p["attention"], cfg.num_heads, mask)
  x = _np_layer_norm(x + h, p["attention_norm"], eps)
  q, t = x[:, :num_queries], x[:, num_queries:]
  if num_queries and cross and memory is not None:
    cmask = (None if memory_mask is None else
             np.broadcast_to(memory_mask[:, None], (len(q), num_queries,
                                                    memory.shape[1])))
    h = _np_attention(q, memory, p["cross_attention"], cfg.num_heads, cmask)
    q = _np_layer_norm(q + h, p["cross_attention_norm"], eps)
  q = _np_ffn(q, p["ffn_query"], eps)
  t = _np_ffn(t, p, eps)
  return np.concatenate([q, t], axis=1)


def _np_qformer(p, cfg, memory, tokens, mode, memory_mask=None):
  """The whole forward in float64 from the param tree `p`."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  emb, eps = p["embeddings"], cfg.layer_norm_eps
  parts, n = [], 0
  if memory is not None:
    n = cfg.num_queries
    parts.append(np.broadcast_to(_np_layer_norm(p["queries"], emb["LayerNorm"],
                                                eps),
                                 (len(memory), n, cfg.hidden)))
    memory = np.asarray(memory, np.float64)
    if cfg.memory_norm:
      memory = _np_layer_norm(memory, p["memory_norm"], eps)
    if cfg.memory_positions:
      memory = memory + p["memory_position"][:memory.shape[1]]
  mask = None
  if tokens is not None:
    length = tokens.shape[1]
    t = (emb["word_embeddings"]["embedding"][tokens]
         + emb["position_embeddings"]["embedding"][:length]
         + emb["token_type_embeddings"]["embedding"][0])
    parts.append(_np_layer_norm(t, emb["LayerNorm"], eps))
    # The mask built independently of qf.attention_mask.
    kinds = ["q"] * n + ["t"] * length
    mask = np.zeros((len(tokens), n + length, n + length), bool)
    for b in range(len(tokens)):
      for i in range(n + length):
        for j in range(n + length):
          if j >= n and tokens[b, j - n] == 0:
            continue
          if mode == "bidirectional":
            ok = True
          elif mode == "unimodal":
            ok = kinds[i] == kinds[j]
          else:
            ok = kinds[j] == "q" if kinds[i] == "q" else j <= i
          mask[b, i, j] = ok
  x = np.concatenate(parts, axis=1)
  for i in range(cfg.num_layers):
    x = _np_layer(x, p[f"layer_{i}"], n, mask, memory, memory_mask, cfg,
                  cross=i % cfg.cross_attention_every == 0)
  out = {"queries": x[:, :n] if n else None,
         "text": x[:, n:] if tokens is not None else None}
  if tokens is not None:
    head = p["lm_head"]
    h = _np_layer_norm(_np_gelu(_np_dense(out["text"], head["transform"])),
                       head["transform_norm"], eps)
    out["logits"] = h @ emb["word_embeddings"]["embedding"].T + head["bias"]
  return out


@pytest.mark.parametrize("mode", qf.MASK_MODES)
def test_forward_matches_numpy(model_params, mode):
  memory = _memory(3)
  got = _run(model_params, memory, TOKENS, mode)
  want = _np_qformer(model_params[1], CFG, memory, TOKENS, mode, MEMORY_MASK)
  assert got["queries"].shape == (2, CFG.num_queries, CFG.hidden)
  assert got["text"].shape == TOKENS.shape + (CFG.hidden,)
  assert got["logits"].shape == TOKENS.shape + (CFG.vocab_size,)
  assert got["logits"].dtype == jnp.float32
  for key in ("queries", "text", "logits"):
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-5,
                               err_msg=key)


def test_single_stream_paths_match_numpy(model_params):
  params = model_params[1]
  memory = _memory(4)
  got = _run(model_params, memory, None)
  assert got["text"] is None and "logits" not in got
  want = _np_qformer(params, CFG, memory, None, "unimodal", MEMORY_MASK)
  np.testing.assert_allclose(got["queries"], want["queries"], atol=1e-5)
  got = _run(model_params, None, TOKENS)
  assert got["queries"] is None and "logits" not in got
  want = _np_qformer(params, CFG, None, TOKENS, "unimodal")
  np.testing.assert_allclose(got["text"], want["text"], atol=1e-5)


def test_mask_modes_separate_the_streams(model_params):
  """Unimodal: each stream is what it is alone; causal: no look-ahead."""
  run = functools.partial(_run, model_params)
  memory = _memory(5)
  both = run(memory, TOKENS, "unimodal")
  np.testing.assert_allclose(both["queries"], run(memory, None)["queries"],
                             atol=1e-6)
  np.testing.assert_allclose(both["text"], run(None, TOKENS)["text"],
                             atol=1e-6)
  causal = run(memory, TOKENS, "multimodal_causal")
  changed = TOKENS.copy()
  changed[0, 3] = 17  # a later token of row 0
  causal2 = run(memory, changed, "multimodal_causal")
  np.testing.assert_allclose(causal2["text"][0, :3], causal["text"][0, :3],
                             atol=1e-6)
  np.testing.assert_allclose(causal2["queries"], causal["queries"], atol=1e-6)
  np.testing.assert_allclose(causal2["text"][1], causal["text"][1], atol=1e-6)
  assert not np.allclose(causal2["text"][0, 3], causal["text"][0, 3])
  # The text reads the queries in the causal mode, not in the unimodal one.
  assert not np.allclose(causal["text"], both["text"], atol=1e-3)
  # A masked memory position does not matter; an unmasked one does.
  # (Not a constant shift: the default memory_norm removes those.)
  memory2 = memory.copy()
  bump = 5.0 * np.arange(memory.shape[-1])
  memory2[1, 1] += bump
  np.testing.assert_allclose(run(memory2, None)["queries"],
                             run(memory, None)["queries"], atol=1e-6)
  memory2[1, 2] += bump
  assert not np.allclose(run(memory2, None)["queries"][1],
                         run(memory, None)["queries"][1])


def test_memory_norm_and_positions_match_numpy():
  cfg = dataclasses.replace(CFG, memory_norm=True, memory_positions=6)
  model = qf.QFormer(cfg)
  params = _random_params(_abstract(model, _memory()), 2)
  assert params["memory_position"].shape == (6, cfg.memory_dim)
  assert params["memory_norm"]["scale"].shape == (cfg.memory_dim,)
  memory = _memory(3)
  got = model.apply({"params": params}, memory, TOKENS,
                    memory_mask=MEMORY_MASK, mask_mode="bidirectional",
                    text_logits=True)
  want = _np_qformer(params, cfg, memory, TOKENS, "bidirectional",
                     MEMORY_MASK)
  for key in ("queries", "text", "logits"):
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-5,
                               err_msg=key)
  # With positions, the memory is no longer an unordered set: swapping two
  # chunks changes the queries (without them it cannot).
  swapped = memory[:, [1, 0, 2, 3, 4]]
  run = lambda m, c, p: qf.QFormer(c).apply({"params": p}, m)["queries"]
  assert not np.allclose(run(swapped, cfg, params), run(memory, cfg, params),
                         atol=1e-4)
  plain = _random_params(_abstract(qf.QFormer(CFG), _memory()), 2)
  np.testing.assert_allclose(run(swapped, CFG, plain), run(memory, CFG, plain),
                             atol=1e-5)
  # The norm makes the memory's scale irrelevant.
  np.testing.assert_allclose(run(memory * 0.1, cfg, params),
                             run(memory, cfg, params), atol=1e-3)
  with pytest.raises(ValueError, match="memory_positions=6"):
    model.apply({"params": params}, _memory(slots=7))
  # The norm is on by default (BLIP-2's ln_vision); positions are opt-in.
  default = qf.QFormerConfig(vocab_size=5)
  assert default.memory_norm and default.memory_positions == 0
  with pytest.raises(ValueError, match="memory_positions"):
    dataclasses.replace(CFG, memory_positions=-1)


def test_dropout_uses_the_rng(model_params):
  # An 'rbg' key: threefry's bits take seconds to compile on CPU.
  run = lambda seed: _run(model_params, _memory(), None, deterministic=False,
                          rngs={"dropout": jax.random.key(seed, impl="rbg")})
  a, b = run(1)["queries"], run(2)["queries"]
  deterministic = _run(model_params, _memory(), None)["queries"]
  assert np.isfinite(a).all() and not np.allclose(a, b)
  assert not np.allclose(a, deterministic)


# Parameters: one full tree, logical axis names -------------------------------


def test_init_creates_every_parameter_whatever_the_inputs():
  model = qf.QFormer(CFG)
  trees = [_abstract(model, _memory()), _abstract(model, text_tokens=TOKENS),
           _abstract(model, _memory(), TOKENS, text_logits=True)]
  paths = [sorted(param_tree.paths(t)) for t in trees]
  assert paths[0] == paths[1] == paths[2]
  assert "layer_0/cross_attention/key/kernel" in paths[0]
  assert "layer_1/cross_attention/key/kernel" not in paths[0]  # every=2
  assert {"queries", "lm_head/bias", "layer_1/ffn_query/output/kernel",
          "layer_1/intermediate/kernel"} <= set(paths[0])
  shapes = {k: v.shape for k, v in param_tree.flatten(trees[0]).items()}
  assert shapes["queries"] == (CFG.num_queries, CFG.hidden)
  assert shapes["layer_0/cross_attention/key/kernel"] == (CFG.memory_dim,
                                                          CFG.hidden)


def test_every_parameter_has_logical_axis_names():
  boxed = _abstract(qf.QFormer(CFG), _memory())
  known = {name for name, _ in partitioning.TENSOR_PARALLEL_RULES}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=param_tree.is_box)[0]:
    name = param_tree.path_str(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == len(leaf.value.shape), name
    assert set(leaf.names) - {None} <= known, (name, leaf.names)
    assert leaf.value.dtype == jnp.float32, name


# Errors ----------------------------------------------------------------------


def test_errors(model_params):
  model, params = model_params
  apply = lambda *a, **k: model({"params": params}, *a, **k)
  with pytest.raises(ValueError, match=r"mask_mode='itc'; expected one of"):
    apply(_memory(), mask_mode="itc")
  with pytest.raises(ValueError, match="neither memory nor text_tokens"):
    apply()
  too_long = np.ones((2, CFG.max_text_len + 1), np.int32)
  with pytest.raises(ValueError, match=r"text length 9 exceeds "
                     r"max_text_len=8"):
    apply(None, too_long)
  with pytest.raises(ValueError, match=r"memory shape \(2, 5, 3\).*"
                     r"memory_dim=4"):
    apply(np.zeros((2, 5, 3), np.float32))
  with pytest.raises(ValueError, match="text_logits=True needs text_tokens"):
    apply(_memory(), text_logits=True)
  with pytest.raises(ValueError, match="memory batch 2 != text_tokens batch 1"):
    apply(_memory(), TOKENS[:1])
  with pytest.raises(ValueError, match=r"hidden=10 is not divisible by "
                     r"num_heads=4"):
    qf.QFormerConfig(vocab_size=5, hidden=10, num_heads=4)
  with pytest.raises(ValueError, match=r"cross_attention_every=0"):
    qf.QFormerConfig(vocab_size=5, cross_attention_every=0)


# Initialising from a BertEncoder ---------------------------------------------

BERT_CFG = bert.BertConfig(vocab_size=CFG.vocab_size, hidden_size=CFG.hidden,
                           num_hidden_layers=CFG.num_layers,
                           num_attention_heads=CFG.num_heads,
                           intermediate_size=CFG.mlp_dim,
                           max_position_embeddings=CFG.max_text_len,
                           layer_norm_eps=CFG.layer_norm_eps)


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
  """A BertEncoder's (perturbed) params saved as `checkpoint_import.bert`."""
  params = _random_params(bert_import.abstract_params(BERT_CFG), 8)
  path = str(tmp_path_factory.mktemp("bert"))
  bert_import.save_as_orbax(params, BERT_CFG, path)
  return path, params


def test_bert_init_mapping_through_init_from(bert_checkpoint, model_params):
  path, bert_params = bert_checkpoint
  bert_flat = param_tree.flatten(bert_params)
  qformer = jax.tree.map(jnp.asarray, model_params[1])
  params = {"qformer": qformer, "head": {"w": jnp.ones(3)}}
  new, summary = init_from.initialise(params, init_from.InitFrom(
      path=path, mapping=qf.bert_init_mapping("qformer/")))
  assert "(imported checkpoint)" in summary
  got, old = param_tree.flatten(new), param_tree.flatten(params)
  copied = set()
  for target in got:
    if not target.startswith("qformer/"):
      continue
    sub = target[len("qformer/"):]
    source = sub.replace("ffn_query/", "")
    if (sub.startswith(("embeddings/", "layer_"))
        and "cross_attention" not in sub):
      np.testing.assert_array_equal(got[target], bert_flat[source],
                                    err_msg=target)
      copied.add(target)
    else:  # queries, cross-attention, LM head: fresh
      np.testing.assert_array_equal(got[target], old[target], err_msg=target)
  assert len(copied) == 5 + 2 * (16 + 6)  # embeddings; attn + 2 FFNs a layer
  np.testing.assert_array_equal(got["head/w"], np.ones(3))


def test_text_path_equals_bert_encoder(bert_checkpoint, model_params):
  """The strongest parity: text only, BERT's params -> BERT's outputs."""
  path, bert_params = bert_checkpoint
  qformer = jax.tree.map(jnp.asarray, model_params[1])
  params, _ = init_from.initialise(qformer, init_from.InitFrom(
      path=path, mapping=qf.BERT_INIT_MAPPING))
  tokens = np.array([[2, 9, 4, 13, 8, 6],
                     [2, 22, 1, 0, 0, 0]], np.int32)  # TOKENS' shape
  want = jax.jit(bert.BertEncoder(BERT_CFG).apply)({"params": bert_params},
                                                   tokens, tokens != 0)
  got = _run((model_params[0], params), None, tokens)["text"]
  # Bit-exact on CPU today; a tolerance keeps XLA fusion changes harmless.
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_bert_init_mapping_options():
  rules = qf.bert_init_mapping("soft_tokens/qformer/", word_embeddings=False,
                               position_embeddings=False, query_ffn=False,
                               source_prefix="text/")
  # A Q-Former with its own vocabulary and text length, one layer.
  cfg = qf.QFormerConfig(vocab_size=40, hidden=16, num_layers=1, num_heads=2,
                         mlp_dim=24, memory_dim=4, max_text_len=5)
  target = {f"soft_tokens/qformer/{k}": v.shape for k, v in
            param_tree.flatten(_abstract(qf.QFormer(cfg),
                                         np.zeros((1, 2, 4)))).items()}
  source = {f"text/{k}": v.shape for k, v in param_tree.flatten(
      bert_import.abstract_params(BERT_CFG)).items()}
  copies = init_from.plan(target, source,
                          init_from.InitFrom(path="x", mapping=rules))
  assert copies["soft_tokens/qformer/layer_0/attention/query/kernel"] == (
      "text/layer_0/attention/query/kernel")
  types = "embeddings/token_type_embeddings/embedding"
  assert copies[f"soft_tokens/qformer/{types}"] == f"text/{types}"
  assert not any("word_embeddings" in k or "position_embeddings" in k
                 or "ffn_query" in k or "layer_1" in k for k in copies)
  assert len(copies) == 3 + 16  # type + LayerNorm; one layer's BERT part
  # With the defaults the vocabulary must match: InitFrom names the misfit.
  with pytest.raises(init_from.InitFromError, match="word_embeddings"):
    init_from.plan(target, source, init_from.InitFrom(
        path="x", mapping=qf.bert_init_mapping("soft_tokens/qformer/",
                                               source_prefix="text/")))
  with pytest.raises(ValueError, match=r"prefix='qformer'"):
    qf.bert_init_mapping("qformer")


def test_bert_init_mapping_fits_minilm_shapes():
  """all-MiniLM-L6-v2's shapes (BertConfig defaults) into 2 Q-Former layers.

  Every BERT-shared parameter copies, from the BERT's first two layers.
  """
  minilm = bert.BertConfig()
  cfg = qf.QFormerConfig(vocab_size=minilm.vocab_size, hidden=384,
                         num_layers=2, num_heads=12, mlp_dim=1536,
                         memory_dim=8, max_text_len=512)
  target = {f"qformer/{k}": v.shape for k, v in param_tree.flatten(
      _abstract(qf.QFormer(cfg), np.zeros((1, 2, 8)))).items()}
  source = {k: v.shape for k, v in param_tree.flatten(
      bert_import.abstract_params(minilm)).items()}
  copies = init_from.plan(target, source, init_from.InitFrom(
      path="x", mapping=qf.bert_init_mapping("qformer/")))
  assert len(copies) == 5 + 2 * (16 + 6)
  assert copies["qformer/layer_1/ffn_query/output/kernel"] == (
      "layer_1/output/kernel")
  assert not any("layer_2" in v for v in copies.values())
