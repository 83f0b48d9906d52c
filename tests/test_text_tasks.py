"""Text tasks over a prepared dataset, their T5 batches, item texts, and a
small T5 learning the synthetic store's description -> title task."""

import collections
import itertools
import json
import os

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from recsys_jax import embed_items
from recsys_jax.cli import gin_utils
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.data import prepared
from recsys_jax.evaluation import generation
from recsys_jax.input_pipeline import text_data
from recsys_jax.model_lib import encoder_decoder
from recsys_jax.seqio_ext import preprocessors
from recsys_jax.seqio_ext import span_corruption
from recsys_jax.text import item_texts
from tasks import text_tasks
from tests.helpers import reconstruct_spans
from tests.helpers import restore_seqio_registry  # pylint: disable=unused-import
from tests.helpers import tiny_data  # pylint: disable=unused-import

EXTRA_IDS = 10


def _examples(name, split, lengths=None, **kw):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(sequence_length=lengths or {"inputs": 64,
                                                    "targets": 32},
                        split=split, shuffle=False, **kw)
  return list(ds.as_numpy_iterator())


def _text(x):
  return x.decode() if isinstance(x, bytes) else x


# -- item texts: one implementation -----------------------------------------


def test_item_texts_render_as_prepared_and_index_by_vocabulary(tiny_data):
  rows = prepared.read_items(tiny_data)
  texts = item_texts.item_texts(tiny_data)
  assert texts == [prepared.item_text(r) for r in rows]
  assert item_texts.texts_by_index(tiny_data) == [""] + texts + [""]
  assert preprocessors.item_texts(tiny_data) == [""] + texts + [""]
  assert embed_items.item_texts(tiny_data) == texts
  titles = item_texts.item_texts(tiny_data, (item_texts.TITLE,))
  assert titles == [r["title"] for r in rows]
  body = item_texts.render(rows[0], text_tasks.DESCRIPTION_FIELDS)
  assert rows[0]["title"] not in body and rows[0]["description"] in body
  assert texts[0] == rows[0]["title"] + ". " + body


def test_item_rows_out_of_order_name_file_and_line(tmp_path):
  with open(tmp_path / prepared.ITEMS_FILE, "w") as f:
    f.write(json.dumps({"index": 1, "title": "a"}) + "\n")
    f.write(json.dumps({"index": 3, "title": "b"}) + "\n")
  with pytest.raises(ValueError, match=r"items.jsonl:2: index 3, expected 2"):
    item_texts.item_texts(str(tmp_path))
  with pytest.raises(ValueError, match="subset of"):
    item_texts.item_texts(str(tmp_path), ("price",))


# -- the tasks ---------------------------------------------------------------


def test_item_split_is_seeded_disjoint_and_complete():
  a = text_tasks.split_items(150, seed=0, validation_fraction=0.1,
                             test_fraction=0.05)
  assert (len(a["validation"]), len(a["test"])) == (15, 8)
  every = np.concatenate([a["train"], a["validation"], a["test"]])
  np.testing.assert_array_equal(np.sort(every), np.arange(1, 151))
  b = text_tasks.split_items(150, seed=0, validation_fraction=0.1,
                             test_fraction=0.05)
  c = text_tasks.split_items(150, seed=1, validation_fraction=0.1,
                             test_fraction=0.05)
  np.testing.assert_array_equal(a["test"], b["test"])
  assert not np.array_equal(a["test"], c["test"])
  with pytest.raises(ValueError, match="no training item out of 4"):
    text_tasks.split_items(4, seed=0, validation_fraction=0.4,
                           test_fraction=0.4)
  with pytest.raises(ValueError, match="leaves no item for training"):
    text_tasks.register_text_tasks("bad", "/nonexistent",
                                   validation_fraction=0.5, test_fraction=0.5)


def test_description_to_title_examples(tiny_data):
  name = text_tasks.register_text_tasks(
      "tt", tiny_data, tasks=(text_tasks.DESCRIPTION_TO_TITLE,),
      extra_ids=EXTRA_IDS)[0]
  rows = prepared.read_items(tiny_data)
  vocab = text_tasks.dataset_vocabulary(tiny_data, extra_ids=EXTRA_IDS)
  split = text_tasks.split_items(len(rows), seed=0, validation_fraction=0.05,
                                 test_fraction=0.05)
  seen = {}
  for s in ("train", "validation", "test"):
    exs = _examples(name, s, {"inputs": 256, "targets": 64})
    seen[s] = [int(ex["item_index"]) for ex in exs]
    np.testing.assert_array_equal(seen[s], split[s])
    for ex in exs:
      row = rows[int(ex["item_index"]) - 1]
      assert _text(ex["targets_pretokenized"]) == row["title"]
      assert _text(ex["inputs_pretokenized"]) == item_texts.render(
          row, text_tasks.DESCRIPTION_FIELDS)
      assert ex["targets"][-1] == vocab.eos_id
      assert vocab.decode(ex["targets"].tolist()) == row["title"]
      assert vocab.decode(ex["inputs"].tolist()) == _text(
          ex["inputs_pretokenized"])
  # Cut to the sequence lengths, EOS kept.
  short = _examples(name, "test", {"inputs": 8, "targets": 4})
  assert all(len(ex["inputs"]) <= 8 and ex["inputs"][-1] == vocab.eos_id
             for ex in short)


def test_history_to_next_title_matches_python_reference(tiny_data):
  max_history = 3
  name = text_tasks.register_text_tasks(
      "tt", tiny_data, tasks=(text_tasks.HISTORY_TO_NEXT_TITLE,),
      max_history=max_history, extra_ids=EXTRA_IDS)[0]
  titles = {r["index"]: r["title"] for r in prepared.read_items(tiny_data)}
  users = list(prepared.PreparedDataset(tiny_data).iter_sequences())

  def pair(ids, end):
    hist = ids[max(0, end - max_history):end]
    return (". ".join(titles[int(i)] for i in hist), titles[int(ids[end])])

  want = {"test": [pair(u["item_ids"], len(u["item_ids"]) - 1)
                   for u in users],
          "validation": [pair(u["item_ids"], len(u["item_ids"]) - 2)
                         for u in users],
          "train": [pair(u["item_ids"], len(u["item_ids"]) - 3)
                    for u in users if len(u["item_ids"]) >= 4]}
  for split, pairs in want.items():
    got = [(_text(ex["inputs_pretokenized"]), _text(ex["targets_pretokenized"]))
           for ex in _examples(name, split)]
    assert got == pairs, split
  # Every prefix with train_prefixes: one example per item after the first.
  name = text_tasks.register_text_tasks(
      "tp", tiny_data, tasks=(text_tasks.HISTORY_TO_NEXT_TITLE,),
      max_history=max_history, train_prefixes=True, extra_ids=EXTRA_IDS)[0]
  got = [(_text(ex["inputs_pretokenized"]), _text(ex["targets_pretokenized"]))
         for ex in _examples(name, "train")]
  want = [pair(u["item_ids"][:-2], end) for u in users
          for end in range(1, len(u["item_ids"]) - 2)]
  assert got == want


def test_span_corruption_reconstructs_and_follows_t5_counts(tiny_data):
  name = text_tasks.register_text_tasks(
      "tt", tiny_data, tasks=(text_tasks.SPAN_CORRUPTION,),
      extra_ids=EXTRA_IDS, max_input_len=40)[0]
  vocab = text_tasks.dataset_vocabulary(tiny_data, extra_ids=EXTRA_IDS)
  rows = prepared.read_items(tiny_data)
  lengths = {"inputs": 40, "targets": 40}
  exs = _examples(name, "train", lengths)
  assert len(exs) > 100
  spans_seen = collections.Counter()
  assert "targets_pretokenized" not in exs[0]  # not the corrupted targets
  for ex in exs:
    inputs, targets = ex["inputs"][:-1], ex["targets"][:-1]  # drop EOS
    assert ex["inputs"][-1] == ex["targets"][-1] == vocab.eos_id
    original = vocab.encode(item_texts.render(rows[int(ex["item_index"]) - 1]))
    n = min(len(original), 39)  # span_max_tokens = max_input_len - 1
    assert reconstruct_spans(inputs, targets, vocab.vocab_size,
                             EXTRA_IDS) == original[:n]
    sentinels = [int(t) for t in targets if t >= vocab.vocab_size - EXTRA_IDS]
    num_noise = len(targets) - len(sentinels)
    assert num_noise == min(max(round(n * 0.15), 1), n - 1)
    assert len(sentinels) == max(round(num_noise / 3), 1)
    # Sentinels count down from the top id, in the same order on both sides.
    assert sentinels == list(range(vocab.vocab_size - 1,
                                   vocab.vocab_size - 1 - len(sentinels), -1))
    assert [int(t) for t in inputs if t >= vocab.vocab_size - EXTRA_IDS] == (
        sentinels)
    spans_seen[len(sentinels)] += 1
  assert len(spans_seen) >= 1
  # Deterministic given the task's seed; another seed corrupts differently.
  again = _examples(name, "train", lengths)
  assert all(np.array_equal(a["inputs"], b["inputs"])
             for a, b in zip(exs, again))
  other = _examples(name, "train", lengths, seed=5)
  assert any(not np.array_equal(a["inputs"], b["inputs"])
             for a, b in zip(exs, other))


def test_span_corruption_needs_sentinels(tiny_data):
  name = text_tasks.register_text_tasks(
      "tt", tiny_data, tasks=(text_tasks.SPAN_CORRUPTION,), extra_ids=0)[0]
  with pytest.raises(ValueError, match="extra_ids"):
    _examples(name, "train")


def test_noise_mask_single_token_and_short_sequences():
  seeds = tf.constant([[1, 2], [3, 4]])
  for n in (1, 2, 3, 7, 20):
    mask = span_corruption.random_spans_noise_mask(tf.constant(n), seeds)
    mask = mask.numpy()
    assert mask.shape == (n,)
    if n >= 2:
      assert 1 <= mask.sum() <= n - 1 and not mask[0]


def test_missing_vocabulary_names_the_prepare_command(tmp_path):
  from recsys_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  d = str(tmp_path / "novocab")
  synthetic.generate(d, num_users=30, num_items=40, num_categories=6,
                     num_top_categories=2, brands_per_top=2,
                     text_vocab_size=None)
  name = text_tasks.register_text_tasks(
      "nv", d, tasks=(text_tasks.DESCRIPTION_TO_TITLE,))[0]
  with pytest.raises(FileNotFoundError, match=r"spm.model: no SentencePiece "
                     r"model(.|\n)*recsys_jax.data.prepare"):
    _examples(name, "train")


# -- TextData ----------------------------------------------------------------


def _data(tiny_data, **kw):
  args = dict(max_input_len=48, max_target_len=24, extra_ids=EXTRA_IDS)
  args.update(kw)
  return text_data.TextData("td", tiny_data, **args)


def test_text_data_features_follow_enc_dec_conventions(tiny_data):
  data = _data(tiny_data)
  batch = next(data.train_batches(0, 8))
  assert set(batch) == set(text_data.MODEL_FEATURES)
  tgt = batch["decoder_target_tokens"]
  assert batch["encoder_input_tokens"].shape == (8, 48) and tgt.shape == (8, 24)
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], 0)
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:],
                                tgt[:, :-1])
  np.testing.assert_array_equal(batch["decoder_loss_weights"], tgt != 0)
  assert ((tgt == data.vocabulary.eos_id).sum(1) == 1).all()


def test_text_train_stream_resumes_exactly(tiny_data):
  data = _data(tiny_data)
  # 134 train items, batch 32: an epoch boundary falls inside 10 steps.
  full = [b for _, b in zip(range(10), data.train_batches(0, 32))]
  resumed = [b for _, b in zip(range(4), data.train_batches(6, 32))]
  for a, b in zip(full[6:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(full[0]["encoder_input_tokens"],
                            full[1]["encoder_input_tokens"])


def test_text_eval_batches_cover_the_split_once_with_strings(tiny_data):
  data = _data(tiny_data)
  n = data.num_examples("test")
  batches = list(data.eval_batches("test", 5))
  assert len(batches) == -(-n // 5)
  valid = np.concatenate([b["valid"] for b in batches]) > 0
  assert valid.sum() == n
  refs = [_text(t) for b in batches for t, v in zip(
      b["targets_pretokenized"], b["valid"]) if v]
  rows = prepared.read_items(tiny_data)
  idx = [int(i) for b in batches for i, v in zip(b["item_index"], b["valid"])
         if v]
  assert refs == [rows[i - 1]["title"] for i in idx]
  assert set(text_data.model_inputs(batches[0])) == set(
      text_data.MODEL_FEATURES + (text_tasks.ITEM_INDEX,))
  again = list(data.eval_batches("test", 5))  # from the cache
  assert all(np.array_equal(a["encoder_input_tokens"],
                            b["encoder_input_tokens"])
             for a, b in zip(batches, again))
  with pytest.raises(KeyError, match="user_id"):
    data.eval_batches("test", 5, extra_features=("user_id",))


# -- a small T5 learns the task (smoke) --------------------------------------


SMOKE_BINDINGS = [
    "MAX_INPUT_LEN = 48", "MAX_TARGET_LEN = 24", f"EXTRA_IDS = {EXTRA_IDS}",
    "builders.t5.d_model = 64", "builders.t5.num_heads = 4",
    "builders.t5.d_kv = 16", "builders.t5.d_ff = 128",
    "builders.t5.num_encoder_layers = 2", "builders.t5.num_decoder_layers = 2",
    "builders.t5.relative_attention_num_buckets = 16",
    "builders.t5.relative_attention_max_distance = 32",
    "builders.t5.dropout_rate = 0.0", "builders.t5.vocab_multiple = 64",
    "generation.GenerationEvalConfig.batch_size = 16",
]


def test_small_t5_learns_titles_from_the_experiment_config(tiny_data,
                                                           tmp_path):
  gin.clear_config()
  try:
    gin_utils.parse_gin(
        ["runs/train.gin", "experiments/synthetic_t5_titles.gin"],
        [f"DATA_DIR = '{tiny_data}'", f"MODEL_DIR = '{tmp_path}'",
         "TASK_NAME = 'smoke_text'", "TRAIN_STEPS = 150"] + SMOKE_BINDINGS)
    data = gin.query_parameter("runs.train.data").scoped_configurable_fn()
    model = gin.query_parameter("runs.train.model").scoped_configurable_fn()
    evaluator = gin.query_parameter(
        "runs.train.evaluation").scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert isinstance(data, text_data.TextData)
  assert isinstance(model, encoder_decoder.EncoderDecoderModel)
  assert isinstance(evaluator, generation.GenerationEvaluator)
  assert model.vocabulary.vocab_size == data.vocabulary.vocab_size
  assert model.config.vocab_size % 64 == 0
  assert model.config.vocab_size >= data.vocabulary.vocab_size
  mesh = partitioning.make_mesh(1)
  rules = partitioning.get_rules("data_parallel")
  state0, _, _ = trainer.init_state(model, trainer.make_optimizer(
      trainer.OptimizerConfig(), 1)[0], jax.random.PRNGKey(0), mesh, rules)
  def train_split_metrics(params):  # 64 training items, same compiled fns
    return evaluator.evaluate_batches(
        model, params, itertools.islice(data.eval_batches("train", 16), 4),
        mesh=mesh, rules=rules)
  before = train_split_metrics(state0.params)
  state = trainer.train_loop(
      model, trainer.OptimizerConfig(learning_rate=3e-3, warmup_steps=20,
                                     clip_norm=1.0),
      lambda step: data.train_batches(step, 32),
      trainer.TrainLoopConfig(train_steps=150, batch_size=32, log_every=50,
                              checkpoint_every=1000),
      model_dir=str(tmp_path), mesh=mesh, rules=rules)
  after = train_split_metrics(state.params)
  # Titles of training items are learnt: token accuracy and BLEU jump.
  assert after["token_accuracy"] > 0.8 > before["token_accuracy"]
  assert after["bleu"] > 40 > before["bleu"]
  held_out = evaluator.evaluate(model, state.params, data, mesh, rules,
                                return_pairs=True)
  assert set(held_out) == {"validation", "test"}
  for split, res in held_out.items():
    assert res["num_examples"] == data.num_examples(split)
    assert len(res["pairs"]) == res["num_examples"]
    assert 0 <= res["bleu"] <= 100 and 0 <= res["rougeL"] <= 100
  assert generation.format_results(150, held_out)[0].startswith(
      "[eval step 150] validation")
  assert os.path.isdir(tmp_path)
