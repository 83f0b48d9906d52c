"""Narrative tasks (REGEN): user split, history modes, skips, shuffled
histories and NarrativeData batches, against NumPy references built from
the prepared TFRecords."""

import collections
import json
import os

import numpy as np
import pytest
import seqio

from recsys_jax.data import prepared
from recsys_jax.input_pipeline import narrative_data
from recsys_jax.input_pipeline import text_data
from recsys_jax.text import item_texts
from tasks import narrative_tasks
from tasks import text_tasks
from tests.helpers import restore_seqio_registry  # pylint: disable=unused-import
from tests.helpers import tiny_data  # pylint: disable=unused-import

EXTRA_IDS = 10
SPLITS = ("train", "validation", "test")
FIELDS = ("user_summary", "purchase_reason", "endorsement")


def _text(x):
  return x.decode() if isinstance(x, bytes) else x


def _users(data_dir):
  """Every user record, file order, as numpy (the reference reader)."""
  return list(prepared.PreparedDataset(data_dir).iter_sequences())


def _reference(data_dir, field, mode, max_history, *, seed=0,
               validation_fraction=0.1, test_fraction=0.1):
  """{split: [(user_id, history [H] padded, next_item, narrative)]}."""
  users = _users(data_dir)
  split = narrative_tasks.split_users(
      len(users), seed=seed, validation_fraction=validation_fraction,
      test_fraction=test_fraction)
  out = {}
  for s in SPLITS:
    rows = []
    for p in split[s]:
      u = users[p]
      text = _text(u[prepared.NARRATIVE_PREFIX + field])
      ids = [int(i) for i in u["item_ids"]]
      if mode == "all":
        hist, nxt = ids, 0
      elif mode == "before_last":
        hist, nxt = ids[:-1], 0
      else:
        hist, nxt = ids[:-1], ids[-1]
      hist = hist[-max_history:] if hist else []
      if not text.strip() or not hist:
        continue
      padded = hist + [0] * (max_history - len(hist))
      rows.append((_text(u["user_id"]), padded, nxt, text))
    out[s] = rows
  return out


def _examples(name, split, lengths=None):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(sequence_length=lengths or {"inputs": 256,
                                                    "targets": 128},
                        split=split, shuffle=False)
  return list(ds.as_numpy_iterator())


# -- user split ---------------------------------------------------------------


def test_user_split_is_disjoint_complete_and_seeded():
  a = narrative_tasks.split_users(200, seed=0, validation_fraction=0.1,
                                  test_fraction=0.05)
  assert (len(a["validation"]), len(a["test"]), len(a["train"])) == (
      20, 10, 170)
  every = np.concatenate([a[s] for s in SPLITS])
  np.testing.assert_array_equal(np.sort(every), np.arange(200))
  for s in SPLITS:
    np.testing.assert_array_equal(a[s], np.sort(a[s]))
  b = narrative_tasks.split_users(200, seed=0, validation_fraction=0.1,
                                  test_fraction=0.05)
  c = narrative_tasks.split_users(200, seed=1, validation_fraction=0.1,
                                  test_fraction=0.05)
  for s in SPLITS:
    np.testing.assert_array_equal(a[s], b[s])
  assert not np.array_equal(a["test"], c["test"])
  # At least one user per held-out split when the fraction is > 0.
  small = narrative_tasks.split_users(5, seed=0, validation_fraction=0.01,
                                      test_fraction=0.01)
  assert (len(small["validation"]), len(small["test"])) == (1, 1)
  with pytest.raises(ValueError, match="no training user out of 4"):
    narrative_tasks.split_users(4, seed=0, validation_fraction=0.4,
                                test_fraction=0.4)


def test_task_splits_are_user_disjoint(tiny_data):
  name = narrative_tasks.register_narrative_task(
      "nt", tiny_data, field="user_summary", extra_ids=EXTRA_IDS)
  assert name == "nt_narrative_user_summary"
  source = seqio.get_mixture_or_task(name).source
  seen = {s: set(source.columns(s)[narrative_tasks.USER_ID]) for s in SPLITS}
  assert not seen["train"] & seen["validation"]
  assert not seen["train"] & seen["test"]
  assert not seen["validation"] & seen["test"]
  every = {_text(u["user_id"]) for u in _users(tiny_data)}
  assert set().union(*seen.values()) == every
  assert {s: source.stats(s)["examples"] for s in SPLITS} == {
      "train": 160, "validation": 20, "test": 20}


# -- history modes ------------------------------------------------------------


@pytest.mark.parametrize("field,mode", [
    ("user_summary", "all"), ("purchase_reason", "before_last"),
    ("endorsement", "before_last_with_next")])
def test_history_modes_match_numpy_reference(tiny_data, field, mode):
  max_history = 5
  name = narrative_tasks.register_narrative_task(
      "nt", tiny_data, field=field, max_history=max_history,
      extra_ids=EXTRA_IDS)
  task = seqio.get_mixture_or_task(name)
  assert task.config["history"] == mode
  vocab = text_tasks.dataset_vocabulary(tiny_data, extra_ids=EXTRA_IDS)
  ref = _reference(tiny_data, field, mode, max_history)
  users = {_text(u["user_id"]): [int(i) for i in u["item_ids"]]
           for u in _users(tiny_data)}
  # Truncation is exercised: some users have more items than kept.
  assert max(len(v) for v in users.values()) > max_history + 1
  for split in SPLITS:
    exs = _examples(name, split)
    got = [(_text(ex["user_id"]), ex["history_items"].tolist(),
            int(ex["next_item"][0]), _text(ex["targets_pretokenized"]))
           for ex in exs]
    assert got == ref[split], split
    for ex in exs:
      assert ex["history_items"].dtype == np.int32
      assert ex["next_item"].shape == (1,)
      assert _text(ex["inputs_pretokenized"]) == narrative_tasks.prompt(field)
      assert ex["targets"][-1] == vocab.eos_id
      ids = users[_text(ex["user_id"])]
      hist = [int(i) for i in ex["history_items"] if i]
      if mode == "all":
        assert hist == ids[-max_history:]
      else:  # the last item is never in the history
        assert hist == ids[:-1][-max_history:]
      assert int(ex["next_item"][0]) == (
          ids[-1] if mode == "before_last_with_next" else 0)


def test_prompts_and_titles_in_input(tiny_data):
  assert narrative_tasks.prompt("purchase_reason") == "purchase reason:"
  assert narrative_tasks.prompt("long_summary") == "long summary:"
  assert narrative_tasks.field_slug("user.long-summary") == "user_long_summary"
  assert narrative_tasks.history_mode("long_summary") == "all"
  name = narrative_tasks.register_narrative_task(
      "nt", tiny_data, field="endorsement", max_history=3,
      titles_in_input=True, extra_ids=EXTRA_IDS)
  titles = item_texts.texts_by_index(tiny_data, (item_texts.TITLE,))
  exs = _examples(name, "test")
  assert exs
  for ex in exs:
    hist = [titles[int(i)] for i in ex["history_items"] if i]
    want = ("endorsement: " + ". ".join(hist) + ". next: "
            + titles[int(ex["next_item"][0])])
    assert _text(ex["inputs_pretokenized"]) == want


# -- skips, errors ------------------------------------------------------------


def _write_small(d, vocab_dir):
  """12 users: narratives '', '  ', missing, and a one-item user."""
  users = []
  for u in range(12):
    n = 1 if u == 5 else 2 + u % 4
    items = [str(1 + (u + k) % 7) for k in range(n)]
    if u in (1, 8):
      narr = {"purchase_reason": "" if u == 1 else "   "}
    elif u == 10:
      narr = {}
    else:
      narr = {"purchase_reason": f"reason of user {u}"}
    users.append(prepared.UserRecord(user_id=f"u{u}", item_ids=items,
                                     narratives=narr))
  prepared.write_prepared(d, users, min_interactions=1, text_vocab_size=None)
  return os.path.join(vocab_dir, "spm.model")


@pytest.mark.parametrize("field_history,short", [("before_last", 1),
                                                 ("all", 0)])
def test_empty_narratives_and_histories_are_skipped_and_counted(
    tiny_data, tmp_path, field_history, short):
  d = str(tmp_path / "small")
  vocab_path = _write_small(d, tiny_data)
  name = narrative_tasks.register_narrative_task(
      "sm", d, field="purchase_reason", history=field_history,
      vocab_path=vocab_path, validation_fraction=0.25, test_fraction=0.25,
      extra_ids=EXTRA_IDS)
  source = seqio.get_mixture_or_task(name).source
  split = narrative_tasks.split_users(12, seed=0, validation_fraction=0.25,
                                      test_fraction=0.25)
  totals = collections.Counter()
  ref = _reference(d, "purchase_reason", field_history, 20,
                   validation_fraction=0.25, test_fraction=0.25)
  for s in SPLITS:
    stats = source.stats(s)
    assert stats["users"] == len(split[s])
    assert stats["examples"] + stats["skipped_empty"] + stats[
        "skipped_short_history"] == stats["users"]
    assert stats["examples"] == len(ref[s]) == source.num_input_examples(s)
    totals.update(stats)
    got = [_text(ex["targets_pretokenized"]) for ex in _examples(name, s)]
    assert got == [r[3] for r in ref[s]]
  # Users 1 ('') and 8 ('   ') and 10 (field absent) have no narrative;
  # user 5 has one item, none left before the last.
  assert totals["skipped_empty"] == 3
  assert totals["skipped_short_history"] == short
  assert totals["examples"] == 12 - 3 - short


def test_missing_field_and_bad_options_fail_clearly(tiny_data, tmp_path):
  with pytest.raises(ValueError) as e:
    narrative_tasks.register_narrative_task("nt", tiny_data,
                                            field="long_summary")
  msg = str(e.value)
  assert tiny_data in msg and "long_summary" in msg
  assert "['endorsement', 'purchase_reason', 'user_summary']" in msg
  with pytest.raises(ValueError, match=r"history='last'.*'all', "
                     r"'before_last', 'before_last_with_next'"):
    narrative_tasks.register_narrative_task("nt", tiny_data,
                                            field="endorsement",
                                            history="last")
  with pytest.raises(ValueError, match="no user for training"):
    narrative_tasks.register_narrative_task(
        "nt", tiny_data, field="endorsement", validation_fraction=0.5,
        test_fraction=0.5)
  # No dataset yet: registration works, get_dataset names the command.
  name = narrative_tasks.register_narrative_task(
      "nt", str(tmp_path / "absent"), field="long_summary")
  with pytest.raises(FileNotFoundError, match="recsys_jax.data.prepare"):
    _examples(name, "train")


# -- shuffled histories -------------------------------------------------------


def test_derangement_has_no_fixed_point():
  rng = np.random.default_rng(0)
  for n in (2, 3, 7, 50):
    perm = narrative_tasks.derangement(n, rng)
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    assert (perm != np.arange(n)).all()
  with pytest.raises(ValueError, match="at least 2"):
    narrative_tasks.derangement(1, rng)


def test_shuffled_histories_belong_to_other_users(tiny_data):
  kw = dict(field="endorsement", max_history=4, titles_in_input=True,
            extra_ids=EXTRA_IDS)
  plain = seqio.get_mixture_or_task(narrative_tasks.register_narrative_task(
      "plain", tiny_data, **kw)).source
  mixed = seqio.get_mixture_or_task(narrative_tasks.register_narrative_task(
      "mixed", tiny_data, shuffle_histories=True, **kw)).source
  titles = item_texts.texts_by_index(tiny_data, (item_texts.TITLE,))
  for s in SPLITS:
    a, b = plain.columns(s), mixed.columns(s)
    np.testing.assert_array_equal(a["user_id"], b["user_id"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
    # Each row: (history, next item) of the user as one tuple.
    own = [tuple(h) + tuple(n) for h, n in zip(a["history_items"],
                                                a["next_item"])]
    got = [tuple(h) + tuple(n) for h, n in zip(b["history_items"],
                                                b["next_item"])]
    assert collections.Counter(own) == collections.Counter(got)
    counts = collections.Counter(own)
    for mine, theirs in zip(own, got):  # equal only for a duplicated history
      assert mine != theirs or counts[mine] > 1
    assert sum(m != t for m, t in zip(own, got)) >= len(own) - 1
    for h, n, text in zip(b["history_items"], b["next_item"], b["inputs"]):
      names = [titles[int(i)] for i in h if i]
      assert text == ("endorsement: " + ". ".join(names) + ". next: "
                      + titles[int(n[0])])
  again = seqio.get_mixture_or_task(narrative_tasks.register_narrative_task(
      "again", tiny_data, shuffle_histories=True, **kw)).source
  np.testing.assert_array_equal(again.columns("train")["history_items"],
                                mixed.columns("train")["history_items"])


# -- NarrativeData ------------------------------------------------------------


def test_narrative_data_batches(tiny_data):
  data = narrative_data.NarrativeData(
      "nd", tiny_data, field="purchase_reason", max_history=4,
      max_input_len=16, max_target_len=48, extra_ids=EXTRA_IDS)
  assert (data.field, data.max_history, data.history_mode) == (
      "purchase_reason", 4, "before_last")
  vocab = data.vocabulary
  ref = _reference(tiny_data, "purchase_reason", "before_last", 4)

  def target_tokens(text):
    ids = vocab.encode(text)[:47] + [vocab.eos_id]
    return tuple(ids + [0] * (48 - len(ids)))
  by_history = collections.defaultdict(set)
  for _, hist, _, text in ref["train"]:
    by_history[tuple(hist)].add(target_tokens(text))
  prompt = vocab.encode("purchase reason:") + [vocab.eos_id]
  for _, batch in zip(range(3), data.train_batches(0, 8)):
    assert set(batch) == set(text_data.MODEL_FEATURES) | {
        "history_items", "next_item"}
    assert batch["encoder_input_tokens"].shape == (8, 16)
    assert batch["decoder_target_tokens"].shape == (8, 48)
    assert batch["history_items"].shape == (8, 4)
    assert batch["next_item"].shape == (8, 1)
    assert batch["history_items"].dtype == batch["next_item"].dtype == np.int32
    np.testing.assert_array_equal(batch["next_item"], 0)
    for row in range(8):
      np.testing.assert_array_equal(
          batch["encoder_input_tokens"][row, :len(prompt)], prompt)
      # The row's history and targets are those of one training user.
      assert tuple(batch["decoder_target_tokens"][row]) in by_history[
          tuple(batch["history_items"][row])]
  n = data.num_examples("test")
  assert n == len(ref["test"]) == data.source.stats("test")["examples"]
  batches = list(data.eval_batches("test", 6,
                                   extra_features=("user_id",)))
  assert len(batches) == -(-n // 6)
  rows = [(_text(u), h.tolist(), int(x[0]), _text(t))
          for b in batches
          for u, h, x, t, v in zip(b["user_id"], b["history_items"],
                                   b["next_item"], b["targets_pretokenized"],
                                   b["valid"]) if v]
  assert rows == ref["test"]
  assert batches[0]["history_items"].shape == (6, 4)
  assert set(text_data.model_inputs(batches[0])) == set(
      text_data.MODEL_FEATURES) | {"history_items", "next_item"}
  with pytest.raises(KeyError, match="item_ids"):
    data.eval_batches("test", 6, extra_features=("item_ids",))


# -- per-item fields (review texts) -------------------------------------------

REVIEW_SPLIT = dict(validation_fraction=0.25, test_fraction=0.25)


def _review(u, k):
  return f"review {k} of user {u}"


def _write_reviews(d):
  """12 users with per-item `review_text` / `review_summary` and narratives
  `purchase_reason` / `review_summary` (a name of both kinds).

  Last review_text: '' (u3), '   ' (u7), field absent (u9); u5 has one item.
  Items of a user are distinct, so "not in the history" is checkable.
  Returns {user_id: (raw item ids, review_text list or None)}.
  """
  users, raw = [], {}
  for u in range(12):
    n = 1 if u == 5 else 2 + u % 4
    items = [str(1 + (u + 2 * k) % 11) for k in range(n)]
    texts = [_review(u, k) for k in range(n)]
    if u == 3:
      texts[-1] = ""
    if u == 7:
      texts[-1] = "   "
    per_item = {} if u == 9 else {
        "review_text": texts,
        "review_summary": [f"summary {k} of user {u}" for k in range(n)]}
    users.append(prepared.UserRecord(
        user_id=f"u{u}", item_ids=items, per_item=per_item,
        narratives={"purchase_reason": f"reason of user {u}",
                    "review_summary": f"user-level summary of user {u}"}))
    raw[f"u{u}"] = (items, None if u == 9 else texts)
  stats = prepared.write_prepared(d, users, min_interactions=1,
                                  text_vocab_size=None)
  assert stats["per_item_fields"] == ["review_summary", "review_text"]
  assert stats["narrative_fields"] == ["purchase_reason", "review_summary"]
  return raw


@pytest.fixture(name="reviews")
def _reviews(tmp_path, tiny_data):
  d = str(tmp_path / "reviews")
  raw = _write_reviews(d)
  return d, raw, os.path.join(tiny_data, "spm.model")


@pytest.mark.parametrize("field,history,mode", [
    ("review_text", None, "before_last_with_next"),
    ("per_item/review_text", None, "before_last_with_next"),
    ("review_text", "before_last", "before_last")])
def test_per_item_targets_are_the_last_items_text(reviews, field, history,
                                                  mode):
  d, raw, vocab_path = reviews
  max_history = 3
  name = narrative_tasks.register_narrative_task(
      "rv", d, field=field, history=history, max_history=max_history,
      vocab_path=vocab_path, extra_ids=EXTRA_IDS, **REVIEW_SPLIT)
  task = seqio.get_mixture_or_task(name)
  assert task.config["history"] == mode
  assert task.config["target_key"] == "per_item/review_text"
  assert task.source.target_key == "per_item/review_text"
  index = {it["item_id"]: it["index"] for it in prepared.read_items(d)}
  user_ids = [_text(u["user_id"]) for u in _users(d)]
  split = narrative_tasks.split_users(len(user_ids), seed=0, **REVIEW_SPLIT)
  totals = collections.Counter()
  for s in SPLITS:
    want = []
    for p in split[s]:
      items, texts = raw[user_ids[p]]
      ids = [index[i] for i in items]
      if texts is None or not texts[-1].strip() or len(ids) < 2:
        continue
      hist = ids[:-1][-max_history:]
      want.append((user_ids[p], hist + [0] * (max_history - len(hist)),
                   ids[-1] if mode == "before_last_with_next" else 0,
                   texts[-1]))
    got = [(_text(ex["user_id"]), ex["history_items"].tolist(),
            int(ex["next_item"][0]), _text(ex["targets_pretokenized"]))
           for ex in _examples(name, s)]
    assert got == want, s
    for uid, hist, _, target in got:
      items, texts = raw[uid]
      assert target == _review(int(uid[1:]), len(items) - 1)
      assert index[items[-1]] not in hist  # the reviewed item is not shown
    totals.update(task.source.stats(s))
  # u3 (''), u7 ('   ') and u9 (no per-item texts): empty; u5: one item.
  assert (totals["skipped_empty"], totals["skipped_short_history"],
          totals["examples"], totals["users"]) == (3, 1, 8, 12)


def test_per_item_field_refuses_history_all(reviews):
  d, _, vocab_path = reviews
  for field in ("review_text", "per_item/review_summary"):
    with pytest.raises(ValueError, match=(
        rf"history='all' for per-item field '{field}'.*"
        r"'before_last_with_next' \(the default\) or 'before_last'")):
      narrative_tasks.register_narrative_task(
          "rv", d, field=field, history="all", vocab_path=vocab_path)
  with pytest.raises(ValueError, match="per-item field 'review_text'"):
    narrative_data.NarrativeData("nd", d, field="review_text", history="all",
                                 vocab_path=vocab_path)
  # Without a dataset only the explicit spelling is known to be per-item.
  assert narrative_tasks.history_mode("per_item/x") == "before_last_with_next"
  assert narrative_tasks.history_mode("x") == "all"
  with pytest.raises(ValueError, match="per-item field 'per_item/x'"):
    narrative_tasks.history_mode("per_item/x", "all")
  # A user-level field keeps 'all'.
  name = narrative_tasks.register_narrative_task(
      "rv", d, field="purchase_reason", history="all", vocab_path=vocab_path)
  assert seqio.get_mixture_or_task(name).config["history"] == "all"


def test_name_of_both_kinds_means_the_narrative(reviews):
  d, raw, vocab_path = reviews
  assert narrative_tasks.resolve_field(d, "review_summary") == (
      "narrative/review_summary")
  assert narrative_tasks.resolve_field(d, "per_item/review_summary") == (
      "per_item/review_summary")
  assert narrative_tasks.resolve_field(d, "review_text") == (
      "per_item/review_text")
  assert narrative_tasks.resolve_field(d, "purchase_reason") == (
      "narrative/purchase_reason")
  kw = dict(vocab_path=vocab_path, extra_ids=EXTRA_IDS,
            validation_fraction=0.0, test_fraction=0.0)
  user_level = narrative_tasks.register_narrative_task(
      "rv", d, field="review_summary", **kw)
  per_item = narrative_tasks.register_narrative_task(
      "rv", d, field="per_item/review_summary", **kw)
  assert (user_level, per_item) == ("rv_narrative_review_summary",
                                    "rv_narrative_per_item_review_summary")
  a = seqio.get_mixture_or_task(user_level)
  b = seqio.get_mixture_or_task(per_item)
  assert (a.config["history"], b.config["history"]) == (
      "all", "before_last_with_next")
  got_a = {_text(ex["user_id"]): _text(ex["targets_pretokenized"])
           for ex in _examples(user_level, "train")}
  got_b = {_text(ex["user_id"]): _text(ex["targets_pretokenized"])
           for ex in _examples(per_item, "train")}
  assert got_a == {u: f"user-level summary of user {u[1:]}" for u in raw}
  # Per-item: the last item's summary; u9 has none, u5 has one item.
  assert got_b == {u: f"summary {len(items) - 1} of user {u[1:]}"
                   for u, (items, texts) in raw.items()
                   if texts is not None and len(items) > 1}
  assert _text(_examples(per_item, "train")[0]["inputs_pretokenized"]) == (
      "per item review summary:")


def test_missing_field_lists_narrative_and_per_item_fields(reviews):
  d, _, vocab_path = reviews
  for field in ("nope", "per_item/purchase_reason", "per_item/"):
    with pytest.raises(ValueError) as e:
      narrative_tasks.register_narrative_task("rv", d, field=field,
                                              vocab_path=vocab_path)
    msg = str(e.value)
    assert d in msg and repr(field) in msg, msg
    assert ("narrative fields available: ['purchase_reason', "
            "'review_summary'] (narrative_fields), per-item fields "
            "available: ['review_summary', 'review_text'] (per_item_fields, "
            "also as 'per_item/<name>')") in msg, msg
  # Span corruption reads narratives only; it says why it refuses one.
  with pytest.raises(ValueError, match=r"'review_text' \(a per-item field: "
                     r"narrative tasks only\).*\['review_summary', "
                     r"'review_text'\]"):
    narrative_tasks.register_narrative_span_corruption(
        "rv", d, fields=["review_text"], vocab_path=vocab_path)


def test_per_item_texts_not_aligned_with_items_fail(tmp_path, tiny_data):
  d = str(tmp_path / "bad")
  prepared.write_prepared(d, [
      prepared.UserRecord(user_id="a", item_ids=["1", "2", "3"],
                          per_item={"review_text": ["x", "y"]}),
      prepared.UserRecord(user_id="b", item_ids=["1", "2"],
                          per_item={"review_text": ["x", "y"]})],
                          min_interactions=1, text_vocab_size=None)
  name = narrative_tasks.register_narrative_task(
      "bad", d, field="review_text", validation_fraction=0.0,
      test_fraction=0.0, vocab_path=os.path.join(tiny_data, "spm.model"))
  with pytest.raises(ValueError, match=r"user 'a' has 2 per_item/review_text "
                     r"texts for 3 items; expected one per item"):
    _examples(name, "train")


def test_narrative_data_over_a_per_item_field(reviews):
  d, raw, vocab_path = reviews
  data = narrative_data.NarrativeData(
      "nd", d, field="review_text", max_history=4, max_input_len=16,
      max_target_len=16, extra_ids=EXTRA_IDS, vocab_path=vocab_path,
      **REVIEW_SPLIT)
  assert data.history_mode == "before_last_with_next"
  index = {it["item_id"]: it["index"] for it in prepared.read_items(d)}
  rows = [(_text(u), int(x[0]), _text(t))
          for split in SPLITS
          for b in data.eval_batches(split, 4, extra_features=("user_id",))
          for u, x, t, v in zip(b["user_id"], b["next_item"],
                                b["targets_pretokenized"], b["valid"]) if v]
  assert len(rows) == 8
  for uid, nxt, target in rows:
    items, texts = raw[uid]
    assert (nxt, target) == (index[items[-1]], texts[-1])


def test_regen_sample_review_task_is_the_users_last_review(tmp_path):
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), "..", "shared", "data", "regen",
                      "thirdparty_flattened_office_user_sample.json")
  if not os.path.exists(path):
    pytest.skip(f"REGEN sample not present at {path}")
  from recsys_jax.data import prepare  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "regen")
  assert prepare.main(["--format=regen", f"--input={path}",
                       f"--output_dir={out}"]) == 0
  with open(path) as f:
    rows = json.load(f)  # one user, already in date order
  assert "review_text" in narrative_tasks.available_per_item_fields(out)
  name = narrative_tasks.register_narrative_task(
      "regen", out, field="review_text", validation_fraction=0.0,
      test_fraction=0.0, extra_ids=EXTRA_IDS)
  assert seqio.get_mixture_or_task(name).config["history"] == (
      "before_last_with_next")
  (ex,) = _examples(name, "train")
  index = {it["item_id"]: it["index"] for it in prepared.read_items(out)}
  ids = [index[r["asin"]] for r in rows]
  assert _text(ex["user_id"]) == rows[-1]["reviewer_id"]
  assert _text(ex["targets_pretokenized"]) == rows[-1]["review"]
  assert int(ex["next_item"][0]) == ids[-1]
  assert [int(i) for i in ex["history_items"] if i] == ids[:-1]
  assert _text(ex["inputs_pretokenized"]) == "review text:"
