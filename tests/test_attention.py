"""The shared attention (`models.layers`) against NumPy references.

Covers each family's configuration (Bert4Rec: split biased kernels, scaled;
T5: joined bias-free kernels, unscaled, extra logit bias; BERT: joined biased
kernels, scaled), both layouts, cross-attention to a memory of another
width, the KV cache, precomputed memory keys/values and the cross-attention
block a Perceiver or Q-Former builds on.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.models import layers

# name -> (joined_kv, use_bias, scale_queries): the three families.
FAMILIES = {
    "bert4rec": (False, True, True),
    "t5": (True, False, False),
    "bert": (True, True, True),
}


def jitted(module, fn="apply"):
  return jax.jit(getattr(module, fn),
                 static_argnames=("method", "deterministic", "decode"))


def perturbed(variables, seed):
  """Unboxed params plus noise, so zero-initialised biases are exercised."""
  p = nn.meta.unbox(variables["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(a + 0.1 * rng.normal(size=a.shape),
                                           np.float32), p)


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_attention(x, memory, p, num_heads, head_dim, *, joined, use_bias,
                 scale, mask=None, bias=None):
  """float64 multi-head attention from the parameter tree `p`."""
  x = np.asarray(x, np.float64)
  memory = x if memory is None else np.asarray(memory, np.float64)

  def proj(name, inp):
    kernel = np.asarray(p[name]["kernel"], np.float64)
    kernel = kernel.reshape(inp.shape[-1], num_heads, head_dim)
    y = np.einsum("ble,ehd->blhd", inp, kernel)
    if use_bias:
      y = y + np.asarray(p[name]["bias"]).reshape(num_heads, head_dim)
    return y
  q, k, v = proj("query", x), proj("key", memory), proj("value", memory)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if scale:
    logits = logits / math.sqrt(head_dim)
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -1e9)
  if bias is not None:
    logits = logits + bias
  o = np.einsum("bhqk,bkhd->bqhd", np_softmax(logits), v)
  out_kernel = np.asarray(p["out"]["kernel"], np.float64)
  y = np.einsum("bqhd,hdf->bqf", o,
                out_kernel.reshape(num_heads, head_dim, -1))
  if use_bias:
    y = y + p["out"]["bias"]
  return y


# Masks ----------------------------------------------------------------------


def test_make_attention_mask_by_hand():
  valid = np.array([[1, 1, 1, 1, 0]], bool)
  seg = np.array([[1, 1, 2, 2, 0]])
  mask = np.asarray(layers.make_attention_mask(valid, seg))[0, 0]
  expected = np.array([[1, 1, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(mask, expected)
  no_seg = np.asarray(layers.make_attention_mask(valid))[0, 0]
  np.testing.assert_array_equal(no_seg, np.outer(valid[0], valid[0]))


def test_causal_attention_mask_by_hand():
  valid = np.array([[True, True, True, False]])
  seg = np.array([[1, 1, 2, 0]])
  mask = np.asarray(layers.make_attention_mask(valid, seg, causal=True))[0, 0]
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0], [1, 1, 0, 0],
                                       [0, 0, 1, 0], [0, 0, 0, 0]])


def test_mask_bias_and_key_mask():
  mask = np.array([[True, False, True]])
  bias = np.asarray(layers.mask_bias(mask))
  assert bias.dtype == np.float32
  np.testing.assert_array_equal(bias, [[0.0, layers.LARGE_NEGATIVE, 0.0]])
  assert layers.LARGE_NEGATIVE == -1e9
  km = np.asarray(layers.key_mask(np.array([[1, 0, 1]])))
  assert km.shape == (1, 1, 1, 3) and km.dtype == bool
  np.testing.assert_array_equal(km[0, 0, 0], [True, False, True])


def test_fully_masked_rows_stay_finite():
  """A query with no key to attend to (padding) gives finite outputs."""
  x = np.random.default_rng(0).normal(size=(1, 3, 8)).astype(np.float32)
  mask = np.zeros((1, 1, 3, 3), bool)
  mask[0, 0, :2, :2] = True  # query 2 sees nothing
  attn = layers.MultiHeadAttention(num_heads=2, head_dim=4)
  variables = attn.init(jax.random.PRNGKey(0), x, mask=mask)
  out = np.asarray(attn.apply(variables, x, mask=mask))
  assert np.isfinite(out).all()


# The module against NumPy ----------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("per_head", [True, False])
def test_self_attention_matches_numpy(family, per_head):
  joined, use_bias, scale = FAMILIES[family]
  b, l, e, h, d = 2, 5, 8, 2, 3  # H * D != E
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, l, e)).astype(np.float32)
  valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  seg = np.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  mask = layers.make_attention_mask(valid, seg)
  bias = rng.normal(size=(1, h, l, l)).astype(np.float32)
  attn = layers.MultiHeadAttention(h, d, joined_kv=joined, use_bias=use_bias,
                                   scale_queries=scale, per_head=per_head)
  variables = jitted(attn, "init")(jax.random.PRNGKey(1), x, mask=mask,
                                   bias=bias)
  p = perturbed(variables, 2)
  kernel_shape = (e, h * d) if joined else (e, h, d)
  assert p["query"]["kernel"].shape == kernel_shape
  assert ("bias" in p["query"]) == use_bias
  apply = jitted(attn)
  out = np.asarray(apply({"params": p}, x, mask=mask, bias=bias))
  ref = np_attention(x, None, p, h, d, joined=joined, use_bias=use_bias,
                     scale=scale, mask=mask, bias=bias)
  # Padding queries see no key: their (unused) outputs depend on how -1e9
  # plus the bias rounds, so they are only required to be finite.
  np.testing.assert_allclose(out[valid], ref[valid], rtol=2e-5, atol=2e-5)
  assert np.isfinite(out).all()
  # Row 1: segment 1 queries see only keys 0..1, so changing key 4 (segment
  # 2) leaves them unchanged and changes segment-2 queries.
  x2 = x.copy()
  x2[1, 4] += 1.0
  out2 = np.asarray(apply({"params": p}, x2, mask=mask, bias=bias))
  np.testing.assert_allclose(out2[1, :2], out[1, :2], rtol=1e-6, atol=1e-6)
  assert np.abs(out2[1, 2:4] - out[1, 2:4]).max() > 1e-3


@pytest.mark.parametrize("per_head", [True, False])
def test_cross_attention_to_a_wider_memory_matches_numpy(per_head):
  b, q, k, e, m, h = 2, 3, 6, 8, 12, 2
  rng = np.random.default_rng(4)
  x = rng.normal(size=(b, q, e)).astype(np.float32)
  memory = rng.normal(size=(b, k, m)).astype(np.float32)
  valid = np.arange(k)[None] < np.array([[6], [3]])
  mask = layers.key_mask(valid)
  attn = layers.MultiHeadAttention(h, e // h, out_features=5,
                                   per_head=per_head)
  variables = jitted(attn, "init")(jax.random.PRNGKey(0), x, memory,
                                   mask=mask)
  p = perturbed(variables, 5)
  assert p["key"]["kernel"].shape == (m, h, e // h)
  assert p["out"]["kernel"].shape == (h, e // h, 5)
  apply = jitted(attn)
  out = np.asarray(apply({"params": p}, x, memory, mask=mask))
  assert out.shape == (b, q, 5)
  ref = np_attention(x, memory, p, h, e // h, joined=False, use_bias=True,
                     scale=True, mask=mask)
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
  # Padded memory positions are never read.
  memory2 = memory.copy()
  memory2[1, 3:] = 100.0
  np.testing.assert_allclose(
      np.asarray(apply({"params": p}, x, memory2, mask=mask))[1], out[1],
      rtol=1e-6, atol=1e-6)
  # Precomputed keys/values (cached cross-attention) give the same result.
  kv = attn.apply({"params": p}, memory, method=attn.project_memory)
  assert kv[0].shape == (b, h, k, e // h)  # head-major
  np.testing.assert_allclose(
      np.asarray(apply({"params": p}, x, mask=mask, memory_kv=kv)), out,
      rtol=1e-5, atol=1e-6)


def test_layouts_agree_in_value_and_gradient():
  """Per-head and heads-batched layouts: same parameters, same outputs and
  gradients (of the parameters and the input)."""
  b, l, e, h = 3, 6, 12, 3
  rng = np.random.default_rng(3)
  x = rng.normal(size=(b, l, e)).astype(np.float32)
  valid = np.arange(l)[None] < np.array([[6], [2], [4]])
  mask = layers.make_attention_mask(valid, causal=True)
  bias = rng.normal(size=(1, h, l, l)).astype(np.float32)
  for joined in (False, True):
    per = layers.MultiHeadAttention(h, e // h, joined_kv=joined, per_head=True)
    batched = per.clone(per_head=False)
    params = nn.meta.unbox(per.init(jax.random.PRNGKey(0), x, mask=mask))
    params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape),
                          params)

    def grads(module):
      def loss(p, x):
        return jnp.sum(jnp.sin(module.apply(p, x, mask=mask, bias=bias)))
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (v1, g1), (v2, g2) = grads(per), grads(batched)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_layout_follows_head_sharding():
  """per_head=None: per head unless the logical rules shard the head axis;
  joined kernels (T5, BERT) always batch the heads."""
  from recsys_jax.core import partitioning  # pylint: disable=g-import-not-at-top
  x = jnp.ones((2, 4, 8))
  attn = layers.MultiHeadAttention(num_heads=2, head_dim=4)
  params = attn.init(jax.random.PRNGKey(0), x)

  def einsum_ranks(rules, module=attn):
    with partitioning.with_rules(rules):
      jaxpr = jax.make_jaxpr(lambda p: module.apply(p, x))(params)
    return sorted({len(e.outvars[0].aval.shape) for e in jaxpr.eqns
                   if e.primitive.name == "dot_general"})

  assert not layers.axis_sharded("heads")
  with partitioning.with_rules(partitioning.DATA_PARALLEL_RULES):
    assert not layers.axis_sharded("heads", "joined_kv")
  with partitioning.with_rules(partitioning.TENSOR_PARALLEL_RULES):
    assert layers.axis_sharded("heads")
    assert layers.axis_sharded("joined_kv")
    assert not layers.axis_sharded("kv")
  # Per head: 2-D projections and [B, L, L] / [B, L, D] attention einsums;
  # heads batched: [B, H, L, L] / [B, L, H, D] einsums (rank 4).
  assert einsum_ranks(partitioning.DATA_PARALLEL_RULES) == [2, 3]
  assert einsum_ranks(partitioning.TENSOR_PARALLEL_RULES) == [2, 4]
  joined = layers.MultiHeadAttention(num_heads=2, head_dim=4, joined_kv=True)
  params = joined.init(jax.random.PRNGKey(0), x)
  assert einsum_ranks(partitioning.DATA_PARALLEL_RULES, joined) == [2, 4]


# Decoding ----------------------------------------------------------------------


def test_kv_cache_steps_equal_full_causal_attention():
  """Position-by-position cached self-attention == one causal pass."""
  b, t, e, h, d = 2, 5, 8, 2, 4
  rng = np.random.default_rng(6)
  x = rng.normal(size=(b, t, e)).astype(np.float32)
  rel = rng.normal(size=(1, h, t, t)).astype(np.float32)  # per (q, k) bias
  causal = np.tril(np.ones((t, t), bool))[None, None]
  attn = layers.MultiHeadAttention(h, d, joined_kv=True, use_bias=False,
                                   scale_queries=False)
  params = {"params": perturbed(attn.init(jax.random.PRNGKey(0), x), 7)}
  full = np.asarray(attn.apply(params, x, mask=causal, bias=rel))

  # The first decode call creates the (zero) cache at full length.
  _, variables = attn.apply(params, x, decode=True, mutable=["cache"])
  cache = jax.tree.map(jnp.zeros_like, variables["cache"])
  assert cache["cached_key"].shape == (b, h, t, d)

  @jax.jit
  def step(cache, xi, i):
    bias = jax.lax.dynamic_slice_in_dim(jnp.asarray(rel), i, 1, axis=2)
    mask = (jnp.arange(t) <= i)[None, None, None, :]
    out, mutated = attn.apply({**params, "cache": cache}, xi, mask=mask,
                              bias=bias, decode=True, decode_index=i,
                              mutable=["cache"])
    return out, mutated["cache"]

  for i in range(t):
    out, cache = step(cache, x[:, i:i + 1], jnp.int32(i))
    np.testing.assert_allclose(np.asarray(out)[:, 0], full[:, i], rtol=1e-5,
                               atol=1e-5, err_msg=f"position {i}")
  with pytest.raises(ValueError, match="one position per call"):
    attn.apply({**params, "cache": cache}, x[:, :2], decode=True,
               decode_index=jnp.int32(0), mutable=["cache"])


def test_call_errors_are_named():
  x = jnp.ones((1, 3, 8))
  attn = layers.MultiHeadAttention(2, 4)
  variables = attn.init(jax.random.PRNGKey(0), x)
  kv = attn.apply(variables, x, method=attn.project_memory)
  with pytest.raises(ValueError, match="not both"):
    attn.apply(variables, x, x, memory_kv=kv)
  with pytest.raises(ValueError, match="memory_kv"):
    attn.apply(variables, x, x, decode=True, mutable=["cache"])
  with pytest.raises(ValueError, match="4-D"):
    attn.apply(variables, x, bias=jnp.zeros((3, 3)))


def test_attention_dropout_uses_the_dropout_rng():
  x = np.random.default_rng(8).normal(size=(2, 4, 8)).astype(np.float32)
  attn = layers.MultiHeadAttention(2, 4, dropout_rate=0.5)
  variables = attn.init(jax.random.PRNGKey(0), x)
  apply = jax.jit(lambda rng: attn.apply(variables, x, deterministic=False,
                                         rngs={"dropout": rng}))
  base = np.asarray(attn.apply(variables, x))
  a, a2, c = (np.asarray(apply(jax.random.PRNGKey(s))) for s in (1, 1, 2))
  np.testing.assert_array_equal(a, a2)
  assert np.abs(a - base).max() > 1e-3 and np.abs(a - c).max() > 1e-3


# The cross-attention block ----------------------------------------------------


def np_layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_cross_attention_block_matches_numpy():
  """Latents attending to a padded memory of another width (a Perceiver /
  Q-Former step): pre-LN residual attention, then a pre-LN residual MLP."""
  b, q, k, e, m, h = 2, 4, 7, 8, 6, 2
  rng = np.random.default_rng(9)
  queries = rng.normal(size=(b, q, e)).astype(np.float32)
  memory = rng.normal(size=(b, k, m)).astype(np.float32)
  valid = np.arange(k)[None] < np.array([[7], [4]])
  block = layers.CrossAttentionBlock(num_heads=h, mlp_dim=16)
  variables = jitted(block, "init")(jax.random.PRNGKey(0), queries, memory,
                                    valid)
  p = perturbed(variables, 10)
  assert set(p) == {"attention", "query_norm", "memory_norm", "mlp",
                    "mlp_norm"}
  out = np.asarray(jitted(block)({"params": p}, queries, memory, valid))

  x = queries.astype(np.float64)
  ln = lambda name, v: np_layer_norm(v, p[name]["scale"], p[name]["bias"])
  x = x + np_attention(ln("query_norm", x), ln("memory_norm", memory),
                       p["attention"], h, e // h, joined=False,
                       use_bias=True, scale=True,
                       mask=valid[:, None, None, :])
  hidden = np_gelu(ln("mlp_norm", x) @ p["mlp"]["wi"]["kernel"] +
                   p["mlp"]["wi"]["bias"])
  ref = x + hidden @ p["mlp"]["wo"]["kernel"] + p["mlp"]["wo"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=5e-5, atol=5e-5)
  # Without a mask every memory position is read.
  unmasked = np.asarray(jitted(block)({"params": p}, queries, memory))
  np.testing.assert_allclose(unmasked[0], out[0], rtol=1e-5, atol=1e-5)
  assert np.abs(unmasked[1] - out[1]).max() > 1e-3


def test_cross_attention_block_checks_shapes():
  block = layers.CrossAttentionBlock(num_heads=2, mlp_dim=8)
  q, mem = jnp.ones((2, 3, 8)), jnp.ones((2, 5, 4))
  with pytest.raises(ValueError, match="broadcast learned queries"):
    block.init(jax.random.PRNGKey(0), q[:1], mem)
  with pytest.raises(ValueError, match="memory_mask shape"):
    block.init(jax.random.PRNGKey(0), q, mem, jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match="not divisible by num_heads=3"):
    layers.CrossAttentionBlock(num_heads=3, mlp_dim=8).init(
        jax.random.PRNGKey(0), q, mem)
