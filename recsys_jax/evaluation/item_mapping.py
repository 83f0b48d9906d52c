"""Generated item titles -> catalogue items, and the metrics of the mapping.

A model that recommends by generating an item's title (ILM, LANCER) is
scored as a recommender by mapping its text back to the catalogue:

  exact    the generated text equals an item's title after `normalize_title`
           (NFKC, case-folded, punctuation as spaces, whitespace collapsed);
           among items with the same normalised title the lowest id wins
  nearest  otherwise the item whose vector (`item_vectors`, e.g. the pooled
           rows of an `embed_items` cache) has the highest cosine with
           `encode_fn(text)`; needs both
  none     no encoder / vectors, or an empty text: item 0 (padding)

The vectors and encoder are those of an item-text cache (`load_item_mapper`,
`cache_encoder`) or, LANCER's rule, the evaluated LM's pooled token
embeddings (`token_embedding_mapping`; `ItemMapper.with_search` swaps the
search of a mapper without re-indexing its titles).

`ItemMapper.rank` turns the K beams of one row (best first) into a ranked
list of k items: each beam mapped in order, repeats dropped (first kept),
excluded items (the user's history) dropped, then, with an encoder, filled
with the nearest neighbours of the best beam's text, else with 0.

`ranking_sums` / `summarize` give HR@K and NDCG@K of the target item in
that list (`metrics.per_row_metrics`: the rank is the list position; absent
items count as misses, so over a catalogue of N items this is the full
ranking protocol restricted to the top k generated), as sums over rows that
add over batches and processes.

`cache_encoder` rebuilds the frozen encoder an item-text cache was made
with (checked against its fingerprint), so generated texts land in the same
space as the cached vectors.
"""

import collections
import copy
import os
import unicodedata
from typing import (Dict, List, Mapping, NamedTuple, Optional, Sequence, Set,
                    Tuple)

import jax
import numpy as np

from recsys_jax.core import partitioning
from recsys_jax.evaluation import metrics as metrics_lib
from recsys_jax.evaluation import text_metrics
from recsys_jax.text import item_text_cache
from recsys_jax.text import item_texts

EXACT, NEAREST, NONE = "exact", "nearest", "none"
MATCH_KINDS = (EXACT, NEAREST, NONE)


def normalize_title(text: str) -> str:
  """The form titles are compared in: 'Acme  Hub, Pack-of-2.' ->
  'acme hub pack of 2' (NFKC, case-folded, Unicode punctuation -> space,
  whitespace collapsed)."""
  text = unicodedata.normalize("NFKC", str(text)).casefold()
  text = "".join(" " if unicodedata.category(c).startswith("P") else c
                 for c in text)
  return " ".join(text.split())


def _unit_rows(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Rows scaled to unit length (float32) and which rows were non-zero."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=-1)
  nonzero = norms > 0
  return x / np.maximum(norms, 1e-12)[..., None], nonzero


def _top_ids(sim: np.ndarray, m: int) -> np.ndarray:
  """Ids of the m highest finite entries of `sim`, best first, ties by the
  lower id (exact, without sorting the whole row)."""
  finite = np.isfinite(sim)
  m = min(int(m), int(finite.sum()))
  if m <= 0:
    return np.zeros((0,), np.int64)
  if m < sim.shape[0]:
    threshold = np.partition(sim, sim.shape[0] - m)[sim.shape[0] - m]
    cand = np.flatnonzero((sim >= threshold) & finite)
  else:
    cand = np.flatnonzero(finite)
  return cand[np.lexsort((cand, -sim[cand]))][:m]


class RankResult(NamedTuple):
  """What `ItemMapper.rank_with_matches` found.

  Attributes:
    items: `[B, k]` int32 ranked item ids (0 = padding).
    beam_items: `[B][K_b]` the item each beam mapped to (before dedupe /
      exclusion; 0 = none).
    beam_kinds: `[B][K_b]` how each beam was mapped ('exact', 'nearest',
      'none').
  """
  items: np.ndarray
  beam_items: List[List[int]]
  beam_kinds: List[List[str]]


class ItemMapper:
  """Maps generated texts to catalogue item ids.

  Args:
    titles: `[N + 1]` titles by item id (entry 0, padding, is ignored; empty
      titles never match exactly).
    item_vectors: `[N + 1, E]` item vectors for the nearest-item search
      (row 0 and all-zero rows are never chosen); needs `encode_fn`.
    encode_fn: `texts -> [n, E]` the encoder that made `item_vectors`.

  Attributes:
    num_items: N.
    counts: how many texts every `match` / `map` / `rank` call mapped by
      each kind, {'exact', 'nearest', 'none'} (cumulative).
    num_duplicate_titles: items whose normalised title an item of a lower id
      already has (they are never the exact match).
  """

  def __init__(self, titles: Sequence[str], *,
               item_vectors: Optional[np.ndarray] = None,
               encode_fn: Optional[text_metrics.EncodeFn] = None):
    titles = [str(t) for t in titles]
    if not titles:
      raise ValueError("ItemMapper: titles must hold entry 0 (padding) and "
                       "one title per item")
    if (item_vectors is None) != (encode_fn is None):
      raise ValueError(
          "ItemMapper: the nearest-item search needs both item_vectors and "
          f"encode_fn (got only "
          f"{'item_vectors' if encode_fn is None else 'encode_fn'})")
    self.titles = titles
    self.num_items = len(titles) - 1
    self.normalized = [normalize_title(t) for t in titles]
    self._index: Dict[str, int] = {}
    self.num_duplicate_titles = 0
    for item in range(1, len(titles)):
      key = self.normalized[item]
      if not key:
        continue
      if key in self._index:
        self.num_duplicate_titles += 1
      else:
        self._index[key] = item
    self._set_search(item_vectors, encode_fn)

  def _set_search(self, item_vectors: Optional[np.ndarray],
                  encode_fn: Optional[text_metrics.EncodeFn]) -> None:
    """Installs the nearest-item index and resets `counts`."""
    self._encode_fn = encode_fn
    self._vectors = None
    if item_vectors is not None:
      vectors = np.asarray(item_vectors)
      if vectors.ndim != 2 or vectors.shape[0] != len(self.titles):
        raise ValueError(
            f"ItemMapper: item_vectors has shape {vectors.shape}, expected "
            f"[{len(self.titles)}, E] (row 0 padding, then one row per "
            "title)")
      self._vectors, self._searchable = _unit_rows(vectors)
      self._searchable[0] = False
    self.counts: collections.Counter = collections.Counter(
        {k: 0 for k in MATCH_KINDS})

  def with_search(self, item_vectors: np.ndarray,
                  encode_fn: text_metrics.EncodeFn) -> "ItemMapper":
    """A mapper of the same titles (exact index shared, not rebuilt) whose
    nearest-item search uses `item_vectors` `[N + 1, E]` and `encode_fn`
    instead of this one's; its `counts` start at zero."""
    if item_vectors is None or encode_fn is None:
      raise ValueError("ItemMapper.with_search: needs both item_vectors and "
                       "encode_fn")
    mapper = copy.copy(self)
    mapper._set_search(item_vectors, encode_fn)  # pylint: disable=protected-access
    return mapper

  @property
  def can_search(self) -> bool:
    """Whether unmatched texts go to the nearest item (encoder + vectors)."""
    return self._vectors is not None and bool(self._searchable.any())

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Unit-length `[n, E]` encodings of `texts` (needs `can_search`); a
    zero encoding stays zero."""
    if not texts:
      return np.zeros((0, self._vectors.shape[1]), np.float32)
    out = np.asarray(self._encode_fn(list(texts)))
    if out.shape != (len(texts), self._vectors.shape[1]):
      raise ValueError(
          f"ItemMapper: encode_fn returned shape {out.shape} for "
          f"{len(texts)} texts; the item vectors need [{len(texts)}, "
          f"{self._vectors.shape[1]}] (the encoder that built them)")
    return _unit_rows(out)[0]

  def similarities(self, encoded: np.ndarray) -> np.ndarray:
    """`[n, N + 1]` cosines of unit encodings with every item; -inf where an
    item cannot be chosen (padding, zero vector) and in every column of a
    zero encoding (it is near nothing)."""
    sim = encoded @ self._vectors.T
    usable = self._searchable[None] & np.any(encoded != 0, axis=1)[:, None]
    return np.where(usable, sim, -np.inf)

  def match(self, texts: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """`(ids [n] int32, kinds [n])`: each text's item and how it was found."""
    texts = [str(t) for t in texts]
    ids = np.zeros((len(texts),), np.int32)
    kinds = [NONE] * len(texts)
    unmatched = []
    for i, text in enumerate(texts):
      key = normalize_title(text)
      if key in self._index:
        ids[i], kinds[i] = self._index[key], EXACT
      elif key and self.can_search:
        unmatched.append(i)
    if unmatched:
      sim = self.similarities(self.encode([texts[i] for i in unmatched]))
      for i, row in zip(unmatched, sim):
        best = int(np.argmax(row))  # ties: the lowest id
        if np.isfinite(row[best]):
          ids[i], kinds[i] = best, NEAREST
    self.counts.update(kinds)
    return ids, kinds

  def map(self, texts: Sequence[str]) -> np.ndarray:
    """`[n]` int32 item ids of `texts` (0 where nothing matched)."""
    return self.match(texts)[0]

  def rank_with_matches(self, beam_texts: Sequence[Sequence[str]], k: int,
                        exclude: Optional[Sequence[Set[int]]] = None
                        ) -> RankResult:
    """Ranked items of each row's beams (best first); see `rank`."""
    k = int(k)
    if k < 1:
      raise ValueError(f"ItemMapper.rank: k={k}, expected >= 1")
    if exclude is not None and len(exclude) != len(beam_texts):
      raise ValueError(f"ItemMapper.rank: {len(exclude)} exclusion sets for "
                       f"{len(beam_texts)} rows")
    flat = [str(t) for beams in beam_texts for t in beams]
    ids, kinds = self.match(flat)
    items = np.zeros((len(beam_texts), k), np.int32)
    beam_items, beam_kinds, lists, short = [], [], [], []
    start = 0
    for row, beams in enumerate(beam_texts):
      row_ids = [int(i) for i in ids[start:start + len(beams)]]
      beam_items.append(row_ids)
      beam_kinds.append(kinds[start:start + len(beams)])
      start += len(beams)
      skip = {0} | set(exclude[row] if exclude is not None else ())
      ranked = []
      for item in row_ids:
        if item not in skip:
          ranked.append(item)
          skip.add(item)
      lists.append((ranked[:k], skip))
      if len(ranked) < k and beams and normalize_title(beams[0]):
        short.append(row)
    if short and self.can_search:
      sim = self.similarities(self.encode([beam_texts[r][0] for r in short]))
      for j, row in enumerate(short):
        ranked, skip = lists[row]
        need = k - len(ranked)
        for item in _top_ids(sim[j], need + len(skip)):
          if len(ranked) == k:
            break
          if int(item) not in skip:
            ranked.append(int(item))
    for row, (ranked, _) in enumerate(lists):
      items[row, :len(ranked)] = ranked
    return RankResult(items, beam_items, beam_kinds)

  def rank(self, beam_texts: Sequence[Sequence[str]], k: int,
           exclude: Optional[Sequence[Set[int]]] = None) -> np.ndarray:
    """`[B, k]` int32 ranked item ids from each row's beams (best first).

    Each beam is mapped (`match`) in order; repeats keep their first place;
    items of `exclude[row]` (e.g. the user's history) and 0 are dropped;
    with an encoder the list is filled with the items nearest to the best
    beam's text (in cosine order, skipping those already listed or
    excluded), else with 0.
    """
    return self.rank_with_matches(beam_texts, k, exclude).items


# -- metrics -----------------------------------------------------------------


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based position of each target in its row of `ranked` `[B, k]`; k
  when absent (a miss at every cutoff <= k)."""
  ranked = np.asarray(ranked)
  targets = np.asarray(targets).reshape(-1, 1)
  hit = (ranked == targets) & (targets > 0)
  return np.where(hit.any(axis=1), np.argmax(hit, axis=1), ranked.shape[1])


def sum_names(ks: Sequence[int]) -> Tuple[str, ...]:
  """The entries of `ranking_sums`' vector, in order."""
  ks = tuple(int(k) for k in ks)
  return (("num_ranked",) + tuple(f"HR@{k}" for k in ks) +
          tuple(f"NDCG@{k}" for k in ks) +
          ("exact_title", "history_rows", "semantic_sum", "semantic_rows") +
          tuple(f"match_{kind}" for kind in MATCH_KINDS))


def ranking_sums(ranked: np.ndarray, targets: np.ndarray,
                 ks: Sequence[int]) -> Dict[str, float]:
  """{'num_ranked', 'HR@K', 'NDCG@K'} summed over rows with a target > 0."""
  targets = np.asarray(targets).reshape(-1)
  keep = targets > 0
  out = {"num_ranked": float(keep.sum())}
  if not keep.any():
    out.update({n: 0.0 for n in sum_names(ks)[1:1 + 2 * len(ks)]})
    return out
  ranks = target_ranks(np.asarray(ranked)[keep], targets[keep])
  values = metrics_lib.per_row_metrics(ranks, ks)
  for k in ks:
    out[f"HR@{k}"] = float(values[f"HR@{k}"].sum())
  for k in ks:
    out[f"NDCG@{k}"] = float(values[f"NDCG@{k}"].sum())
  return out


def summarize(sums: Mapping[str, float], ks: Sequence[int], *,
              protocol: str) -> Dict[str, object]:
  """Item metrics from summed `sum_names(ks)` entries.

  Returns:
    {'HR@K', 'NDCG@K' (0..1), 'exact_title_accuracy' (0..100, as
    `exact_match`), 'match_exact' / 'match_nearest' / 'match_none' (0..1:
    how the best beams were mapped), ['semantic_consistency'] (mean cosine
    of generated and target title, when an encoder ran), 'num_ranked',
    'item_protocol'}; means are NaN over no rows.
  """
  n = float(sums.get("num_ranked", 0.0))

  def mean(name):
    return float(sums.get(name, 0.0)) / n if n else float("nan")

  out: Dict[str, object] = {}
  for k in ks:
    out[f"HR@{k}"] = mean(f"HR@{k}")
  for k in ks:
    out[f"NDCG@{k}"] = mean(f"NDCG@{k}")
  out["exact_title_accuracy"] = 100.0 * mean("exact_title")
  for kind in MATCH_KINDS:
    out[f"match_{kind}"] = mean(f"match_{kind}")
  if sums.get("semantic_rows"):
    out["semantic_consistency"] = (float(sums["semantic_sum"]) /
                                   float(sums["semantic_rows"]))
  out["num_ranked"] = int(round(n))
  out["item_protocol"] = protocol
  return out


def allreduce_sums(sums: Mapping[str, float],
                   names: Sequence[str]) -> Dict[str, float]:
  """`sums` added over every JAX process (identity in one process); every
  process must pass the same `names`. float64 travels bit-exactly."""
  vector = np.array([float(sums.get(n, 0.0)) for n in names], np.float64)
  if jax.process_count() > 1:
    # pylint: disable-next=g-import-not-at-top
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(
        vector.view(np.uint32)))
    vector = metrics_lib.sum_bit_vectors(gathered)
  return dict(zip(names, vector.tolist()))


# -- the encoder of an item-text cache ---------------------------------------


def cache_encoder(cache_dir: str, *, checkpoint: Optional[str] = None,
                  batch_size: int = 64) -> text_metrics.EncodeFn:
  """`encode_fn(texts) -> [n, E]` with the encoder that built `cache_dir`.

  Encoder kind, vocabulary, pooling and text length come from the cache's
  manifest; the weights from `checkpoint` (default: the manifest's
  `checkpoint_path`; a 'bert_random' cache redraws its seeded weights) and
  must have the manifest's fingerprint.

  Raises:
    item_text_cache.CacheMismatchError: naming the manifest, when the
      weights or vocabulary differ from those the cache was built with.
    FileNotFoundError: when the checkpoint or vocabulary is not here.
  """
  # The encoder loaders (HF / orbax imports) and seqio only when used.
  # pylint: disable=g-import-not-at-top
  from recsys_jax import embed_items
  from recsys_jax.text import vocab as text_vocab
  # pylint: enable=g-import-not-at-top
  manifest = item_text_cache.read_manifest(cache_dir)
  where = os.path.join(cache_dir, item_text_cache.MANIFEST)
  encoder = manifest.get("encoder")
  if encoder not in embed_items.ENCODERS:
    raise ValueError(f"{where}: encoder {encoder!r} is not one embed_items "
                     f"can load ({embed_items.ENCODERS})")
  random = encoder == embed_items.BERT_RANDOM
  checkpoint = None if random else (checkpoint or
                                    manifest.get("checkpoint_path"))
  if not random and not (checkpoint and os.path.isdir(checkpoint)):
    raise FileNotFoundError(
        f"{where}: the cache's encoder checkpoint {checkpoint!r} is not a "
        "directory here; pass the same weights as "
        "GenerationEvalConfig.mapping_encoder_checkpoint")
  vocab_path = manifest.get("vocab_path")
  if not vocab_path or not os.path.exists(vocab_path):
    vocab_path = checkpoint
  if not vocab_path or not os.path.exists(vocab_path):
    raise FileNotFoundError(f"{where}: its vocabulary "
                            f"{manifest.get('vocab_path')!r} is not here")
  vocab_info = manifest.get("vocab") or {}
  lower_case = (vocab_info.get("lower_case")
                if isinstance(vocab_info, Mapping) else None)
  voc = text_vocab.load_text_vocab(vocab_path, lower_case=lower_case)
  if text_vocab.vocab_fingerprint(voc) != manifest.get("vocab"):
    raise item_text_cache.CacheMismatchError(
        f"{where}: vocabulary {vocab_path} differs from the one the cache "
        "was built with [cache: "
        f"{item_text_cache.describe_identity(manifest)}]")
  enc = embed_items.load_encoder(encoder, checkpoint, vocab=voc,
                                 random_encoder=manifest.get("random_encoder"))
  if (embed_items.params_fingerprint(enc.config, enc.params)
      != manifest.get("checkpoint_fingerprint")):
    raise item_text_cache.CacheMismatchError(
        f"{where}: the weights at {checkpoint or 'bert_random'} differ from "
        "those the cache was built with (checkpoint_fingerprint) [cache: "
        f"{item_text_cache.describe_identity(manifest)}]")
  max_len = int(manifest["max_text_len"])
  devices = jax.local_devices()
  mesh = partitioning.make_mesh(1, devices)
  encode = embed_items.make_encode_fn(enc, manifest["pooling"], mesh)
  params = jax.device_put(enc.params, partitioning.replicated(mesh))
  return text_metrics.batched_encode_fn(
      encode, params, voc, width=enc.d_model, max_len=max_len,
      batch_size=-(-int(batch_size) // len(devices)) * len(devices))


def load_item_mapper(data_dir: str, *, item_vectors_cache: Optional[str] = None,
                     encode_fn: Optional[text_metrics.EncodeFn] = None,
                     encoder_checkpoint: Optional[str] = None) -> ItemMapper:
  """The mapper of a prepared dataset's item titles.

  Args:
    data_dir: the prepared dataset (items.jsonl titles, by item id).
    item_vectors_cache: an `embed_items --texts=items` cache of this dataset;
      its pooled vectors are the nearest-item index. None: exact match only.
    encode_fn: the cache's encoder; default `cache_encoder(item_vectors_cache,
      checkpoint=encoder_checkpoint)`.
    encoder_checkpoint: where the cache's encoder weights are, when not at
      the path its manifest names.
  """
  titles = item_texts.texts_by_index(data_dir, (item_texts.TITLE,))[:-1]
  if item_vectors_cache is None:
    if encode_fn is not None or encoder_checkpoint is not None:
      raise ValueError("an encoder for the nearest-item search needs "
                       "item_vectors_cache (the vectors it searches)")
    return ItemMapper(titles)
  # pylint: disable-next=g-import-not-at-top
  from recsys_jax.model_lib import item_embeddings
  vectors, _ = item_embeddings.semantic_from_cache(item_vectors_cache,
                                                   len(titles) - 1)
  if encode_fn is None:
    encode_fn = cache_encoder(item_vectors_cache,
                              checkpoint=encoder_checkpoint)
  return ItemMapper(titles, item_vectors=vectors, encode_fn=encode_fn)
