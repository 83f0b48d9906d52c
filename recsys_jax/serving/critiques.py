"""Critique texts -> ids of a FLARE model's critique table (docs/FLARE.md).

A FLARE model reads a critique as the frozen encoder's token encodings of
its text: row `id` of its critique table (`FlareTextTables`), built from
the critique cache of `embed_items --texts=critiques`. A text of that
table (exactly, else after `catalogue.normalise`) is served by its id, as
the critiquing evaluation does. Any other text must be encoded by the same
encoder: `CritiqueInput` rebuilds it from the cache's manifest (the seeded
random BERT of `bert_random`, or a checkpoint directory that is still
there), checks its weights and vocabulary against the fingerprints the
cache recorded, and writes the encoding into one extra table row (id
C + 1) that the jitted scoring receives as an argument.
"""

import copy
import dataclasses
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import numpy as np

from recsys_jax.serving import catalogue as catalogue_lib
from recsys_jax.text import item_text_cache


class CritiqueError(ValueError):
  """A critique the model cannot take (one line, with the reason)."""


class Critique(NamedTuple):
  critique_id: int
  text: str
  how: str  # 'table' (a text of the cache), 'normalised' or 'encoded'
  notes: Tuple[str, ...] = ()


def model_with_critique_table(model, tokens, mask):
  """A shallow copy of a FlareModel whose critique table is (tokens, mask)."""
  view = copy.copy(model)
  view.tables = dataclasses.replace(model.tables, critique_tokens=tokens,
                                    critique_mask=mask)
  return view


class _Encoder(NamedTuple):
  encode: Callable  # (params, ids, mask) -> (hidden, pooled)
  params: object
  vocab: object
  max_text_len: int
  dtype: str
  length: Callable  # text -> encoder input length before truncation


class CritiqueInput:
  """The critique side of one FLARE model (module docstring).

  Args:
    model: the FlareModel (its `host_tables` hold C critique rows).
    cache_dir: the critique cache its table was built from.
  """

  def __init__(self, model, cache_dir: str):
    self.cache_dir = cache_dir
    self.manifest = item_text_cache.read_manifest(cache_dir)
    texts = item_text_cache.ItemTextCache(cache_dir).texts
    host = model.host_tables
    if texts is None or len(texts) != host.num_critiques:
      raise CritiqueError(
          f"{cache_dir}: {0 if texts is None else len(texts)} critique texts,"
          f" the model's table has {host.num_critiques}; give the cache the "
          "model was trained with")
    self.texts = texts
    self._ids = {t: r + 1 for r, t in enumerate(texts)}
    self._normalised: Dict[str, List[int]] = {}
    for r, t in enumerate(texts):
      self._normalised.setdefault(catalogue_lib.normalise(t), []).append(r + 1)
    self.free_id = host.num_critiques + 1
    tokens = np.asarray(host.critique_tokens)
    mask = np.asarray(host.critique_mask)
    # One more row, id C + 1, for an encoded free text.
    self.tokens = np.concatenate([tokens, np.zeros_like(tokens[:1])])
    self.mask = np.concatenate([mask, np.zeros_like(mask[:1])])
    self._device = None
    self._encoder: Optional[_Encoder] = None
    self._encoder_error: Optional[str] = None

  def tables(self):
    """(tokens `[C + 2, Tc, D]`, mask) as device arrays."""
    if self._device is None:
      self._device = (jax.numpy.asarray(self.tokens),
                      jax.numpy.asarray(self.mask, bool))
    return self._device

  def resolve(self, text: str) -> Critique:
    """The id the model reads for `text` (encoding it when it is new).

    Raises:
      CritiqueError: an empty text, or a new text that cannot be encoded.
    """
    text = str(text).strip()
    if not text:
      raise CritiqueError("the critique is empty; give a text or leave it out")
    if text in self._ids:
      return Critique(self._ids[text], text, "table")
    same = self._normalised.get(catalogue_lib.normalise(text), [])
    if len(same) == 1:
      return Critique(same[0], self.texts[same[0] - 1], "normalised")
    return self._encode(text)

  # -- free text ---------------------------------------------------------------

  def _encode(self, text: str) -> Critique:
    enc = self._load_encoder()
    from recsys_jax.text import vocab as text_vocab  # pylint: disable=g-import-not-at-top
    ids, mask = text_vocab.encode_batch(enc.vocab, [text], enc.max_text_len)
    hidden, _ = enc.encode(enc.params, ids, mask)
    row = np.asarray(hidden)[0].astype(enc.dtype).astype(self.tokens.dtype)
    self.tokens[self.free_id] = row
    self.mask[self.free_id] = mask[0]
    self._device = None
    notes = ()
    if enc.length(text) > enc.max_text_len:
      notes = (f"critique cut to the encoder's {enc.max_text_len} tokens",)
    return Critique(self.free_id, text, "encoded", notes)

  def _load_encoder(self) -> _Encoder:
    if self._encoder is not None:
      return self._encoder
    if self._encoder_error is None:
      try:
        self._encoder = self._rebuild_encoder()
        return self._encoder
      except CritiqueError as e:
        self._encoder_error = str(e)
    examples = ", ".join(repr(t) for t in self.texts[:3])
    raise CritiqueError(
        f"this critique is not one of the model's {len(self.texts)} critique "
        f"texts (e.g. {examples}; {self.cache_dir}/texts.json), and new text "
        f"cannot be encoded: {self._encoder_error}")

  def _rebuild_encoder(self) -> _Encoder:
    """The cache's encoder, rebuilt offline and checked against it."""
    m = self.manifest
    name = m.get("encoder")
    vocab_path = m.get("vocab_path")
    checkpoint = m.get("checkpoint_path")
    where = os.path.join(self.cache_dir, item_text_cache.MANIFEST)
    # The encoders live with their CLI; importing it loads TensorFlow and
    # SeqIO (tokenisation), so only a free-text critique pays for that.
    from recsys_jax import embed_items  # pylint: disable=g-import-not-at-top
    from recsys_jax.text import vocab as text_vocab  # pylint: disable=g-import-not-at-top
    if name not in embed_items.ENCODERS:
      raise CritiqueError(f"{where} names encoder {name!r}, which this "
                          f"version cannot rebuild ({embed_items.ENCODERS})")
    if not vocab_path or not os.path.exists(vocab_path):
      raise CritiqueError(f"the encoder's vocabulary {vocab_path!r} "
                          f"({where}: vocab_path) is not on this machine")
    random = name == embed_items.BERT_RANDOM
    if not random and not (checkpoint and os.path.isdir(checkpoint)):
      raise CritiqueError(f"the encoder checkpoint {checkpoint!r} ({where}: "
                          "checkpoint_path) is not on this machine")
    voc = text_vocab.load_text_vocab(vocab_path)
    if text_vocab.vocab_fingerprint(voc) != m.get("vocab"):
      raise CritiqueError(f"{vocab_path} is not the vocabulary the cache was "
                          f"built with ({where}: vocab fingerprint)")
    try:
      enc = embed_items.load_encoder(
          name, None if random else checkpoint, vocab=voc,
          random_encoder=m.get("random_encoder") if random else None)
    except (ValueError, FileNotFoundError, OSError) as e:
      raise CritiqueError(f"rebuilding encoder {name!r} failed: {e}") from e
    if embed_items.params_fingerprint(enc.config, enc.params) != m.get(
        "checkpoint_fingerprint"):
      raise CritiqueError(
          f"the rebuilt {name} encoder's weights differ from those that "
          f"encoded the cache ({where}: checkpoint_fingerprint"
          + ("; a JAX upgrade changes the random draws of bert_random"
             if random else "") + ")")
    mesh = embed_items.partitioning.make_mesh(1, jax.local_devices()[:1])
    encode = embed_items.make_encode_fn(enc, m.get("pooling")
                                        or enc.default_pooling, mesh)
    params = jax.device_put(enc.params,
                            embed_items.partitioning.replicated(mesh))
    return _Encoder(encode, params, voc, int(m["max_text_len"]),
                    str(m["dtype"]),
                    lambda t: int(embed_items.token_lengths(voc, [t])[0]))
