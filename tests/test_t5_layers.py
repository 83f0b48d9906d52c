"""T5 layers against NumPy re-implementations, plus model-level invariants."""

import functools
import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.models import layers
from recsys_jax.models import t5
from recsys_jax.models import t5_layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# NumPy references ----------------------------------------------------------


def np_bucket(rel, bidirectional, num_buckets, max_distance):
  """Line-by-line NumPy port of HF `T5Attention._relative_position_bucket`."""
  rel = np.asarray(rel, np.int64)
  ret = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    ret += (rel > 0).astype(np.int64) * num_buckets
    n = np.abs(rel)
  else:
    n = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide="ignore"):
    large = max_exact + (np.log(n.astype(np.float32) / max_exact) /
                         math.log(max_distance / max_exact) *
                         (num_buckets - max_exact))
  large = np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return ret + np.where(is_small, n, large)


def np_rms_norm(x, scale, eps):
  x = x.astype(np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def np_attention(xq, xkv, p, num_heads, mask=None, bias=None):
  def heads(x):
    return x.reshape(x.shape[:2] + (num_heads, -1))
  q = heads(xq @ p["query"]["kernel"])
  k = heads(xkv @ p["key"]["kernel"])
  v = heads(xkv @ p["value"]["kernel"])
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)  # no 1/sqrt(d) in T5
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = np.where(mask, logits, -1e10)
  logits = logits - logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w = w / w.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(xq.shape[:2] + (-1,))
  return out @ p["out"]["kernel"]


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _unbox(tree):
  return jax.tree.map(np.asarray, nn.meta.unbox(tree))


def random_params(config, seed=0):
  """Random float32 params with `T5(config)`'s tree, drawn in NumPy.

  (Cheaper than `init_params`, whose jitted threefry draws dominate test time
  on CPU; shapes still come from the model.)
  """
  shapes = nn.unbox(jax.eval_shape(
      lambda: t5.init_params(config, jax.random.PRNGKey(0))))
  rng = np.random.RandomState(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "scale":
      return (1 + 0.2 * rng.randn(*s.shape)).astype(np.float32)
    std = 1.0 if name in ("embedding", "rel_embedding") else s.shape[0] ** -0.5
    return (std * rng.randn(*s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _forward(config, deterministic=True):
  """Jitted teacher-forced logits `(params, enc, dec[, rng]) -> [B, T, V]`.

  Cached so that tests sharing a config share one compilation.
  """
  model = t5.T5(config)
  return jax.jit(lambda p, e, d, rng=None: model.apply(
      {"params": p}, e, d, rngs=None if rng is None else {"dropout": rng},
      deterministic=deterministic))


# Layer tests -----------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("nb,md", [(32, 128), (8, 12), (16, 20), (6, 9)])
def test_relative_position_bucket_matches_numpy(bidirectional, nb, md):
  rel = np.arange(-400, 401)[None]
  got = t5_layers.relative_position_bucket(
      jnp.asarray(rel), bidirectional=bidirectional, num_buckets=nb,
      max_distance=md)
  np.testing.assert_array_equal(np.asarray(got),
                                np_bucket(rel, bidirectional, nb, md))
  assert int(got.min()) >= 0 and int(got.max()) < nb


def test_relative_position_bucket_hand_cases():
  def b(rel, bidirectional):
    return int(t5_layers.relative_position_bucket(
        jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32,
        max_distance=128))
  # Bidirectional: 16 buckets per side, 8 exact; future offsets get +16.
  assert [b(r, True) for r in (0, -1, -7, 1, 7)] == [0, 1, 7, 17, 23]
  assert b(-8, True) == 8              # first log bucket: 8 + log(1) * ...
  assert b(-128, True) == 15 and b(-1000, True) == 15  # clamped
  assert b(1000, True) == 31
  # Causal: the future is bucket 0; 16 exact buckets for the past.
  assert [b(r, False) for r in (5, 0, -3, -15, -16)] == [0, 0, 3, 15, 16]
  assert b(-64, False) == 16 + int(math.log(4) / math.log(8) * 16)
  assert b(-128, False) == 31 and b(-5000, False) == 31


def test_rms_norm_matches_numpy():
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 16).astype(np.float32) * 3 + 1
  norm = layers.RMSNorm(epsilon=1e-6)
  params = norm.init(jax.random.PRNGKey(0), x)
  scale = rng.rand(16).astype(np.float32) + 0.5
  params = {"params": {"scale": scale}}
  got = norm.apply(params, x)
  np.testing.assert_allclose(np.asarray(got), np_rms_norm(x, scale, 1e-6),
                             rtol=1e-5, atol=1e-5)
  # No mean subtraction: a constant input is not zeroed.
  const = norm.apply(params, jnp.full((1, 1, 16), 2.0))
  np.testing.assert_allclose(np.asarray(const)[0, 0], scale, rtol=1e-5)


def test_relative_position_biases_module():
  mod = t5_layers.RelativePositionBiases(num_buckets=8, max_distance=12,
                                         num_heads=3)
  qpos = jnp.arange(10)[None]
  kpos = jnp.arange(14)[None]
  variables = mod.init(jax.random.PRNGKey(1), qpos, kpos, bidirectional=True)
  table = _unbox(variables["params"])["rel_embedding"]
  for bidirectional in (True, False):
    got = mod.apply(variables, qpos, kpos, bidirectional=bidirectional)
    rel = np.arange(14)[None, :] - np.arange(10)[:, None]
    want = table[:, np_bucket(rel, bidirectional, 8, 12)][None]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_attention_matches_numpy():
  rng = np.random.RandomState(2)
  xq = rng.randn(2, 5, 12).astype(np.float32)
  xkv = rng.randn(2, 7, 12).astype(np.float32)
  mask = rng.rand(2, 1, 5, 7) > 0.3
  mask[..., 0] = True
  bias = rng.randn(1, 3, 5, 7).astype(np.float32)
  # T5's configuration of the shared attention: joined bias-free kernels,
  # no query scaling; the reference selects -1e10 where ours adds a bias.
  config = t5.T5Config.tiny(d_model=12, num_heads=3, d_kv=5)  # 15 != 12
  attn = t5_layers.attention(config, "attention")
  variables = attn.init(jax.random.PRNGKey(0), xq, xkv, mask=mask, bias=bias)
  p = _unbox(variables["params"])
  assert set(p) == {"query", "key", "value", "out"}
  assert all(set(p[k]) == {"kernel"} for k in p)  # no biases
  assert p["query"]["kernel"].shape == (12, 15)
  assert p["out"]["kernel"].shape == (15, 12)
  want = np_attention(xq, xkv, p, 3, mask, bias)
  for per_head in (True, False):
    got = attn.clone(per_head=per_head).apply(variables, xq, xkv, mask=mask,
                                              bias=bias)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("proj", ["relu", "gated-gelu", "gated-silu", "gelu"])
def test_mlp_matches_numpy(proj):
  rng = np.random.RandomState(3)
  x = rng.randn(2, 4, 8).astype(np.float32)
  mlp = t5_layers.MlpBlock(d_ff=16, feed_forward_proj=proj)
  variables = mlp.init(jax.random.PRNGKey(0), x)
  p = _unbox(variables["params"])
  if proj == "relu":
    want = np.maximum(x @ p["wi"]["kernel"], 0) @ p["wo"]["kernel"]
  elif proj == "gelu":  # exact (erf) GELU, as HF's plain 'gelu'
    h = x @ p["wi"]["kernel"]
    erf = np.vectorize(math.erf)
    want = (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ p["wo"]["kernel"]
  else:
    a = x @ p["wi_0"]["kernel"]
    act = np_gelu_tanh(a) if proj == "gated-gelu" else a / (1 + np.exp(-a))
    want = (act * (x @ p["wi_1"]["kernel"])) @ p["wo"]["kernel"]
  got = mlp.apply(variables, x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_bad_feed_forward_proj():
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.T5Config.tiny(feed_forward_proj="gelu-gated")
  with pytest.raises(ValueError, match="activation"):
    t5.T5Config.tiny(feed_forward_proj="gated-tanh")


# Model-level tests ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  """Untied (v1.1-style) tiny model with its params and inputs."""
  config = t5.T5Config.tiny(feed_forward_proj="gated-gelu",
                            tie_word_embeddings=False, dropout_rate=0.1)
  params = random_params(config)
  enc = np.array([[5, 9, 12, 3, 7, 0, 0], [4, 4, 8, 0, 0, 0, 0]], np.int32)
  dec = np.array([[0, 6, 2, 9], [0, 3, 3, 1]], np.int32)
  return config, params, enc, dec


def test_logical_axes_on_every_param():
  config = t5.T5Config.tiny(feed_forward_proj="gated-gelu",
                            tie_word_embeddings=False)
  boxed = jax.eval_shape(lambda: t5.init_params(config, jax.random.PRNGKey(0)))
  flat = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  names = {}
  for path, leaf in flat:
    assert isinstance(leaf, nn.Partitioned), path
    assert len(leaf.names) == leaf.value.ndim, path
    names["/".join(p.key for p in path)] = leaf.names
  assert names["token_embedder/embedding"] == ("vocab", "embed")
  assert names["lm_head/kernel"] == ("embed", "vocab")
  assert names["encoder/relpos_bias/rel_embedding"] == ("heads", None)
  enc0 = "encoder/layers_0/"
  for proj in ("query", "key", "value"):
    assert names[enc0 + f"attention/{proj}/kernel"] == ("embed", "joined_kv")
  assert names[enc0 + "attention/out/kernel"] == ("joined_kv", "embed")
  assert names[enc0 + "mlp/wi_0/kernel"] == ("embed", "mlp")
  assert names[enc0 + "mlp/wo/kernel"] == ("mlp", "embed")
  assert names["decoder/decoder_norm/scale"] == ("embed",)
  # Relative biases live once per stack, not per layer.
  assert not any("layers_1/" in k and "relpos" in k for k in names)


def test_padding_does_not_change_real_positions(tiny):
  config, params, enc, dec = tiny
  m = t5.T5(config)
  encode = jax.jit(lambda p, e: m.apply({"params": p}, e, method=t5.T5.encode))
  fwd = _forward(config)
  f = lambda e, d: (encode(params, e), fwd(params, e, d))
  encoded, logits = f(enc, dec)
  longer = np.pad(enc, ((0, 0), (0, 5)))
  encoded2, logits2 = f(longer, dec)
  np.testing.assert_allclose(np.asarray(encoded2)[0, :5],
                             np.asarray(encoded)[0, :5], atol=1e-5)
  np.testing.assert_allclose(np.asarray(encoded2)[1, :3],
                             np.asarray(encoded)[1, :3], atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits),
                             atol=1e-5)
  # ...whereas changing a real token does change the other outputs.
  changed = enc.copy()
  changed[0, 1] = 30
  assert np.abs(np.asarray(f(changed, dec)[1])[0] -
                np.asarray(logits)[0]).max() > 1e-3


def test_decoder_is_causal(tiny):
  config, params, enc, dec = tiny
  m = t5.T5(config)
  f = _forward(config)
  logits = f(params, enc, dec)
  changed = dec.copy()
  changed[:, 2] = 40
  logits2 = f(params, enc, changed)
  np.testing.assert_allclose(np.asarray(logits2)[:, :2],
                             np.asarray(logits)[:, :2], atol=1e-5)
  assert np.abs(np.asarray(logits2)[:, 2:] - np.asarray(logits)[:, 2:]).max(
  ) > 1e-3
  # Explicit default positions give the same result.
  pos = np.broadcast_to(np.arange(4), dec.shape)
  np.testing.assert_allclose(
      np.asarray(jax.jit(lambda p, e, d, q: m.apply(
          {"params": p}, e, d, decoder_positions=q))(params, enc, dec, pos)),
      np.asarray(logits), atol=1e-6)


def test_inputs_embeds_and_encoder_module(tiny):
  config, params, enc, _ = tiny
  m = t5.T5(config)
  encode = jax.jit(lambda p, e: m.apply({"params": p}, e, method=t5.T5.encode))
  by_tokens = encode(params, enc)  # pylint: disable=not-callable
  embeds = params["token_embedder"]["embedding"][enc]
  by_embeds = jax.jit(lambda p, x, mask: m.apply(
      {"params": p}, None, mask, inputs_embeds=x, method=t5.T5.encode))(
          params, embeds, enc != 0)
  np.testing.assert_allclose(np.asarray(by_embeds), np.asarray(by_tokens),
                             atol=1e-6)
  enc_only = t5.T5Encoder(config)
  init = jax.eval_shape(lambda: t5.init_params(config, jax.random.PRNGKey(0),
                                               encoder_only=True))
  sub = t5.encoder_params(params)
  assert jax.tree.structure(nn.unbox(init)) == jax.tree.structure(sub)
  out = jax.jit(lambda p, e: enc_only.apply({"params": p}, e))(sub, enc)
  np.testing.assert_allclose(np.asarray(out), np.asarray(by_tokens), atol=1e-6)
  with pytest.raises(ValueError, match="not both"):
    jax.eval_shape(lambda: m.apply({"params": params}, enc,
                                   inputs_embeds=embeds, method=t5.T5.encode))


def test_tied_head_is_scaled_embedding():
  config = t5.T5Config.tiny()
  params = random_params(config, seed=4)
  assert "lm_head" not in params
  enc = np.array([[3, 4, 5, 6]], np.int32)
  dec = np.array([[0, 7, 8]], np.int32)
  tied = _forward(config)(params, enc, dec)
  untied_cfg = config.replace(tie_word_embeddings=False)
  untied = dict(params, lm_head={
      "kernel": params["token_embedder"]["embedding"].T * config.d_model**-0.5})
  logits = _forward(untied_cfg)(untied, enc, dec)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(tied), rtol=1e-5,
                             atol=1e-5)


def test_dropout(tiny):
  config, params, enc, dec = tiny
  f = _forward(config)
  drop = _forward(config, deterministic=False)
  base = f(params, enc, dec)
  np.testing.assert_array_equal(np.asarray(f(params, enc, dec)),
                                np.asarray(base))
  # rbg keys: threefry's dropout masks take far longer to compile on CPU.
  d1 = drop(params, enc, dec, jax.random.key(1, impl="rbg"))
  d2 = drop(params, enc, dec, jax.random.key(2, impl="rbg"))
  assert np.abs(np.asarray(d1) - np.asarray(base)).max() > 1e-3
  assert np.abs(np.asarray(d1) - np.asarray(d2)).max() > 1e-3


def test_bfloat16_compute_close_to_float32(tiny):
  config, params, enc, dec = tiny
  f32 = _forward(config)(params, enc, dec)
  bf_config = config.replace(dtype="bfloat16")
  bf = _forward(bf_config)(params, enc, dec)
  encoded = jax.eval_shape(lambda: t5.T5(bf_config).apply(
      {"params": params}, enc, method=t5.T5.encode))
  assert bf.dtype == jnp.float32 and encoded.dtype == jnp.bfloat16
  err = np.abs(np.asarray(bf) - np.asarray(f32)).max()
  assert err < 0.05 * np.abs(np.asarray(f32)).max() + 0.05, err
  assert err > 0  # really computed in bf16
  boxed = jax.eval_shape(
      lambda: t5.init_params(config.replace(dtype=jnp.bfloat16),
                             jax.random.PRNGKey(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(boxed)))


def test_config_from_hf_config():
  base = dict(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2,
              num_heads=4)
  old_v1 = t5.T5Config.from_hf_config(dict(base, model_type="t5"))
  assert old_v1.tie_word_embeddings and old_v1.num_decoder_layers == 2
  assert old_v1.relative_attention_max_distance == 128
  old_v11 = t5.T5Config.from_hf_config(
      dict(base, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
           num_decoder_layers=3))
  assert not old_v11.tie_word_embeddings and old_v11.num_decoder_layers == 3
  new_v11 = t5.T5Config.from_hf_config(
      dict(base, tie_word_embeddings=True, scale_decoder_outputs=False))
  assert not new_v11.tie_word_embeddings
  mt5 = t5.T5Config.from_hf_config(
      dict(base, model_type="mt5", tie_word_embeddings=True))
  assert not mt5.tie_word_embeddings
  with pytest.raises(ValueError, match="num_heads"):
    t5.T5Config.from_hf_config({k: v for k, v in base.items()
                                if k != "num_heads"})
  with pytest.raises(ValueError, match="d_ff"):
    t5.T5Config.from_hf_config(dict(base, d_ff="32"))
  cfg = t5.T5Config.mt5_small()
  assert t5.T5Config.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="bogus"):
    t5.T5Config.from_dict(dict(cfg.to_dict(), bogus=1))


_SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from recsys_jax.core import partitioning
    from recsys_jax.models import t5
    cfg = t5.T5Config.tiny(feed_forward_proj="gated-gelu",
                           tie_word_embeddings=False)
    model = t5.T5(cfg)
    enc = jnp.asarray(np.random.RandomState(0).randint(1, 64, (8, 6)))
    dec = jnp.asarray(np.random.RandomState(1).randint(1, 64, (8, 5)))
    boxed = jax.eval_shape(lambda: t5.init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda s: (0.3 * rng.randn(*s.shape)).astype(np.float32),
        nn.unbox(boxed))
    fwd = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))
    ref = fwd(params, enc, dec)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rules = list(partitioning.get_rules("tensor_parallel"))
    shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                        rules)
    sharded = jax.device_put(params, shard)
    kernel = sharded["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "model"), kernel.sharding.spec
    data = NamedSharding(mesh, P("data"))
    with mesh, nn.logical_axis_rules(rules):
      # A fresh jit: logical constraints resolve against the rules in context.
      out = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))(
          sharded, jax.device_put(enc, data), jax.device_put(dec, data))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    print("SHARDED_OK")
""")


def test_runs_sharded_under_tensor_parallel_rules():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]
