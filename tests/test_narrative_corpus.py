"""The LM pretraining corpus: span corruption of the training users'
narratives (never a held-out user's), its batches, and the item-text +
narrative mixture of gin/experiments/synthetic_t5_pretrain.gin, against
references read from the prepared TFRecords and items.jsonl."""

import collections
import os

import gin
import numpy as np
import pytest
import seqio

from recsys_jax.cli import gin_utils
from recsys_jax.data import prepared
from recsys_jax.input_pipeline import mixture
from recsys_jax.input_pipeline import narrative_data
from recsys_jax.input_pipeline import text_data
from recsys_jax.text import item_texts
from tasks import narrative_tasks
from tasks import text_tasks
from tests.helpers import reconstruct_spans
from tests.helpers import restore_seqio_registry  # pylint: disable=unused-import
from tests.helpers import tiny_data  # pylint: disable=unused-import

EXTRA_IDS = 10
SPLITS = ("train", "validation", "test")
FIELDS = ("endorsement", "purchase_reason", "user_summary")


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def _text(x):
  return x.decode() if isinstance(x, bytes) else x


def _reference(data_dir, fields, **split_kw):
  """{split: [(user_id, field, narrative)]}, empty narratives left out."""
  users = list(prepared.PreparedDataset(data_dir).iter_sequences())
  split = narrative_tasks.split_users(len(users), **split_kw)
  out = {}
  for s in SPLITS:
    out[s] = []
    for p in split[s]:
      for f in fields:
        text = _text(users[p][prepared.NARRATIVE_PREFIX + f])
        if text.strip():
          out[s].append((_text(users[p]["user_id"]), f, text))
  return out


def _rows(source, split):
  cols = source.columns(split)
  return [(u, f, t) for u, f, t in zip(cols["user_id"], cols["field"],
                                       cols["targets"])]


def _unpad(tokens, eos_id):
  """Tokens of a padded row up to (not including) EOS."""
  tokens = [int(t) for t in tokens]
  return tokens[:tokens.index(eos_id)]


# -- the task's examples: the training users' narratives only -----------------


def test_examples_are_every_nonempty_narrative_of_the_split_users(tiny_data):
  name = narrative_tasks.register_narrative_span_corruption(
      "nc", tiny_data, extra_ids=EXTRA_IDS)
  assert name == "nc_narrative_span_corruption"
  task = seqio.get_mixture_or_task(name)
  assert task.config["fields"] == list(FIELDS)  # all fields of the dataset
  source = task.source
  ref = _reference(tiny_data, FIELDS, seed=0, validation_fraction=0.1,
                   test_fraction=0.1)
  for s in SPLITS:
    assert _rows(source, s) == ref[s], s
    stats = source.stats(s)
    assert stats["examples"] == len(ref[s]) == source.num_input_examples(s)
    assert stats["examples"] + stats["skipped_empty"] == (
        stats["users"] * len(FIELDS))
  # Train is exactly the narrative tasks' training users: a held-out user
  # of the narrative task never appears in the corpus's train split.
  corpus = {s: set(source.columns(s)["user_id"]) for s in SPLITS}
  narrative = seqio.get_mixture_or_task(
      narrative_tasks.register_narrative_task(
          "nt", tiny_data, field="user_summary",
          extra_ids=EXTRA_IDS)).source
  for s in SPLITS:
    assert set(narrative.columns(s)["user_id"]) == corpus[s]
  assert not corpus["train"] & (corpus["validation"] | corpus["test"])
  assert len(corpus["train"]) == 160


def test_one_field_and_empty_narratives_are_skipped_and_counted(tiny_data,
                                                                tmp_path):
  d = str(tmp_path / "small")
  users = []
  for u in range(12):
    narr = {"purchase_reason": f"reason of user {u}",
            "user_summary": f"summary of user {u}"}
    if u in (1, 8):
      narr["purchase_reason"] = "" if u == 1 else "   "
    if u in (3, 8):
      del narr["user_summary"]  # absent: read as ''
    users.append(prepared.UserRecord(
        user_id=f"u{u}", item_ids=[str(1 + (u + k) % 7) for k in range(3)],
        narratives=narr))
  prepared.write_prepared(d, users, min_interactions=1, text_vocab_size=None)
  vocab_path = os.path.join(tiny_data, "spm.model")
  split_kw = dict(seed=0, validation_fraction=0.25, test_fraction=0.25)
  both = seqio.get_mixture_or_task(
      narrative_tasks.register_narrative_span_corruption(
          "sm", d, vocab_path=vocab_path, extra_ids=EXTRA_IDS,
          **split_kw)).source
  one = seqio.get_mixture_or_task(
      narrative_tasks.register_narrative_span_corruption(
          "sm1", d, fields=["user_summary"], vocab_path=vocab_path,
          extra_ids=EXTRA_IDS, **split_kw)).source
  fields = ("purchase_reason", "user_summary")
  ref, ref_one = (_reference(d, fields, **split_kw),
                  _reference(d, ("user_summary",), **split_kw))
  totals = collections.Counter()
  for s in SPLITS:
    assert _rows(both, s) == ref[s]
    assert _rows(one, s) == ref_one[s]
    totals.update(both.stats(s))
  # purchase_reason of users 1 and 8, user_summary of users 3 and 8.
  assert totals["skipped_empty"] == 4
  assert totals["examples"] == 12 * 2 - 4


def test_bad_fields_fail_clearly(tiny_data, tmp_path):
  with pytest.raises(ValueError, match=r"long_summary.*available: \["
                     r"'endorsement', 'purchase_reason', 'user_summary'\]"):
    narrative_tasks.register_narrative_span_corruption(
        "nc", tiny_data, fields=["long_summary"])
  with pytest.raises(ValueError, match="a non-empty sequence"):
    narrative_tasks.register_narrative_span_corruption(
        "nc", tiny_data, fields="user_summary")
  with pytest.raises(ValueError, match="listed twice"):
    narrative_tasks.register_narrative_span_corruption(
        "nc", tiny_data, fields=["endorsement", "endorsement"])
  # No dataset yet: registration works, get_dataset names the command.
  name = narrative_tasks.register_narrative_span_corruption(
      "nc", str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="recsys_jax.data.prepare"):
    seqio.get_mixture_or_task(name).get_dataset(
        {"inputs": 64, "targets": 32}, split="train")


# -- span corruption ----------------------------------------------------------


def test_corruption_reconstructs_training_narratives_only(tiny_data):
  max_input_len = 40
  name = narrative_tasks.register_narrative_span_corruption(
      "nc", tiny_data, extra_ids=EXTRA_IDS, max_input_len=max_input_len)
  vocab = text_tasks.dataset_vocabulary(tiny_data, extra_ids=EXTRA_IDS)
  ref = _reference(tiny_data, FIELDS, seed=0, validation_fraction=0.1,
                   test_fraction=0.1)
  train_text = {(u, f): t for u, f, t in ref["train"]}
  task = seqio.get_mixture_or_task(name)
  lengths = {"inputs": max_input_len, "targets": max_input_len}

  def examples(**kw):
    return list(task.get_dataset(lengths, split="train", shuffle=False,
                                 **kw).as_numpy_iterator())
  exs = examples()
  assert len(exs) == len(ref["train"])
  assert "targets_pretokenized" not in exs[0]  # not the corrupted targets
  n_max = max_input_len - 1  # span_max_tokens
  rebuilt = set()
  cut = 0
  for ex in exs:
    key = (_text(ex["user_id"]), _text(ex["field"]))
    inputs, targets = ex["inputs"][:-1], ex["targets"][:-1]  # drop EOS
    assert ex["inputs"][-1] == ex["targets"][-1] == vocab.eos_id
    original = vocab.encode(train_text[key])  # KeyError: not a train row
    n = min(len(original), n_max)
    cut += len(original) > n_max
    got = reconstruct_spans(inputs, targets, vocab.vocab_size, EXTRA_IDS)
    assert got == original[:n]
    rebuilt.add(tuple(got))
    sentinels = [int(t) for t in targets
                 if t >= vocab.vocab_size - EXTRA_IDS]
    num_noise = len(targets) - len(sentinels)
    assert num_noise == min(max(round(n * 0.15), 1), n - 1)
    assert len(sentinels) == max(round(num_noise / 3), 1)
    assert sentinels == list(range(vocab.vocab_size - 1,
                                   vocab.vocab_size - 1 - len(sentinels), -1))
    assert [int(t) for t in inputs
            if t >= vocab.vocab_size - EXTRA_IDS] == sentinels
  assert cut  # the max_tokens cut is exercised
  # No held-out narrative is trained on (unless a training user has the
  # same text, which the corpus cannot tell apart).
  held_out = {tuple(vocab.encode(t)[:n_max]) for s in ("validation", "test")
              for _, _, t in ref[s]}
  train_tokens = {tuple(vocab.encode(t)[:n_max]) for t in train_text.values()}
  assert held_out - train_tokens
  assert not (held_out - train_tokens) & rebuilt
  # Deterministic given the task's seed; another seed corrupts differently.
  again = examples()
  assert all(np.array_equal(a["inputs"], b["inputs"])
             for a, b in zip(exs, again))
  other = examples(seed=5)
  assert any(not np.array_equal(a["inputs"], b["inputs"])
             for a, b in zip(exs, other))


def test_corpus_data_batches(tiny_data):
  data = narrative_data.NarrativeCorpusData(
      "ncd", tiny_data, fields=["purchase_reason"], max_input_len=24,
      max_target_len=12, extra_ids=EXTRA_IDS)
  vocab = data.vocabulary
  ref = _reference(tiny_data, ("purchase_reason",), seed=0,
                   validation_fraction=0.1, test_fraction=0.1)
  originals = {tuple(vocab.encode(t)[:23]) for _, _, t in ref["train"]}
  for _, batch in zip(range(2), data.train_batches(0, 8)):
    assert set(batch) == set(text_data.MODEL_FEATURES)
    assert batch["encoder_input_tokens"].shape == (8, 24)
    assert batch["decoder_target_tokens"].shape == (8, 12)
    for row in range(8):
      got = reconstruct_spans(
          _unpad(batch["encoder_input_tokens"][row], vocab.eos_id),
          _unpad(batch["decoder_target_tokens"][row], vocab.eos_id),
          vocab.vocab_size, EXTRA_IDS)
      assert tuple(got) in originals
  n = data.num_examples("test")
  assert n == len(ref["test"]) == data.source.stats("test")["examples"]
  rows = [(_text(u), _text(f)) for b in data.eval_batches("test", 16)
          for u, f, v in zip(b["user_id"], b["field"], b["valid"]) if v]
  assert rows == [(u, f) for u, f, _ in ref["test"]]


# -- the pretraining mixture (gin) --------------------------------------------


def _split_bindings(files, bindings, configurable):
  """{seed, validation_fraction, test_fraction} that `files` bind."""
  gin.clear_config()
  gin_utils.parse_gin(files, bindings)
  return {k: gin.query_parameter(f"{configurable}.{k}")
          for k in ("seed", "validation_fraction", "test_fraction")}


def test_pretraining_mixture_yields_both_tasks_of_training_texts(tiny_data,
                                                                 tmp_path):
  data_dir = f"DATA_DIR = '{tiny_data}'"
  # The splits of the tasks REGEN and the title task evaluate on, as their
  # gin files bind them: pretraining must hold out the same users / items.
  narrative_split = _split_bindings(
      ["datasets/synthetic_narratives.gin"],
      [data_dir, "MAX_HISTORY = 20", "MAX_INPUT_LEN = 16",
       "MAX_TARGET_LEN = 64", "EXTRA_IDS = 100"],
      "narrative_data.NarrativeData")
  item_split = _split_bindings(
      ["datasets/synthetic_text.gin"],
      [data_dir, "MAX_TARGET_LEN = 24", "EXTRA_IDS = 100"],
      "text_data.TextData")
  gin.clear_config()
  gin_utils.parse_gin(
      ["runs/train.gin", "experiments/synthetic_t5_pretrain.gin"],
      [data_dir, f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 3"])
  data = gin.query_parameter("runs.train.data").scoped_configurable_fn()
  assert isinstance(data, mixture.MixtureData)
  items, narratives = data.sources
  assert isinstance(narratives, narrative_data.NarrativeCorpusData)
  assert items.task == text_tasks.SPAN_CORRUPTION
  assert data.probabilities.tolist() == [0.5, 0.5]
  for source, split in ((items, item_split), (narratives, narrative_split)):
    config = source._converted.config  # pylint: disable=protected-access
    assert {k: config[k] for k in split} == split
  vocab = items.vocabulary
  n_max = items.max_input_len - 1
  text_rows = item_texts.texts_by_index(tiny_data)
  train_items = text_tasks.split_items(
      len(text_rows) - 2, **item_split)["train"]
  want = {0: {tuple(vocab.encode(text_rows[i])[:n_max])
              for i in train_items},
          1: {tuple(vocab.encode(t)[:n_max])
              for _, _, t in _reference(tiny_data, FIELDS,
                                        **narrative_split)["train"]}}
  schedule = data.task_schedule(0, 64).tolist()
  steps = 1 + max(schedule.index(0), schedule.index(1))
  seen = collections.Counter()
  for step, batch in zip(range(steps), data.train_batches(0, 4)):
    t = schedule[step]
    np.testing.assert_array_equal(batch[mixture.TASK_INDEX], t)
    assert batch["encoder_input_tokens"].shape == (4, items.max_input_len)
    for row in range(4):
      got = reconstruct_spans(
          _unpad(batch["encoder_input_tokens"][row], vocab.eos_id),
          _unpad(batch["decoder_target_tokens"][row], vocab.eos_id),
          vocab.vocab_size, data.sources[t].extra_ids)
      assert tuple(got) in want[t], (step, t)
    seen[t] += 1
  assert set(seen) == {0, 1}
