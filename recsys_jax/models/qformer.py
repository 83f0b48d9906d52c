"""A BLIP-2 Q-Former: learned queries read a memory and share layers with text.

Li et al. (2023), "BLIP-2: Bootstrapping Language-Image Pre-training with
Frozen Image Encoders and Large Language Models", here with the image
encoder's patches replaced by a memory such as an item's CF embedding cut
into chunks (`cf_memory`). One BERT-style (post-LN) stack serves two
streams:

  queries = LN_emb(learned [N, hidden])                       [B, N, H]
  text    = LN_emb(word(tokens) + position + token_type[0])   [B, T, H]
  memory  = LN_mem(memory) + memory_position[:M]   (each optional, config)
  per layer i, over x = [queries; text]:
    x = LN(x + SelfAttn(x, mask))        (mask: `attention_mask(mode, ...)`)
    q, t = x[:, :N], x[:, N:]
    q = LN(q + CrossAttn(q, memory))     (layers with i % every == 0)
    q = LN(q + FFN_query(q))             (`ffn_query`)
    t = LN(t + FFN(t))                   (BERT's FFN names)
  logits = gelu-transform-LN(text) @ word.T + bias   (`text_logits=True`)

The three masks of BLIP-2's objectives (`MASK_MODES`): 'unimodal' (ITC:
queries and text do not see each other), 'bidirectional' (ITM: all see all)
and 'multimodal_causal' (ITG: queries see queries; text token t sees the
queries and text tokens <= t). Padded text keys are never seen.
Text only (`memory=None`) is BLIP-2's text encoder: no queries, no
cross-attention, and exactly `models.bert.BertEncoder` given the same
parameters (`bert_init_mapping`).

Parameter names mirror `models/bert.py` (embeddings, `layer_{i}/attention`,
`attention_norm`, `intermediate`, `output`, `output_norm`), so a BERT
checkpoint (e.g. all-MiniLM-L6-v2 through `checkpoint_import.bert`)
initialises the shared parts through `core/init_from.InitFrom` with
`bert_init_mapping(prefix)`. The Q-Former's own parts: `queries`,
`layer_{i}/cross_attention` + `cross_attention_norm`, `layer_{i}/ffn_query/
{intermediate,output,output_norm}` (BLIP-2 copies the text FFN into it) and
`lm_head`.

Every parameter exists after `init` whatever the inputs given to it (the
missing streams are run on dummy inputs while initialising), so one tree
serves every objective. Parameters are float32 with logical axis names;
compute runs in `QFormerConfig.dtype`.
"""

import dataclasses
import numbers
import re
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from recsys_jax.models import layers

Array = jax.Array
DType = Any

MASK_MODES = ("unimodal", "bidirectional", "multimodal_causal")
# BERT's segment embeddings: the text always uses segment 0 (as BertEncoder
# does by default); the table keeps BERT's shape so it copies from one.
TYPE_VOCAB_SIZE = 2


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Hyperparameters of `QFormer`.

  Attributes:
    vocab_size: the Q-Former's text vocabulary.
    hidden: width of queries and text (BERT's hidden_size).
    num_layers: layers of the shared stack.
    num_heads: heads of the self- and cross-attention (divide `hidden`).
    mlp_dim: hidden width of both FFNs (BERT's intermediate_size).
    num_queries: N, the learned queries (BLIP-2: 32).
    cross_attention_every: cross-attention in layers i % every == 0.
    memory_dim: width of one memory position (a CF chunk: D // M).
    max_text_len: position embeddings (longest text).
    dropout_rate: dropout of embeddings and residual branches.
    attention_dropout_rate: dropout on attention probabilities.
    layer_norm_eps: epsilon of every LayerNorm (BERT: 1e-12).
    memory_norm: a LayerNorm over each memory position before any layer
      reads it (BLIP-2's `ln_vision` on the image features). A CF table's
      coordinates are small (a SASRec export's ~0.08) against the queries'
      LayerNormed ~1, so unnormalised they reach the queries weakly.
      On by default, as BLIP-2 always normalises its image features
      (docs/ILM.md: off, phase 1 barely learned).
    memory_positions: learned embeddings of up to this many memory
      positions, added after `memory_norm` (0: none). Without them the
      chunks of a CF embedding are an unordered set to the cross-attention
      (ViT features carry their positions; CF chunks do not). Set it to
      the number of chunks (gin/models/qformer.gin: %CF_CHUNKS); the
      default 0 keeps a memory of any length valid.
    dtype: compute dtype (a jnp dtype or its name); params are float32.
  """
  vocab_size: int
  hidden: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  num_queries: int = 8
  cross_attention_every: int = 1
  memory_dim: int = 16
  max_text_len: int = 64
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  memory_norm: bool = True
  memory_positions: int = 0
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "hidden", "num_layers", "num_heads", "mlp_dim",
                 "num_queries", "cross_attention_every", "memory_dim",
                 "max_text_len"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ValueError(f"QFormerConfig.{name}={value!r}: expected a "
                         "positive integer")
    if not _is_int(self.memory_positions) or self.memory_positions < 0:
      raise ValueError(f"QFormerConfig.memory_positions="
                       f"{self.memory_positions!r}: expected an integer >= 0")
    if not isinstance(self.memory_norm, bool):
      raise ValueError(f"QFormerConfig.memory_norm={self.memory_norm!r}: "
                       "expected True or False")
    if self.hidden % self.num_heads:
      raise ValueError(f"QFormerConfig.hidden={self.hidden} is not divisible "
                       f"by num_heads={self.num_heads}")
    for name in ("dropout_rate", "attention_dropout_rate"):
      value = getattr(self, name)
      if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"QFormerConfig.{name}={value!r}: expected "
                         "0 <= rate < 1")
    jnp.dtype(self.dtype)  # a TypeError names an unknown dtype

  def has_cross_attention(self, layer: int) -> bool:
    """Whether layer `layer` cross-attends to the memory."""
    return layer % self.cross_attention_every == 0


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_mode(mode: str) -> None:
  if mode not in MASK_MODES:
    raise ValueError(f"mask_mode={mode!r}; expected one of {MASK_MODES}")


def attention_mask(mode: str, num_queries: int, text_mask: Array) -> Array:
  """The self-attention mask over `[queries; text]` of one BLIP-2 objective.

  Args:
    mode: one of `MASK_MODES`: 'unimodal' (queries see queries, text sees
      text), 'bidirectional' (every position sees every position),
      'multimodal_causal' (queries see queries; text token t sees all
      queries and text tokens <= t).
    num_queries: N, the queries in front of the text (0: text only).
    text_mask: `[B, T]` bool/int, nonzero at real text tokens.

  Returns:
    bool `[B, N + T, N + T]`, True where row (query position) may attend to
    column (key). Padded text keys are never seen; the rows of padded text
    positions are those of real ones (like BERT, only keys are masked). A
    row with no key at all (an all-padding text, 'unimodal' or text only)
    gets the shared attention's uniform softmax: finite, meaningless.
  """
  _check_mode(mode)
  if not _is_int(num_queries) or num_queries < 0:
    raise ValueError(f"num_queries={num_queries!r}: expected an integer "
                     ">= 0")
  text_mask = jnp.asarray(text_mask)
  if text_mask.ndim != 2:
    raise ValueError(f"text_mask shape {text_mask.shape}: expected "
                     "[batch, text_length]")
  batch = text_mask.shape[0]
  key_valid = jnp.concatenate(
      [jnp.ones((batch, num_queries), bool), text_mask.astype(bool)], axis=1)
  length = key_valid.shape[1]
  pos = jnp.arange(length)
  is_query = pos < num_queries
  if mode == "unimodal":
    allowed = is_query[:, None] == is_query[None, :]
  elif mode == "bidirectional":
    allowed = jnp.ones((length, length), bool)
  else:  # multimodal_causal: queries come first, so 'col <= row' covers them
    allowed = jnp.where(is_query[:, None], is_query[None, :],
                        pos[None, :] <= pos[:, None])
  return allowed[None] & key_valid[:, None, :]


def cf_memory(table: Array, ids: Array, num_chunks: int) -> Array:
  """Rows `ids` of a CF table cut into `num_chunks` memory positions.

  Args:
    table: `[V, D]` constant item embeddings (row 0 = padding).
    ids: int array `[...]` of rows.
    num_chunks: M; must divide D.

  Returns:
    `[..., M, D // M]`: chunk m is `table[id, m * D // M:(m + 1) * D // M]`.
  """
  table = jnp.asarray(table)
  if table.ndim != 2:
    raise ValueError(f"cf_memory: table shape {table.shape}; expected "
                     "[num_items + 1, D]")
  if not _is_int(num_chunks) or num_chunks < 1:
    raise ValueError(f"cf_memory: num_chunks={num_chunks!r}; expected a "
                     "positive integer")
  dim, num_chunks = table.shape[1], int(num_chunks)
  if dim % num_chunks:
    raise ValueError(f"cf_memory: the CF embedding width D={dim} is not "
                     f"divisible by num_chunks M={num_chunks}")
  ids = jnp.asarray(ids)
  rows = jnp.take(table, ids, axis=0)  # [..., D]
  return rows.reshape(ids.shape + (num_chunks, dim // num_chunks))


def _layer_norm(cfg: QFormerConfig, name: Optional[str] = None):
  return layers.layer_norm(jnp.dtype(cfg.dtype), name,
                           epsilon=cfg.layer_norm_eps)


def _attention(cfg: QFormerConfig, name: str) -> layers.MultiHeadAttention:
  """BERT's attention layout: joined `[in, H]` kernels with biases, scaled."""
  return layers.MultiHeadAttention(
      cfg.num_heads, cfg.hidden // cfg.num_heads,
      dropout_rate=cfg.attention_dropout_rate, dtype=jnp.dtype(cfg.dtype),
      joined_kv=True, name=name)


def _feed_forward(cfg: QFormerConfig, x: Array, deterministic: bool) -> Array:
  """LN(x + Dense(gelu(Dense(x)))) with BERT's names, in the calling module.

  `intermediate`, `output`, `output_norm`: called from `QFormerLayer` they
  are BERT's text FFN, from `QueryFeedForward` the `ffn_query` copy.
  """
  dtype = jnp.dtype(cfg.dtype)
  shape = x.shape
  rows = x.reshape(-1, shape[-1])  # 2-D matmuls (see `layers.matmul_2d`)
  y = layers.dense(cfg.mlp_dim, ("embed", "mlp"), dtype=dtype,
                   name="intermediate")(rows)
  y = layers.gelu(y)
  y = layers.dense(shape[-1], ("mlp", "embed"), dtype=dtype,
                   name="output")(y)
  y = layers.Dropout(cfg.dropout_rate)(y.reshape(shape),
                                       deterministic=deterministic)
  return _layer_norm(cfg, "output_norm")(x + y)


class QueryFeedForward(nn.Module):
  """The queries' FFN (BLIP-2's intermediate_query / output_query)."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    return _feed_forward(self.config, x, deterministic)


class QFormerEmbeddings(nn.Module):
  """BERT's embeddings (word, position, token type 0, LayerNorm, dropout).

  The learned queries share the LayerNorm and dropout (as in BLIP-2) but get
  no position or type embedding.
  """
  config: QFormerConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.word_embeddings = layers.embedding(
        cfg.vocab_size, cfg.hidden, ("vocab", "embed"), dtype=dtype)
    self.position_embeddings = layers.embedding(
        cfg.max_text_len, cfg.hidden, ("length", "embed"), dtype=dtype)
    self.token_type_embeddings = layers.embedding(
        TYPE_VOCAB_SIZE, cfg.hidden, (None, "embed"), dtype=dtype)
    self.LayerNorm = _layer_norm(cfg)  # pylint: disable=invalid-name
    self.dropout = layers.Dropout(cfg.dropout_rate)

  def text(self, tokens: Array, *, deterministic: bool = True) -> Array:
    """`[B, T]` ids -> `[B, T, hidden]`, exactly `BertEmbeddings`."""
    dtype = jnp.dtype(self.config.dtype)
    x = self.word_embeddings(tokens)
    x = x + self.position_embeddings(jnp.arange(tokens.shape[1]))[None]
    x = x + self.token_type_embeddings.embedding[0].astype(dtype)
    x = self.dropout(self.LayerNorm(x), deterministic=deterministic)
    return nn.with_logical_constraint(x, layers.BLOCK_AXES)

  def queries(self, queries: Array, *, deterministic: bool = True) -> Array:
    """`[B, N, hidden]` learned queries -> LayerNorm, dropout."""
    x = self.dropout(self.LayerNorm(queries), deterministic=deterministic)
    return nn.with_logical_constraint(x, layers.BLOCK_AXES)

  def word_table(self) -> Array:
    """The `[vocab_size, hidden]` word embeddings (the tied output layer)."""
    return self.word_embeddings.embedding


class QFormerLayer(nn.Module):
  """One post-LN layer over `[queries; text]` (module docstring).

  Attributes:
    config: the architecture.
    cross_attention: whether the queries read the memory in this layer.
  """
  config: QFormerConfig
  cross_attention: bool

  @nn.compact
  def __call__(self, x: Array, num_queries: int, *,
               mask: Optional[Array] = None,
               memory: Optional[Array] = None,
               memory_mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """Runs the layer on `x` `[B, N + T, hidden]`.

    Args:
      x: the queries (first `num_queries` positions) then the text.
      num_queries: N (0: text only).
      mask: bool `[B, 1, N + T, N + T]` self-attention mask, or None.
      memory: `[B, M, memory_dim]`, read by the queries when this layer has
        cross-attention.
      memory_mask: `[B, M]` bool, False at padded memory positions.
      deterministic: False applies dropout (needs a 'dropout' rng).
    """
    cfg = self.config
    dropout = layers.Dropout(cfg.dropout_rate)
    h = _attention(cfg, "attention")(x, mask=mask,
                                     deterministic=deterministic)
    h = dropout(h, deterministic=deterministic)
    x = _layer_norm(cfg, "attention_norm")(x + h)

    q, t = x[:, :num_queries], x[:, num_queries:]
    outputs = []
    if num_queries:
      if self.cross_attention and memory is not None:
        cross_mask = (None if memory_mask is None
                      else layers.key_mask(memory_mask))
        h = _attention(cfg, "cross_attention")(
            q, memory, mask=cross_mask, deterministic=deterministic)
        h = dropout(h, deterministic=deterministic)
        q = _layer_norm(cfg, "cross_attention_norm")(q + h)
      outputs.append(QueryFeedForward(cfg, name="ffn_query")(
          q, deterministic=deterministic))
    if t.shape[1]:
      outputs.append(_feed_forward(cfg, t, deterministic))
    x = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
    return nn.with_logical_constraint(x, layers.BLOCK_AXES)


class LmHead(nn.Module):
  """BERT's LM head: Dense + GELU + LayerNorm, tied word embeddings + bias."""
  config: QFormerConfig

  @nn.compact
  def __call__(self, x: Array, word_table: Array) -> Array:
    """`[B, T, hidden]` -> float32 logits `[B, T, vocab_size]`."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    h = layers.dense(cfg.hidden, ("embed", "mlp"), dtype=dtype,
                     name="transform")(rows)
    h = _layer_norm(cfg, "transform_norm")(layers.gelu(h))
    bias = self.param("bias", layers.logical(nn.initializers.zeros,
                                             ("vocab",)),
                      (cfg.vocab_size,), jnp.float32)
    logits = layers.matmul_2d(h, word_table.T, dtype).astype(jnp.float32)
    logits = (logits + bias).reshape(shape[:-1] + (cfg.vocab_size,))
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class QFormer(nn.Module):
  """BLIP-2's Q-Former (module docstring); `config` sizes it."""
  config: QFormerConfig

  def setup(self):
    cfg = self.config
    self.embeddings = QFormerEmbeddings(cfg)
    self.queries = self.param(
        "queries", layers.logical(layers.default_kernel_init,
                                  ("queries", "embed")),
        (cfg.num_queries, cfg.hidden), jnp.float32)
    # Named layer_0, layer_1, ... like BertEncoder's layers.
    self.layer = [QFormerLayer(cfg, cfg.has_cross_attention(i))
                  for i in range(cfg.num_layers)]
    self.lm_head = LmHead(cfg)
    if cfg.memory_norm:
      self.memory_norm = _layer_norm(cfg)
    if cfg.memory_positions:
      # Unit scale, like the LayerNormed memory it is added to.
      self.memory_position = self.param(
          "memory_position", layers.logical(nn.initializers.normal(1.0),
                                            (None, None)),
          (cfg.memory_positions, cfg.memory_dim), jnp.float32)

  def __call__(self, memory: Optional[Array] = None,
               text_tokens: Optional[Array] = None, *,
               memory_mask: Optional[Array] = None,
               mask_mode: str = "unimodal", deterministic: bool = True,
               text_logits: bool = False) -> Dict[str, Optional[Array]]:
    """Encodes the queries (reading `memory`) and/or a text.

    Args:
      memory: `[B, M, memory_dim]` (e.g. `cf_memory`); None = text only (no
        queries, no cross-attention: BLIP-2's text encoder).
      text_tokens: `[B, T]` int ids, 0 = padding, T <= max_text_len; None =
        queries only.
      memory_mask: `[B, M]` bool, False at padded memory positions (default
        all valid).
      mask_mode: one of `MASK_MODES` (see `attention_mask`).
      deterministic: False applies dropout (needs a 'dropout' rng).
      text_logits: also return the LM head's logits of the text positions.

    Returns:
      {'queries': `[B, N, hidden]` or None, 'text': `[B, T, hidden]` or None,
       and with `text_logits` 'logits': float32 `[B, T, vocab_size]`}.
    """
    self._check_inputs(memory, text_tokens, memory_mask, mask_mode,
                       text_logits)
    if self.is_initializing() and (memory is None or text_tokens is None
                                   or not text_logits):
      # Create every parameter, whichever streams this call uses (a dummy
      # pass of both streams; the real batch size keeps batch shardings).
      batch = (memory if memory is not None else text_tokens).shape[0]
      self._forward(jnp.zeros((batch, 1, self.config.memory_dim)),
                    jnp.ones((batch, 1), jnp.int32), None, "bidirectional",
                    True, True)
    return self._forward(memory, text_tokens, memory_mask, mask_mode,
                         deterministic, text_logits)

  def _check_inputs(self, memory, text_tokens, memory_mask, mask_mode,
                    text_logits) -> None:
    cfg = self.config
    _check_mode(mask_mode)
    if memory is None and text_tokens is None:
      raise ValueError("QFormer: neither memory nor text_tokens given; "
                       "expected memory [B, M, memory_dim] and/or "
                       "text_tokens [B, T]")
    if memory is not None:
      if memory.ndim != 3 or memory.shape[-1] != cfg.memory_dim:
        raise ValueError(f"QFormer: memory shape {memory.shape}; expected "
                         f"[batch, M, memory_dim={cfg.memory_dim}]")
      if cfg.memory_positions and memory.shape[1] > cfg.memory_positions:
        raise ValueError(f"QFormer: memory has {memory.shape[1]} positions; "
                         f"QFormerConfig.memory_positions="
                         f"{cfg.memory_positions} embeds at most that many")
      if memory_mask is not None and memory_mask.shape != memory.shape[:2]:
        raise ValueError(f"QFormer: memory_mask shape {memory_mask.shape}; "
                         f"expected {memory.shape[:2]}")
    elif memory_mask is not None:
      raise ValueError("QFormer: memory_mask given without memory")
    if text_tokens is not None:
      if text_tokens.ndim != 2:
        raise ValueError(f"QFormer: text_tokens shape {text_tokens.shape}; "
                         "expected [batch, text_length]")
      if text_tokens.shape[1] > cfg.max_text_len:
        raise ValueError(f"QFormer: text length {text_tokens.shape[1]} "
                         f"exceeds max_text_len={cfg.max_text_len}")
      if memory is not None and memory.shape[0] != text_tokens.shape[0]:
        raise ValueError(f"QFormer: memory batch {memory.shape[0]} != "
                         f"text_tokens batch {text_tokens.shape[0]}")
    elif text_logits:
      raise ValueError("QFormer: text_logits=True needs text_tokens")

  def _memory(self, memory: Array) -> Array:
    """`memory_norm` then the `memory_positions` embeddings (config)."""
    cfg = self.config
    if cfg.memory_norm:
      memory = self.memory_norm(memory)
    if cfg.memory_positions:
      positions = self.memory_position[:memory.shape[1]]
      memory = memory + positions.astype(memory.dtype)[None]
    return memory

  def _forward(self, memory, text_tokens, memory_mask, mask_mode,
               deterministic, text_logits) -> Dict[str, Optional[Array]]:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    parts = []
    num_queries = 0
    if memory is not None:
      num_queries = cfg.num_queries
      queries = jnp.broadcast_to(self.queries.astype(dtype)[None],
                                 (memory.shape[0],) + self.queries.shape)
      parts.append(self.embeddings.queries(queries,
                                           deterministic=deterministic))
      memory = self._memory(memory.astype(dtype))
    mask = None
    if text_tokens is not None:
      parts.append(self.embeddings.text(text_tokens,
                                        deterministic=deterministic))
      mask = attention_mask(mask_mode, num_queries, text_tokens != 0)[:, None]
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    for layer in self.layer:
      x = layer(x, num_queries, mask=mask, memory=memory,
                memory_mask=memory_mask, deterministic=deterministic)
    out = {"queries": x[:, :num_queries] if num_queries else None,
           "text": x[:, num_queries:] if text_tokens is not None else None}
    if text_logits:
      out["logits"] = self.lm_head(out["text"], self.embeddings.word_table())
    return out


def bert_init_mapping(prefix: str = "", *, word_embeddings: bool = True,
                      position_embeddings: bool = True,
                      query_ffn: bool = True,
                      source_prefix: str = "") -> List[Tuple[str, str]]:
  """`InitFrom` rules copying a `BertEncoder`'s parameters into a Q-Former.

  Copies the embeddings (word, position, token type, LayerNorm) and, per
  layer, the self-attention, its LayerNorm and the FFN; with `query_ffn`
  also the FFN into `ffn_query` (as BLIP-2). Queries, cross-attention and
  the LM head keep their fresh initialisation. Shapes must agree: hidden,
  heads, mlp_dim; `vocab_size` (or `word_embeddings=False`, e.g. for a
  SentencePiece Q-Former vocabulary); `max_text_len` = BERT's
  max_position_embeddings (512 for MiniLM, or `position_embeddings=False`);
  the Q-Former may have fewer layers than the BERT (the first ones copy).

  Args:
    prefix: the Q-Former's path in the model's params, e.g. 'qformer/'
      (literal, escaped in the regexes).
    word_embeddings: copy the word embeddings.
    position_embeddings: copy the position embeddings.
    query_ffn: also initialise `ffn_query` from the FFN.
    source_prefix: the BERT's path in the source params (e.g. 'text/');
      '' for an imported checkpoint (`checkpoint_import.bert`) or HF dir.

  Returns:
    `[(target_regex, source_template)]` for `InitFrom.mapping`.
  """
  if prefix and not prefix.endswith("/"):
    raise ValueError(f"bert_init_mapping: prefix={prefix!r}; expected '' or "
                     "a path ending in '/' (e.g. 'qformer/')")
  if source_prefix and not source_prefix.endswith("/"):
    raise ValueError(f"bert_init_mapping: source_prefix={source_prefix!r}; "
                     "expected '' or a path ending in '/'")
  names = ["token_type_embeddings"]
  if word_embeddings:
    names.insert(0, "word_embeddings")
  if position_embeddings:
    names.insert(-1, "position_embeddings")
  rules = [
      (rf"embeddings/({'|'.join(names)})/embedding",
       r"embeddings/\1/embedding"),
      (r"embeddings/LayerNorm/(scale|bias)", r"embeddings/LayerNorm/\1"),
      (r"layer_(\d+)/(attention/(?:query|key|value|out)|attention_norm|"
       r"intermediate|output|output_norm)/(kernel|bias|scale)",
       r"layer_\1/\2/\3"),
  ]
  if query_ffn:
    rules.append(
        (r"layer_(\d+)/ffn_query/(intermediate|output|output_norm)/"
         r"(kernel|bias|scale)", r"layer_\1/\2/\3"))
  escaped = re.escape(prefix)
  return [(escaped + target, source_prefix + source)
          for target, source in rules]


# The rules for a Q-Former at the root of the params, copying everything a
# BERT has (`bert_init_mapping` adds a prefix or leaves parts out).
BERT_INIT_MAPPING = bert_init_mapping()
