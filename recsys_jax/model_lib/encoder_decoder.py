"""Encoder-decoder (T5) model wrapper: teacher-forced loss, scoring, decoding.

The role of t5x's `EncoderDecoderModel`, with the features of seqio's
`EncDecFeatureConverter` (pack=False):

  encoder_input_tokens   [B, L] int32, 0 = padding
  decoder_input_tokens   [B, T] int32, targets shifted right, start id 0
  decoder_target_tokens  [B, T] int32, EOS-terminated, 0 = padding
  decoder_loss_weights   [B, T] (optional; default targets != 0)

Soft tokens: embeddings made outside the LM enter the encoder in place of
token embeddings, the way ILM (Q-Former), REGEN, CoLLM and LANCER feed an LM.
They come from one of

  * `soft_token_module`, a Flax module owned by this wrapper whose parameters
    live under `params['soft_tokens']` (so gradients reach it, and the T5
    subtrees keep the layout `checkpoint_import.t5` writes; freezing the LM
    is a path pattern on `token_embedder|encoder|decoder|lm_head`). It is
    called as `module(batch, deterministic=...)` and returns `embeds`
    `[B, S, d_model]` or `(embeds, mask [B, S] bool)`;
  * batch features `soft_prefix` `[B, S, d_model]` (and optional
    `soft_prefix_mask` `[B, S]`), e.g. precomputed frozen encodings.

and are placed by `soft_token_mode`:

  'prefix': `[soft tokens ; token embeddings]` with masks concatenated (the
     encoder's relative positions count the S prefix positions, padded ones
     included);
  'slots': every position of `encoder_input_tokens` equal to `slot_id` is
     replaced, in order, by the next soft token of its row; a slot whose soft
     token is masked, or beyond the S given, is masked out.

Without soft tokens (no module, no `soft_prefix`) the encoder reads the
tokens alone, slot ids included.

Prefix tuning (LANCER's knowledge and reasoning prompts): a `prefix_module`
(params under `params['prefix']`) called as `module(batch,
deterministic=...)` returns `(encoder_prefix, decoder_prefix)`, each None or
one `layers.PrefixKV` (keys/values `[B, P, heads, d_kv]`, mask `[B, P]`) per
layer of that stack, prepended to the layer's self-attention keys and values
in training, scoring and (beam-search) generation.
"""

import dataclasses
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recsys_jax.model_lib import base
from recsys_jax.models import t5 as t5_lib
from recsys_jax.text import generation

Array = jax.Array
Batch = Mapping[str, Array]

ENCODER_INPUT_TOKENS = "encoder_input_tokens"
DECODER_INPUT_TOKENS = "decoder_input_tokens"
DECODER_TARGET_TOKENS = "decoder_target_tokens"
DECODER_LOSS_WEIGHTS = "decoder_loss_weights"
SOFT_PREFIX = "soft_prefix"
SOFT_PREFIX_MASK = "soft_prefix_mask"
MODEL_FEATURES = (ENCODER_INPUT_TOKENS, DECODER_INPUT_TOKENS,
                  DECODER_TARGET_TOKENS, DECODER_LOSS_WEIGHTS)

SOFT_TOKENS_KEY = "soft_tokens"  # params subtree of the soft-token module
PREFIX_KEY = "prefix"  # params subtree of the prefix module
_MODULE_KEYS = (SOFT_TOKENS_KEY, PREFIX_KEY)
SOFT_TOKEN_MODES = ("prefix", "slots")
# The additive sums of `loss_fn`'s aux.
METRIC_SUMS = (base.LOSS_SUM, base.WEIGHT_SUM, "correct_sum", "nll_sum")


class SoftTokens(NamedTuple):
  embeds: Array  # [B, S, d_model]
  mask: Array    # [B, S] bool


def generate(module: t5_lib.T5, params, *, encoder_input_tokens, encoder_mask,
             inputs_embeds, max_decode_len: int, num_beams: int,
             alpha: float, eos_id: int, encoder_prefix=None,
             decoder_prefix=None):
  """The one call into the decoding code (`text.generation`, jitted, KV
  cache): `decoding.BeamResult` of `[B, K, T]` tokens, best first."""
  return generation.generate(module, params, encoder_input_tokens,
                             max_decode_len=max_decode_len,
                             num_beams=num_beams, alpha=alpha,
                             encoder_mask=encoder_mask,
                             inputs_embeds=inputs_embeds, eos_id=eos_id,
                             encoder_prefix=encoder_prefix,
                             decoder_prefix=decoder_prefix)


def _embed_tokens(module: t5_lib.T5, tokens: Array) -> Array:
  """The encoder's token embeddings `[B, L, d_model]` (compute dtype)."""
  return module.token_embedder(tokens)


def token_cross_entropy(logits: Array, targets: Array, *,
                        label_smoothing: float = 0.0, z_loss: float = 0.0
                        ) -> Tuple[Array, Array, Array]:
  """Per-token losses of `[..., V]` logits against `[...]` targets.

  Label smoothing follows t5x: the target gets `1 - label_smoothing`, every
  other id `label_smoothing / (V - 1)`, and the entropy of that distribution
  is subtracted so a perfect prediction scores 0.

  Returns:
    (loss `[...]` (smoothed, plus `z_loss * logsumexp**2`), negative
    log-likelihood `[...]` (neither), correct `[...]` bool (arg-max hit)).
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  onehot = jax.nn.one_hot(targets, vocab, dtype=logits.dtype)
  target_logp = jnp.sum(logits * onehot, axis=-1) - lse
  nll = -target_logp
  loss = nll
  if label_smoothing:
    on = 1.0 - label_smoothing
    off = label_smoothing / (vocab - 1)
    # sum_v log p_v = sum_v logits_v - V * lse
    sum_logp = jnp.sum(logits, axis=-1) - vocab * lse
    entropy = -(on * np.log(on) + (vocab - 1) * off * np.log(off + 1e-20))
    loss = -(on - off) * target_logp - off * sum_logp - entropy
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  correct = jnp.argmax(logits, axis=-1) == targets
  return loss, nll, correct


def _module_record(module: nn.Module) -> Dict[str, Any]:
  """A soft-token or prefix module in the architecture record: its class,
  its config (`architecture_record()` where defined: a config may leave out
  fields added later at their defaults, so that checkpoints written before
  them still restore) and the sizes (not paths) of its frozen tables."""
  config = getattr(module, "config", None)
  as_record = getattr(config, "architecture_record", None)
  record = {"class": type(module).__name__,
            "config": (as_record() if callable(as_record) else
                       dataclasses.asdict(config)
                       if dataclasses.is_dataclass(config) else None)}
  identity = getattr(getattr(module, "tables", None), "identity", None)
  if callable(identity):
    facts = identity()
    record["tables"] = {k: facts[k] for k in ("num_items", "cf_dim",
                                              "semantic_dim") if k in facts}
  return record


class EncoderDecoderModel(base.BaseModel):
  """Training meaning of a T5 module (and optional soft-token module).

  Args:
    config: the T5 hyper-parameters.
    vocabulary: the seqio vocabulary of inputs and targets (for its EOS id
      and for detokenising generations; optional).
    soft_token_module: see the module docstring; None: tokens only (a
      `soft_prefix` batch feature is still honoured).
    soft_token_inputs: batch features the soft-token module reads, name ->
      (shape without the batch axis, dtype name), used to build the dummy
      batch that initialises it, e.g. {'history_embeddings': ((20, 384),
      'float32')}.
    soft_token_mode: 'prefix' or 'slots' (module docstring).
    slot_id: the token id marking slots ('slots' mode).
    prefix_module: a Flax module giving per-layer prefix keys/values
      (module docstring), or None.
    prefix_inputs: batch features the prefix module reads, as
      `soft_token_inputs`.
    label_smoothing: t5x-style label smoothing of the training loss.
    z_loss: coefficient of `logsumexp(logits)**2` added per token.
    max_decode_len: default generated length (EOS included) of
      `predict_batch`.
    num_beams: default beams of `predict_batch` (1: greedy).
    alpha: beam-search length-penalty exponent.
  """

  def __init__(self, config: t5_lib.T5Config, *, vocabulary=None,
               soft_token_module: Optional[nn.Module] = None,
               soft_token_inputs: Optional[
                   Mapping[str, Tuple[Sequence[int], str]]] = None,
               soft_token_mode: str = "prefix",
               slot_id: Optional[int] = None,
               prefix_module: Optional[nn.Module] = None,
               prefix_inputs: Optional[
                   Mapping[str, Tuple[Sequence[int], str]]] = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               max_decode_len: int = 32, num_beams: int = 1,
               alpha: float = 0.6):
    if soft_token_mode not in SOFT_TOKEN_MODES:
      raise ValueError(f"soft_token_mode={soft_token_mode!r}: expected one of "
                       f"{SOFT_TOKEN_MODES}")
    if soft_token_mode == "slots":
      if slot_id is None or not 0 < int(slot_id) < config.vocab_size:
        raise ValueError(f"soft_token_mode='slots' needs slot_id in 1.."
                         f"{config.vocab_size - 1}; got {slot_id!r}")
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f"label_smoothing={label_smoothing}: expected [0, 1)")
    if int(max_decode_len) < 1 or int(num_beams) < 1:
      raise ValueError(f"max_decode_len={max_decode_len}, num_beams="
                       f"{num_beams}: expected positive integers")
    if vocabulary is not None:
      if vocabulary.eos_id != t5_lib.EOS_ID or vocabulary.pad_id != (
          t5_lib.PAD_ID):
        raise ValueError(
            f"vocabulary has pad_id={vocabulary.pad_id}, eos_id="
            f"{vocabulary.eos_id}; T5 needs pad 0 and EOS 1 (the dataset's "
            "SentencePiece model is trained so: data/prepared.py)")
      if vocabulary.vocab_size > config.vocab_size:
        raise ValueError(f"vocabulary has {vocabulary.vocab_size} ids but "
                         f"T5Config.vocab_size={config.vocab_size}")
    self.config = config
    self.module = t5_lib.T5(config)
    self.vocabulary = vocabulary
    self.soft_token_module = soft_token_module
    as_spec = lambda spec: {k: (tuple(int(d) for d in shape), str(dtype))
                            for k, (shape, dtype) in (spec or {}).items()}
    self.soft_token_inputs = as_spec(soft_token_inputs)
    self.prefix_module = prefix_module
    self.prefix_inputs = as_spec(prefix_inputs)
    self.soft_token_mode = soft_token_mode
    self.slot_id = None if slot_id is None else int(slot_id)
    self.label_smoothing = float(label_smoothing)
    self.z_loss = float(z_loss)
    self.max_decode_len = int(max_decode_len)
    self.num_beams = int(num_beams)
    self.alpha = float(alpha)

  # -- the model contract ----------------------------------------------------

  def get_initial_variables(self, rng: Array,
                            batch_size: int = 2) -> Dict[str, Any]:
    """{'params': T5 subtrees (+ 'soft_tokens', 'prefix')}, logically boxed
    leaves."""
    t5_rng, soft_rng, prefix_rng = jax.random.split(rng, 3)
    tokens = jnp.ones((batch_size, 2), jnp.int32)
    params = dict(self.module.init({"params": t5_rng}, tokens, tokens)[
        "params"])

    def dummy_batch(spec):
      batch = {ENCODER_INPUT_TOKENS: tokens}
      for name, (shape, dtype) in spec.items():
        batch[name] = jnp.zeros((batch_size,) + shape, dtype)
      return batch
    if self.soft_token_module is not None:
      params[SOFT_TOKENS_KEY] = self.soft_token_module.init(
          {"params": soft_rng}, dummy_batch(self.soft_token_inputs))["params"]
    if self.prefix_module is not None:
      params[PREFIX_KEY] = self.prefix_module.init(
          {"params": prefix_rng}, dummy_batch(self.prefix_inputs))["params"]
    return {"params": params}

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array]
              ) -> Tuple[Array, Dict[str, Array]]:
    """Teacher-forced token cross-entropy: (mean loss, sums).

    The sums (float32 scalars, additive over micro-batches and hosts):
    `loss_sum` (smoothed, with z-loss), `weight_sum`, `correct_sum` (arg-max
    hits) and `nll_sum` (plain negative log-likelihood), all weighted by
    `decoder_loss_weights`.
    """
    logits = self.logits(params, batch, dropout_rng)
    targets = batch[DECODER_TARGET_TOKENS]
    weights = self._loss_weights(batch)
    loss, nll, correct = token_cross_entropy(
        logits, targets, label_smoothing=self.label_smoothing,
        z_loss=self.z_loss)
    sums = {base.LOSS_SUM: jnp.sum(loss * weights),
            base.WEIGHT_SUM: jnp.sum(weights),
            "correct_sum": jnp.sum(correct * weights),
            "nll_sum": jnp.sum(nll * weights)}
    return sums[base.LOSS_SUM] / jnp.maximum(sums[base.WEIGHT_SUM], 1.0), sums

  def metric_sums(self) -> Tuple[str, ...]:
    """`loss_fn`'s sums: loss, weight (target tokens), correct, nll."""
    return METRIC_SUMS

  def summarize_metrics(self, sums: Mapping[str, float]) -> Dict[str, float]:
    """Per-token loss, arg-max accuracy and perplexity (exp of the mean
    unsmoothed negative log-likelihood)."""
    weight = max(float(sums[base.WEIGHT_SUM]), 1.0)
    return {"loss": float(sums[base.LOSS_SUM]) / weight,
            "token_accuracy": float(sums["correct_sum"]) / weight,
            "perplexity": float(np.exp(min(float(sums["nll_sum"]) / weight,
                                           80.0)))}

  def architecture(self) -> Dict[str, Any]:
    """Config fields that define the computed function (checked on restore).

    Dropout and the compute dtype are left out (training / numerics only).
    """
    record = {k: v for k, v in self.config.to_dict().items()
              if k not in ("dropout_rate", "dtype")}
    record = {"module": type(self.module).__name__, **record}
    if self.soft_token_module is not None:
      record["soft_token_module"] = _module_record(self.soft_token_module)
    if self.soft_token_module is not None or self.soft_token_mode != "prefix":
      record["soft_token_mode"] = self.soft_token_mode
      record["slot_id"] = self.slot_id
    if self.prefix_module is not None:
      record["prefix_module"] = _module_record(self.prefix_module)
    return record

  def checkpoint_meta(self) -> Dict[str, Any]:
    """JSON facts stored with checkpoints: the vocabulary they expect."""
    # Lazy: text.vocab imports TensorFlow, which the model layer otherwise
    # does not need.
    from recsys_jax.text import vocab as text_vocab  # pylint: disable=g-import-not-at-top
    meta = {"vocab_size": self.config.vocab_size}
    if self.vocabulary is not None:
      try:
        meta["text_vocab"] = text_vocab.vocab_fingerprint(self.vocabulary)
      except TypeError:  # a vocabulary type without a fingerprint
        meta["text_vocab"] = {"type": type(self.vocabulary).__name__}
    return meta

  # -- forward pieces --------------------------------------------------------

  @staticmethod
  def split_params(params) -> Tuple[Dict[str, Any], Optional[Any]]:
    """(T5 params, soft-token module params or None)."""
    t5_params = {k: v for k, v in params.items() if k not in _MODULE_KEYS}
    return t5_params, params.get(SOFT_TOKENS_KEY)

  def prefixes(self, params, batch: Batch,
               dropout_rng: Optional[Array] = None) -> Tuple[Any, Any]:
    """(encoder prefix, decoder prefix) of the batch: per layer
    `layers.PrefixKV`, or None (no prefix module, or none for that stack)."""
    if self.prefix_module is None:
      return None, None
    if PREFIX_KEY not in params:
      raise KeyError(f"params lack the {PREFIX_KEY!r} subtree of the prefix "
                     f"module; got top-level keys {sorted(params)}")
    out = self.prefix_module.apply(
        {"params": params[PREFIX_KEY]}, batch,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng})
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(f"{type(self.prefix_module).__name__} must return "
                       "(encoder_prefix, decoder_prefix)")
    return out

  def _loss_weights(self, batch: Batch) -> Array:
    weights = batch.get(DECODER_LOSS_WEIGHTS)
    if weights is None:
      weights = batch[DECODER_TARGET_TOKENS] != t5_lib.PAD_ID
    return weights.astype(jnp.float32)

  def soft_tokens(self, params, batch: Batch,
                  dropout_rng: Optional[Array] = None
                  ) -> Optional[SoftTokens]:
    """The batch's soft tokens (module output or `soft_prefix`), or None."""
    d_model = self.config.d_model
    if self.soft_token_module is not None:
      _, soft_params = self.split_params(params)
      if soft_params is None:
        raise KeyError(f"params lack the {SOFT_TOKENS_KEY!r} subtree of the "
                       "soft-token module; got top-level keys "
                       f"{sorted(params)}")
      out = self.soft_token_module.apply(
          {"params": soft_params}, batch,
          deterministic=dropout_rng is None,
          rngs=None if dropout_rng is None else {"dropout": dropout_rng})
      embeds, mask = out if isinstance(out, tuple) else (out, None)
      what = f"{type(self.soft_token_module).__name__} output"
    elif SOFT_PREFIX in batch:
      embeds, mask = batch[SOFT_PREFIX], batch.get(SOFT_PREFIX_MASK)
      what = f"batch[{SOFT_PREFIX!r}]"
    else:
      return None
    if embeds.ndim != 3 or embeds.shape[-1] != d_model:
      raise ValueError(f"{what} must be [batch, S, {d_model}] soft tokens; "
                       f"got shape {embeds.shape}")
    if mask is None:
      mask = jnp.ones(embeds.shape[:2], bool)
    if mask.shape != embeds.shape[:2]:
      raise ValueError(f"{what}: mask shape {mask.shape} does not match "
                       f"soft tokens {embeds.shape[:2]}")
    return SoftTokens(embeds, mask.astype(bool))

  def encoder_inputs(self, params, batch: Batch,
                     dropout_rng: Optional[Array] = None
                     ) -> Tuple[Optional[Array], Array]:
    """(inputs_embeds `[B, L', d_model]` or None for plain tokens, mask).

    With soft tokens L' = S + L ('prefix') or L ('slots'). `dropout_rng`
    (training) goes to the soft-token module.
    """
    tokens = batch[ENCODER_INPUT_TOKENS]
    mask = tokens != t5_lib.PAD_ID
    soft = self.soft_tokens(params, batch, dropout_rng)
    if soft is None:
      return None, mask
    t5_params, _ = self.split_params(params)
    embedded = self.module.apply({"params": t5_params}, tokens,
                                 method=_embed_tokens)
    soft_embeds = soft.embeds.astype(embedded.dtype)
    if self.soft_token_mode == "prefix":
      return (jnp.concatenate([soft_embeds, embedded], axis=1),
              jnp.concatenate([soft.mask, mask], axis=1))
    # 'slots': the k-th slot of a row takes that row's soft token k.
    is_slot = tokens == self.slot_id
    k = jnp.cumsum(is_slot, axis=1) - 1  # [B, L]
    num_soft = soft_embeds.shape[1]
    idx = jnp.clip(k, 0, num_soft - 1)
    gathered = jnp.take_along_axis(soft_embeds, idx[:, :, None], axis=1)
    soft_ok = jnp.take_along_axis(soft.mask, idx, axis=1) & (k < num_soft)
    x = jnp.where(is_slot[:, :, None], gathered, embedded)
    return x, jnp.where(is_slot, soft_ok, mask)

  def encode(self, params, batch: Batch, dropout_rng: Optional[Array] = None,
             *, encoder_prefix: Any = None) -> Tuple[Array, Array]:
    """Encoder outputs `[B, L', d_model]` and their mask `[B, L']`.

    `encoder_prefix` (from `prefixes`) when given, else computed here."""
    soft_rng = None
    if dropout_rng is not None:
      dropout_rng, soft_rng = jax.random.split(dropout_rng)
    inputs_embeds, mask = self.encoder_inputs(params, batch, soft_rng)
    t5_params, _ = self.split_params(params)
    tokens = batch[ENCODER_INPUT_TOKENS] if inputs_embeds is None else None
    if encoder_prefix is None:
      encoder_prefix = self.prefixes(params, batch)[0]
    encoded = self.module.apply(
        {"params": t5_params}, tokens, mask, inputs_embeds=inputs_embeds,
        prefix=encoder_prefix, deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
        method=t5_lib.T5.encode)
    return encoded, mask

  def logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None
             ) -> Array:
    """Teacher-forced decoder logits `[B, T, vocab]` float32."""
    enc_rng = dec_rng = prefix_rng = None
    if dropout_rng is not None:
      enc_rng, dec_rng, prefix_rng = jax.random.split(dropout_rng, 3)
    encoder_prefix, decoder_prefix = self.prefixes(params, batch, prefix_rng)
    encoded, mask = self.encode(params, batch, enc_rng,
                                encoder_prefix=encoder_prefix)
    t5_params, _ = self.split_params(params)
    return self.module.apply(
        {"params": t5_params}, encoded, mask, batch[DECODER_INPUT_TOKENS],
        prefix=decoder_prefix, deterministic=dec_rng is None,
        rngs=None if dec_rng is None else {"dropout": dec_rng},
        method=t5_lib.T5.decode)

  # -- scoring and decoding --------------------------------------------------

  def score_batch(self, params, batch: Batch) -> Array:
    """`[B]` log-likelihood of each row's targets (weighted token sum).

    No label smoothing or z-loss: the score is `sum_t w_t log p(y_t | ...)`.
    """
    logits = self.logits(params, batch)
    _, nll, _ = token_cross_entropy(logits, batch[DECODER_TARGET_TOKENS])
    return -jnp.sum(nll * self._loss_weights(batch), axis=-1)

  def predict_batch(self, params, batch: Batch, *,
                    num_beams: Optional[int] = None,
                    max_decode_len: Optional[int] = None,
                    alpha: Optional[float] = None,
                    return_all_beams: bool = False) -> Tuple[Array, Array]:
    """Generated tokens with a KV cache: greedy (1 beam) or beam search.

    Args:
      params: the model's params (soft-token subtree included).
      batch: needs `encoder_input_tokens` (and what the soft tokens need).
      num_beams, max_decode_len, alpha: default to the constructor's.
      return_all_beams: return every beam, best first.

    Returns:
      tokens `[B, T]` (or `[B, K, T]`) int32 ending in EOS (1) then 0s, and
      scores `[B]` (or `[B, K]`): summed log-probabilities for greedy,
      length-penalised ones for beam search (`text.decoding`).
    """
    num_beams = self.num_beams if num_beams is None else int(num_beams)
    max_decode_len = (self.max_decode_len if max_decode_len is None
                      else int(max_decode_len))
    alpha = self.alpha if alpha is None else float(alpha)
    inputs_embeds, mask = self.encoder_inputs(params, batch)
    t5_params, _ = self.split_params(params)
    encoder_prefix, decoder_prefix = self.prefixes(params, batch)
    out = generate(
        self.module, t5_params,
        encoder_input_tokens=(batch[ENCODER_INPUT_TOKENS]
                              if inputs_embeds is None else None),
        encoder_mask=mask, inputs_embeds=inputs_embeds,
        max_decode_len=max_decode_len, num_beams=num_beams, alpha=alpha,
        eos_id=t5_lib.EOS_ID, encoder_prefix=encoder_prefix,
        decoder_prefix=decoder_prefix)
    if return_all_beams:
      return out.tokens, out.scores
    return out.tokens[:, 0], out.scores[:, 0]
