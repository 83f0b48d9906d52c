"""Generated titles -> items: mapping, ranked lists, item metrics, wiring."""

import jax.numpy as jnp
import numpy as np
import pytest

from recsys_jax.evaluation import generation
from recsys_jax.evaluation import item_mapping
from recsys_jax.evaluation import metrics as metrics_lib
from recsys_jax.text import item_text_cache
from recsys_jax.text import item_texts
from tests import helpers
from tests.helpers import tiny_data  # pylint: disable=unused-import

# Item id -> title; 5 repeats 2 after normalisation, 6 has no title.
TITLES = ["", "Red Shoe", "Blue Hat", "Big Red Shoe", "Green Sock",
          "blue  hat!", ""]
WORDS = ["red", "shoe", "blue", "hat", "big", "green", "sock"]


def bag_of_words(texts):
  """A deterministic 'sentence encoder': word counts over WORDS (unknown
  words ignored, so 'purple' encodes to zero)."""
  out = np.zeros((len(texts), len(WORDS)), np.float32)
  for i, text in enumerate(texts):
    for word in item_mapping.normalize_title(text).split():
      if word in WORDS:
        out[i, WORDS.index(word)] += 1
  return out


def item_vectors():
  vectors = bag_of_words(TITLES)
  vectors[0] = 0
  return vectors


def searching_mapper():
  return item_mapping.ItemMapper(TITLES, item_vectors=item_vectors(),
                                 encode_fn=bag_of_words)


def cosines(text):
  """NumPy reference: cosine of `text` with every item (0 for zero rows)."""
  v = bag_of_words([text])[0]
  m = item_vectors()
  norms = np.linalg.norm(m, axis=1) * np.linalg.norm(v)
  return np.where(norms > 0, m @ v / np.maximum(norms, 1e-12), -np.inf)


# -- ItemMapper ---------------------------------------------------------------


def test_normalize_title():
  assert item_mapping.normalize_title("  Big, Red\tSHOE. ") == "big red shoe"
  assert item_mapping.normalize_title("Pack-of-2 (new)") == "pack of 2 new"
  assert item_mapping.normalize_title("ＡＢＣ") == "abc"  # NFKC full-width
  assert item_mapping.normalize_title("...") == ""


def test_exact_and_normalised_matches():
  mapper = item_mapping.ItemMapper(TITLES)
  ids, kinds = mapper.match(["Red Shoe", "  BLUE-hat ", "big, red shoe.",
                             "blue hat!!"])
  # The duplicate title (item 5) resolves to the lower id, 2.
  np.testing.assert_array_equal(ids, [1, 2, 3, 2])
  assert kinds == ["exact"] * 4
  assert mapper.num_duplicate_titles == 1 and mapper.num_items == 6
  assert not mapper.can_search


def test_unmatched_without_encoder_is_none_and_counted():
  mapper = item_mapping.ItemMapper(TITLES)
  np.testing.assert_array_equal(mapper.map(["purple sock", "", "Red Shoe"]),
                                [0, 0, 1])
  assert mapper.counts == {"exact": 1, "nearest": 0, "none": 2}


def test_nearest_item_by_cosine():
  mapper = searching_mapper()
  texts = ["shoe red big", "green", "shoe", "hat blue", "purple", ""]
  ids, kinds = mapper.match(texts)
  expected = []
  for text in texts[:4]:
    c = cosines(text)
    expected.append(int(np.flatnonzero(c == c.max())[0]))  # lowest id
  assert expected == [3, 4, 1, 2]  # 'hat blue' ties 2 and 5: lower id
  np.testing.assert_array_equal(ids, expected + [0, 0])
  # 'purple' encodes to zero (near nothing), '' is never searched.
  assert kinds == ["nearest"] * 4 + ["none", "none"]
  assert mapper.counts == {"exact": 0, "nearest": 4, "none": 2}


def test_mapper_argument_errors():
  with pytest.raises(ValueError, match="both item_vectors and encode_fn"):
    item_mapping.ItemMapper(TITLES, item_vectors=item_vectors())
  with pytest.raises(ValueError, match="both item_vectors and encode_fn"):
    item_mapping.ItemMapper(TITLES, encode_fn=bag_of_words)
  with pytest.raises(ValueError, match=r"shape \(6, 7\), expected \[7, E\]"):
    item_mapping.ItemMapper(TITLES, item_vectors=item_vectors()[1:],
                            encode_fn=bag_of_words)
  mapper = item_mapping.ItemMapper(
      TITLES, item_vectors=item_vectors(),
      encode_fn=lambda texts: np.zeros((len(texts), 3)))
  with pytest.raises(ValueError, match=r"shape \(1, 3\).*\[1, 7\]"):
    mapper.map(["purple"])
  with pytest.raises(ValueError, match="k=0"):
    mapper.rank([["Red Shoe"]], 0)
  with pytest.raises(ValueError, match="2 exclusion sets for 1 rows"):
    mapper.rank([["Red Shoe"]], 2, exclude=[set(), set()])


def test_with_search_shares_the_titles_and_starts_new_counts():
  exact = item_mapping.ItemMapper(TITLES)
  exact.map(["Red Shoe"])
  mapper = exact.with_search(item_vectors(), bag_of_words)
  assert mapper.can_search and not exact.can_search
  assert mapper.titles is exact.titles and mapper.num_duplicate_titles == 1
  ids, kinds = mapper.match(["blue hat!!", "shoe red big"])
  np.testing.assert_array_equal(ids, [2, 3])
  assert kinds == ["exact", "nearest"]
  assert mapper.counts == {"exact": 1, "nearest": 1, "none": 0}
  assert exact.counts == {"exact": 1, "nearest": 0, "none": 0}
  assert exact.map(["shoe red big"])[0] == 0  # the original is unchanged
  with pytest.raises(ValueError, match="needs both item_vectors and "
                     "encode_fn"):
    exact.with_search(item_vectors(), None)
  with pytest.raises(ValueError, match=r"shape \(6, 7\), expected \[7, E\]"):
    exact.with_search(item_vectors()[1:], bag_of_words)


# -- ranked lists -------------------------------------------------------------

BEAMS = [["Red Shoe", "red shoe!", "Blue Hat", "purple"],  # 1, 1, 2, none
         ["", "green sock"],                               # none, 4
         ["big shoe", "Big Red Shoe", "Green Sock"]]       # 3 nearest, 3, 4


def test_rank_dedupes_excludes_and_pads_with_zero_without_encoder():
  mapper = item_mapping.ItemMapper(TITLES)
  got = mapper.rank(BEAMS, 3, exclude=[{2}, set(), set()])
  # Row 0: 1 kept once, 2 excluded, 'purple' maps to nothing.
  # Row 2: 'big shoe' matches no title; 3 then 4.
  np.testing.assert_array_equal(got, [[1, 0, 0], [4, 0, 0], [3, 4, 0]])
  np.testing.assert_array_equal(mapper.rank(BEAMS, 1), [[1], [4], [3]])


def test_rank_pads_with_the_best_beams_nearest_items():
  mapper = searching_mapper()
  result = mapper.rank_with_matches(BEAMS, 4, exclude=[{2}, set(), {4}])
  # Row 0: [1], then the items nearest 'Red Shoe': 1 (listed), 3 (cos .82),
  # then cos 0 in id order: 2 (excluded), 4.
  # Row 1: [4]; the best beam is empty, so no nearest items: zeros.
  # Row 2: 'big shoe' -> 3 (nearest); 4 excluded; nearest 'big shoe' after
  # 3: 1 (cos .5), then cos 0: 2, 4 (excluded), 5.
  np.testing.assert_array_equal(result.items,
                                [[1, 3, 4, 5], [4, 0, 0, 0], [3, 1, 2, 5]])
  c = cosines("Red Shoe")
  assert c[3] > c[2] == c[4] == c[5] == 0
  c = cosines("big shoe")
  assert c[3] > c[1] > c[2] == c[5] == 0
  assert result.beam_items == [[1, 1, 2, 0], [0, 4], [3, 3, 4]]
  assert result.beam_kinds == [["exact", "exact", "exact", "none"],
                               ["none", "exact"],
                               ["nearest", "exact", "exact"]]


def test_rank_with_more_slots_than_items_pads_zeros():
  got = searching_mapper().rank([["Green Sock"]], 8, exclude=[{1}])
  # Searchable items 2..5 besides 1 (excluded) and 6 (no vector).
  np.testing.assert_array_equal(got, [[4, 2, 3, 5, 0, 0, 0, 0]])


# -- metrics ------------------------------------------------------------------


def test_hr_and_ndcg_by_hand():
  ranked = np.array([[5, 7, 9], [1, 2, 3], [4, 6, 8], [1, 2, 3]])
  targets = np.array([[5], [3], [10], [0]])  # rank 0, rank 2, absent, none
  np.testing.assert_array_equal(
      item_mapping.target_ranks(ranked[:3], targets[:3]), [0, 2, 3])
  sums = item_mapping.ranking_sums(ranked, targets, (1, 3))
  assert sums == pytest.approx({"num_ranked": 3, "HR@1": 1, "HR@3": 2,
                                "NDCG@1": 1, "NDCG@3": 1 + 1 / np.log2(4)})
  res = item_mapping.summarize(
      dict(sums, exact_title=1, match_exact=2, match_none=1), (1, 3),
      protocol=metrics_lib.FULL_RANKING)
  assert res["HR@1"] == pytest.approx(1 / 3)
  assert res["HR@3"] == pytest.approx(2 / 3)
  assert res["NDCG@3"] == pytest.approx(1.5 / 3)
  assert res["exact_title_accuracy"] == pytest.approx(100 / 3)
  assert res["match_exact"] == pytest.approx(2 / 3)
  assert res["match_nearest"] == 0
  assert "semantic_consistency" not in res
  assert res["num_ranked"] == 3 and res["item_protocol"] == "full_ranking"
  empty = item_mapping.summarize({}, (1,), protocol="full_ranking")
  assert np.isnan(empty["HR@1"]) and empty["num_ranked"] == 0


# -- GenerationEvaluator ------------------------------------------------------


class _WordVocab:
  words = ["<pad>", "</s>"] + WORDS + ["purple"]

  def decode(self, ids):
    out = []
    for i in ids:
      if i == 1:
        break
      out.append(self.words[i])
    return " ".join(out)


def _tokens(text, length=4):
  ids = [_WordVocab.words.index(w) for w in text.split()] + [1]
  return ids + [0] * (length - len(ids))


class _BeamModel:
  """'Generates' the beams stored in the batch's `beam_tokens` [B, K, T]."""
  vocabulary = _WordVocab()

  def __init__(self):
    self.calls = []

  def predict_batch(self, params, batch, *, num_beams=None,
                    max_decode_len=None, alpha=None, return_all_beams=False):
    del params, num_beams, max_decode_len, alpha
    self.calls.append(return_all_beams)
    tokens = batch["beam_tokens"]
    scores = -jnp.arange(tokens.shape[1], dtype=jnp.float32)[None].repeat(
        tokens.shape[0], 0)
    if return_all_beams:
      return tokens, scores
    return tokens[:, 0], scores[:, 0]


def _batches(with_target=True):
  beams = [["red shoe", "big red shoe"],
           ["hat blue", "blue hat"],
           ["red shoe", "big shoe"],
           ["", ""]]
  batch = {
      "beam_tokens": np.array([[_tokens(t) for t in row] for row in beams],
                              np.int32),
      "history_items": np.array([[3, 0], [0, 0], [1, 0], [0, 0]], np.int32),
      "targets_pretokenized": np.array(
          [b"Red Shoe", b"Blue Hat", b"Blue Hat", b""], object),
      "valid": np.array([1, 1, 1, 0], np.float32)}
  if with_target:
    batch["target_item"] = np.array([[1], [2], [2], [0]], np.int32)
  return [batch]


def _config(**kw):
  return generation.GenerationEvalConfig(
      teacher_forced=False, item_mapping=True, ranking_ks=(1, 2), **kw)


def test_evaluator_item_metrics_exact_only():
  model = _BeamModel()
  ev = generation.GenerationEvaluator(
      _config(), item_mapper=item_mapping.ItemMapper(TITLES))
  res = ev.evaluate_batches(model, None, _batches())
  assert model.calls == [True]
  # Rows: [1] (3 excluded), [2] ('hat blue' no title), [] (1 excluded,
  # 'big shoe' no title); targets 1, 2, 2.
  assert res["HR@1"] == pytest.approx(2 / 3)
  assert res["HR@2"] == pytest.approx(2 / 3)
  assert res["NDCG@2"] == pytest.approx(2 / 3)
  assert res["exact_title_accuracy"] == pytest.approx(100 / 3)  # row 0
  assert res["match_exact"] == pytest.approx(2 / 3)
  assert res["match_none"] == pytest.approx(1 / 3)
  assert res["num_ranked"] == 3 and res["num_examples"] == 3
  assert res["item_protocol"] == metrics_lib.FULL_RANKING_EXCLUDING_HISTORY
  assert "semantic_consistency" not in res
  records = list(ev.records(model, None, _batches()))
  assert [r["ranked_items"] for r in records] == [[1, 0], [2, 0], [0, 0]]
  assert [r["generated_item"] for r in records] == [1, 0, 1]
  assert [r["match"] for r in records] == ["exact", "none", "exact"]
  assert records[1]["beams"] == ["hat blue", "blue hat"]
  assert records[1]["generated"] == "hat blue"
  assert records[0]["target_item"] == 1 and records[0]["history_excluded"]
  line = ev.format_results(3, {"test": res})[0]
  assert "HR@1=0.6667" in line and "exact_title_accuracy=33.3333" in line


def test_evaluator_item_metrics_with_encoder():
  ev = generation.GenerationEvaluator(
      _config(), item_mapper=searching_mapper(), encode_fn=bag_of_words)
  res = ev.evaluate_batches(_BeamModel(), None, _batches())
  # Row 0: [1, 2] (nearest 'red shoe' after 1: 3 excluded, then 2).
  # Row 1: 'hat blue' -> 2 (nearest), then 5 (cos 1 with 'hat blue').
  # Row 2: 1 excluded, 'big shoe' -> 3, then nearest 'red shoe': 2.
  records = list(ev.records(_BeamModel(), None, _batches()))
  assert [r["ranked_items"] for r in records] == [[1, 2], [2, 5], [3, 2]]
  assert res["HR@1"] == pytest.approx(2 / 3)
  assert res["HR@2"] == pytest.approx(1.0)
  assert res["NDCG@2"] == pytest.approx((2 + 1 / np.log2(3)) / 3)
  assert res["match_nearest"] == pytest.approx(1 / 3)
  # Cosines of the best beams with the target titles: 1, 1, 0.
  assert res["semantic_consistency"] == pytest.approx(2 / 3)
  assert res["embedding_cosine"] == pytest.approx(2 / 3)


def test_evaluator_without_history_exclusion():
  ev = generation.GenerationEvaluator(
      _config(exclude_history=False),
      item_mapper=item_mapping.ItemMapper(TITLES))
  records = list(ev.records(_BeamModel(), None, _batches()))
  assert [r["ranked_items"] for r in records] == [[1, 3], [2, 0], [1, 0]]
  res = ev.evaluate_batches(_BeamModel(), None, _batches())
  assert res["item_protocol"] == metrics_lib.FULL_RANKING


def test_evaluator_names_the_missing_target_feature():
  ev = generation.GenerationEvaluator(
      _config(), item_mapper=item_mapping.ItemMapper(TITLES))
  with pytest.raises(ValueError, match="needs the batch feature 'target_item'"):
    ev.evaluate_batches(_BeamModel(), None, _batches(with_target=False))


def test_evaluator_needs_titles():
  ev = generation.GenerationEvaluator(_config())
  with pytest.raises(ValueError, match="needs the item titles"):
    ev.evaluate_batches(_BeamModel(), None, _batches())


def test_without_item_mapping_nothing_changes():
  model = _BeamModel()
  ev = generation.GenerationEvaluator(generation.GenerationEvalConfig(
      teacher_forced=False))
  res = ev.evaluate_batches(model, None, _batches(with_target=False))
  assert model.calls == [False]
  assert "HR@5" not in res and res["num_examples"] == 3


def test_config_errors():
  with pytest.raises(ValueError, match="ranking_ks"):
    generation.GenerationEvalConfig(item_mapping=True, ranking_ks=(5, 5))
  with pytest.raises(ValueError, match="ranking_ks"):
    generation.GenerationEvalConfig(item_mapping=True, ranking_ks=(0,))
  with pytest.raises(ValueError, match="ranking_ks"):
    generation.GenerationEvalConfig(item_mapping=True, ranking_ks=())
  with pytest.raises(ValueError, match="item_vectors_cache='c' needs "
                     "item_mapping=True"):
    generation.GenerationEvalConfig(item_vectors_cache="c")
  with pytest.raises(ValueError, match="mapping_encoder_checkpoint='m' needs "
                     "item_vectors_cache"):
    generation.GenerationEvalConfig(item_mapping=True,
                                    mapping_encoder_checkpoint="m")
  assert generation.GenerationEvalConfig(
      item_mapping=True, ranking_ks=[10, 5]).ranking_ks == (10, 5)


# -- the dataset's titles and cache -------------------------------------------


class _Data:

  def __init__(self, data_dir, batches):
    self.data_dir = data_dir
    self._batches = batches

  def eval_batches(self, split, batch_size):
    del split, batch_size
    return iter(self._batches)


def test_evaluate_maps_to_the_datasets_titles(tiny_data, tmp_path):
  titles = item_texts.texts_by_index(tiny_data, (item_texts.TITLE,))[:-1]
  n = len(titles) - 1
  rng = np.random.default_rng(0)
  pooled = rng.normal(size=(n, 8)).astype(np.float32)
  cache = str(tmp_path / "cache")
  helpers.write_item_text_cache(cache, pooled)
  # The 'encoder': item j's title -> its pooled row + noise; else zero.
  by_title = {item_mapping.normalize_title(t): j
              for j, t in enumerate(titles) if j}

  def encode(texts):
    out = np.zeros((len(texts), 8), np.float32)
    for i, text in enumerate(texts):
      j = by_title.get(item_mapping.normalize_title(
          text.replace(" (refurbished)", "")))
      if j is not None:
        out[i] = pooled[j - 1] + 0.01
    return out

  ev = generation.GenerationEvaluator(
      _config(item_vectors_cache=cache, splits=("test",)),
      mapping_encode_fn=encode)
  mapper = ev.item_mapper(tiny_data)
  assert mapper.titles == titles and mapper.can_search
  # An exact title, a garbled one found by its vector.
  ids, kinds = mapper.match([titles[7].upper(), titles[9] + " (refurbished)"])
  np.testing.assert_array_equal(ids, [7, 9])
  assert kinds == ["exact", "nearest"]

  class Model(_BeamModel):
    def predict_batch(self, params, batch, **kw):
      del params, kw
      return batch["beam_tokens"], jnp.zeros(batch["beam_tokens"].shape[:2])

  class Vocab:
    def decode(self, ids):
      return titles[ids[0]] if ids else ""

  model = Model()
  model.vocabulary = Vocab()
  batch = {"beam_tokens": np.array([[[7]], [[9]]], np.int32),
           "target_item": np.array([9, 9], np.int32),
           "targets_pretokenized": np.array([titles[9], titles[9]], object)}
  res = ev.evaluate(model, None, _Data(tiny_data, [batch]))["test"]
  assert res["HR@1"] == pytest.approx(0.5)
  assert res["exact_title_accuracy"] == pytest.approx(50.0)
  assert res["item_protocol"] == metrics_lib.FULL_RANKING


def test_cache_encoder_reproduces_the_cached_vectors(tiny_data, tmp_path):
  from recsys_jax import embed_items  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "bert_random")
  sizes = {"hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 32,
           "max_position_embeddings": 16, "seed": 3}
  embed_items.build_cache(
      tiny_data, "bert_random", None, None, out, max_text_len=16,
      batch_size=64, chunk_size=256, dtype="float32", store_tokens=False,
      random_encoder=sizes, log=lambda line: None)
  cache = item_text_cache.ItemTextCache(out)
  encode = item_mapping.cache_encoder(out, batch_size=64)
  rows = [0, 5, 149]
  np.testing.assert_allclose(encode([cache.texts[r] for r in rows]),
                             np.asarray(cache.pooled)[rows], atol=1e-6)
  # The mapper of the dataset with this cache finds an item from its text.
  mapper = item_mapping.load_item_mapper(tiny_data, item_vectors_cache=out)
  ids, kinds = mapper.match([cache.texts[41]])
  assert kinds == ["nearest"] and ids[0] == 42
