"""T5 / T5 v1.1 / mT5 encoder-decoder in Flax linen (HF-compatible numerics).

Parameter tree (t5x-style names; `recsys_jax.checkpoint_import.t5` maps HF
checkpoints onto it):

  token_embedder/embedding                      [vocab, d_model]
  encoder/relpos_bias/rel_embedding             [heads, buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale
  encoder/layers_{i}/attention/{query,key,value,out}/kernel
  encoder/layers_{i}/pre_mlp_layer_norm/scale
  encoder/layers_{i}/mlp/{wi | wi_0,wi_1}/kernel, mlp/wo/kernel
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_{i}/{pre_self_attention_layer_norm, self_attention,
                      pre_cross_attention_layer_norm,
                      encoder_decoder_attention, pre_mlp_layer_norm, mlp}
  decoder/decoder_norm/scale
  lm_head/kernel                                [d_model, vocab] (untied only)

`T5Encoder` has exactly the `token_embedder` and `encoder` subtrees, so
`encoder_params(full_params)` feeds it. Generation (greedy, beam search with
a KV cache) lives in `recsys_jax.text.generation`.
"""

import dataclasses
import json
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models import layers
from recsys_jax.models import t5_layers

Array = jax.Array
PAD_ID = 0
EOS_ID = 1

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 hyper-parameters (HF names where they exist).

  Attributes:
    tie_word_embeddings: True (T5 v1.0): logits are
      `(h * d_model**-0.5) @ embedding.T`; False (v1.1 / mT5): a separate
      unscaled `lm_head`.
    dtype: compute dtype name, 'float32' or 'bfloat16'; parameters stay
      float32.
  """
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  d_kv: int = 64
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  dtype: str = "float32"

  def __post_init__(self):
    dtype = self.dtype
    if not isinstance(dtype, str):
      dtype = jnp.dtype(dtype).name
      object.__setattr__(self, "dtype", dtype)
    if dtype not in _DTYPES:
      raise ValueError(f"T5Config.dtype must be one of {sorted(_DTYPES)}, "
                       f"got {self.dtype!r}")
    for name in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff",
                 "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"T5Config.{name} must be >= 1, got "
                         f"{getattr(self, name)!r}")
    t5_layers.parse_feed_forward_proj(self.feed_forward_proj)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def replace(self, **kwargs) -> "T5Config":
    return dataclasses.replace(self, **kwargs)

  # Presets ------------------------------------------------------------------

  @classmethod
  def tiny(cls, **kw) -> "T5Config":
    """A few-thousand-parameter model for tests."""
    base = dict(vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=64,
                num_encoder_layers=2, num_decoder_layers=2,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16)
    return cls(**{**base, **kw})

  @classmethod
  def small(cls, **kw) -> "T5Config":
    """t5-small (v1.0, 60M)."""
    return cls(**kw)

  @classmethod
  def base(cls, **kw) -> "T5Config":
    """t5-base (v1.0, 220M)."""
    base = dict(d_model=768, num_heads=12, d_kv=64, d_ff=3072,
                num_encoder_layers=12, num_decoder_layers=12)
    return cls(**{**base, **kw})

  @classmethod
  def v1_1_small(cls, **kw) -> "T5Config":
    """google/t5-v1_1-small."""
    base = dict(d_model=512, num_heads=6, d_kv=64, d_ff=1024,
                num_encoder_layers=8, num_decoder_layers=8,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return cls(**{**base, **kw})

  @classmethod
  def mt5_small(cls, **kw) -> "T5Config":
    """google/mt5-small."""
    return cls.v1_1_small(**{"vocab_size": 250112, **kw})

  # Serialisation ------------------------------------------------------------

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
    """Inverse of `to_dict`; unknown keys are an error naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown T5Config keys {unknown}; expected a subset of "
                       f"{sorted(names)}")
    return cls(**d)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "T5Config":
    """Reads a Hugging Face T5/mT5 `config.json` dict.

    Output-layer handling follows transformers: `scale_decoder_outputs` when
    present (transformers>=5 writes it and always sets tie_word_embeddings),
    mT5 never scales, older T5 configs scale iff `tie_word_embeddings`
    (default True).
    """
    def get(key, default=None, required=False):
      if key in hf and hf[key] is not None:
        return hf[key]
      if required:
        raise ValueError(f"HF T5 config lacks required key {key!r}")
      return default

    def as_int(key, value):
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"HF T5 config key {key!r} must be an int, got "
                         f"{value!r}")
      return value

    model_type = get("model_type", "t5")
    if model_type not in ("t5", "mt5", "umt5"):
      raise ValueError(f"HF config model_type {model_type!r} is not t5/mt5")
    if model_type == "umt5":
      raise ValueError("umT5 (per-layer relative biases) is not supported")
    if "scale_decoder_outputs" in hf:
      tied = bool(hf["scale_decoder_outputs"])
    elif model_type == "mt5":
      tied = False
    else:
      tied = bool(get("tie_word_embeddings", True))
    num_layers = as_int("num_layers", get("num_layers", required=True))
    kw = dict(
        vocab_size=as_int("vocab_size", get("vocab_size", required=True)),
        d_model=as_int("d_model", get("d_model", required=True)),
        num_heads=as_int("num_heads", get("num_heads", required=True)),
        d_kv=as_int("d_kv", get("d_kv", required=True)),
        d_ff=as_int("d_ff", get("d_ff", required=True)),
        num_encoder_layers=num_layers,
        num_decoder_layers=as_int("num_decoder_layers",
                                  get("num_decoder_layers", num_layers)),
        relative_attention_num_buckets=as_int(
            "relative_attention_num_buckets",
            get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=as_int(
            "relative_attention_max_distance",
            get("relative_attention_max_distance", 128)),
        dropout_rate=float(get("dropout_rate", 0.1)),
        layer_norm_epsilon=float(get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=str(get("feed_forward_proj", "relu")),
        tie_word_embeddings=tied,
    )
    kw.update(overrides)
    return cls(**kw)


def _check_tokens(name: str, tokens: Array):
  if tokens.ndim != 2:
    raise ValueError(
        f"{name} must be [batch, length], got shape {tokens.shape}")


def _token_embedder(c: T5Config) -> nn.Embed:
  return layers.embedding(c.vocab_size, c.d_model, ("vocab", "embed"),
                          dtype=c.compute_dtype, name="token_embedder",
                          init=nn.initializers.normal(stddev=1.0))


class T5Encoder(nn.Module):
  """The encoder half alone (same parameter names as in `T5`)."""
  config: T5Config

  def setup(self):
    self.token_embedder = _token_embedder(self.config)
    self.encoder = t5_layers.Encoder(self.config, name="encoder")

  def __call__(self, encoder_input_tokens: Optional[Array] = None,
               encoder_mask: Optional[Array] = None, *,
               inputs_embeds: Optional[Array] = None,
               prefix: Optional[t5_layers.Prefixes] = None,
               deterministic: bool = True) -> Array:
    return _encode(self, encoder_input_tokens, encoder_mask, inputs_embeds,
                   deterministic, prefix)


def _encode(module, tokens, mask, inputs_embeds, deterministic, prefix=None):
  """Shared by `T5.encode` and `T5Encoder`."""
  if inputs_embeds is not None:
    if tokens is not None:
      raise ValueError("pass encoder_input_tokens or inputs_embeds, not both")
    d_model = module.config.d_model
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != d_model:
      raise ValueError(f"inputs_embeds must be [batch, length, "
                       f"{d_model}], got {inputs_embeds.shape}")
    x = inputs_embeds.astype(module.config.compute_dtype)
    if mask is None:
      mask = jnp.ones(x.shape[:2], bool)
  else:
    if tokens is None:
      raise ValueError("encoder_input_tokens or inputs_embeds is required")
    _check_tokens("encoder_input_tokens", tokens)
    x = module.token_embedder(tokens)
    if mask is None:
      mask = tokens != PAD_ID
  return module.encoder(x, mask, prefix=prefix, deterministic=deterministic)


class T5(nn.Module):
  """Encoder-decoder T5 returning float32 logits.

  Entry points: `encode`, `decode`, `project_encoded` (cross-attention keys
  and values for cached decoding) and `__call__` (teacher forcing).
  """
  config: T5Config

  def setup(self):
    c = self.config
    self.token_embedder = _token_embedder(c)
    self.encoder = t5_layers.Encoder(c, name="encoder")
    self.decoder = t5_layers.Decoder(c, name="decoder")
    if not c.tie_word_embeddings:
      self.lm_head = t5_layers.dense(c.vocab_size, ("embed", "vocab"),
                                     c.d_model ** -0.5, c.compute_dtype,
                                     name="lm_head")

  def encode(self, encoder_input_tokens: Optional[Array],
             encoder_mask: Optional[Array] = None, *,
             inputs_embeds: Optional[Array] = None,
             prefix: Optional[t5_layers.Prefixes] = None,
             deterministic: bool = True) -> Array:
    """Encoder outputs `[B, L, d_model]` (compute dtype).

    Args:
      encoder_input_tokens: `[B, L]` int ids, 0 = padding; may be None when
        `inputs_embeds` is given.
      encoder_mask: `[B, L]` bool; default `tokens != 0` (or all True with
        `inputs_embeds`).
      inputs_embeds: `[B, L, d_model]` replacing the token embeddings (soft
        tokens).
      prefix: per encoder layer, a `layers.PrefixKV` prepended to its
        self-attention keys and values (prefix tuning).
      deterministic: False applies dropout (needs a 'dropout' rng).
    """
    return _encode(self, encoder_input_tokens, encoder_mask, inputs_embeds,
                   deterministic, prefix)

  def project_encoded(self, encoded: Array) -> t5_layers.CrossKV:
    """Per decoder layer, cross-attention (key, value) `[B, H, L, d_kv]`.

    Computed once per source for cached decoding (`decode(cross_kv=...)`).
    """
    return self.decoder.project_encoded(encoded)

  def decode(self, encoded: Optional[Array], encoder_mask: Optional[Array],
             decoder_input_tokens: Array, *,
             decoder_positions: Optional[Array] = None,
             cross_kv: Optional[t5_layers.CrossKV] = None,
             prefix: Optional[t5_layers.Prefixes] = None,
             decode: bool = False, deterministic: bool = True) -> Array:
    """Decoder logits `[B, T, vocab]` (float32).

    Args:
      encoded: `[B, L, d_model]` from `encode`; may be None with `cross_kv`.
      encoder_mask: `[B, L]` bool (None = no encoder padding).
      decoder_input_tokens: `[B, T]`, starting with the start id 0; `T == 1`
        per call in cached decoding.
      decoder_positions: optional `[B, T]` positions for the relative bias.
      cross_kv: `project_encoded(encoded)`, used instead of `encoded`.
      prefix: per decoder layer, a `layers.PrefixKV` prepended to its
        self-attention keys and values (prefix tuning).
      decode: KV-cache mode (mutable 'cache' collection; see
        `t5_layers.Decoder`).
      deterministic: False applies dropout (needs a 'dropout' rng).
    """
    _check_tokens("decoder_input_tokens", decoder_input_tokens)
    if encoder_mask is None:
      if encoded is None:
        raise ValueError("decode with cross_kv needs the encoder_mask")
      encoder_mask = jnp.ones(encoded.shape[:2], bool)
    x = self.token_embedder(decoder_input_tokens)
    h = self.decoder(x, encoded, encoder_mask, decoder_positions,
                     cross_kv=cross_kv, prefix=prefix, decode=decode,
                     deterministic=deterministic)
    if self.config.tie_word_embeddings:
      logits = self.token_embedder.attend(h * (self.config.d_model ** -0.5))
    else:
      logits = self.lm_head(h.reshape(-1, h.shape[-1])).reshape(
          h.shape[:-1] + (-1,))
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)

  def __call__(self, encoder_input_tokens: Optional[Array],
               decoder_input_tokens: Array, *,
               encoder_mask: Optional[Array] = None,
               inputs_embeds: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               encoder_prefix: Optional[t5_layers.Prefixes] = None,
               decoder_prefix: Optional[t5_layers.Prefixes] = None,
               decode: bool = False, deterministic: bool = True) -> Array:
    """Teacher-forced logits `[B, T, vocab]` (prefixes: see `encode` /
    `decode`)."""
    if encoder_mask is None and inputs_embeds is None:
      encoder_mask = encoder_input_tokens != PAD_ID
    elif encoder_mask is None:
      encoder_mask = jnp.ones(inputs_embeds.shape[:2], bool)
    encoded = self.encode(encoder_input_tokens, encoder_mask,
                          inputs_embeds=inputs_embeds,
                          prefix=encoder_prefix, deterministic=deterministic)
    return self.decode(encoded, encoder_mask, decoder_input_tokens,
                       decoder_positions=decoder_positions,
                       prefix=decoder_prefix, decode=decode,
                       deterministic=deterministic)


def encoder_params(params: Mapping[str, Any]) -> dict:
  """The `T5Encoder` subtree of full `T5` params."""
  missing = [k for k in ("token_embedder", "encoder") if k not in params]
  if missing:
    raise KeyError(
        f"params lack {missing}; got top-level keys {sorted(params)}")
  return {"token_embedder": params["token_embedder"],
          "encoder": params["encoder"]}


def init_params(config: T5Config, rng: Array, *, encoder_only: bool = False):
  """Boxed (logically partitioned) float32 params, initialised under jit."""
  tokens = jnp.ones((1, 2), jnp.int32)
  model = T5Encoder(config) if encoder_only else T5(config)
  args = (tokens,) if encoder_only else (tokens, tokens)
  return jax.jit(lambda r: model.init(r, *args)["params"])(rng)


def config_to_json(config: T5Config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)
