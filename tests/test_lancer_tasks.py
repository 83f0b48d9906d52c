"""LANCER's data (issue 21): history items as titles (newest first) and the
knowledge task item_to_text, against references read from items.jsonl and
the prepared TFRecords."""

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import seqio

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.input_pipeline import ilm_data
from tasks import ilm_tasks
from tasks import text_tasks
from tests.helpers import restore_seqio_registry  # pylint: disable=unused-import
from tests.helpers import tiny_data  # pylint: disable=unused-import

SPLITS = ("train", "validation", "test")
COLUMNS = (ilm_tasks.SLOT_ITEMS, ilm_tasks.HISTORY_ITEMS,
           ilm_tasks.TARGET_ITEM, ilm_tasks.ITEM_INDEX, ilm_tasks.TARGETS)


def _text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def _titles(data_dir):
  """{item id: title} straight from items.jsonl (the reference)."""
  return {i: row.get("title", "") for i, row in
          enumerate(prepared.read_items(data_dir), start=1)}


def _vocab(data_dir):
  return text_tasks.dataset_vocabulary(data_dir, extra_ids=100)


def _eval_rows(data, split, features):
  """[{feature: value}] of every valid row of the split's eval batches."""
  out = []
  for batch in data.eval_batches(split, 64):
    for r in np.flatnonzero(batch["valid"]):
      out.append({k: batch[k][r] for k in features})
  return out


def _first(data, n=1):
  it = data.train_batches(0, 8)
  out = list(itertools.islice(it, n))
  it.close()
  return out


def _history_text(slot_items, titles):
  """The reference: the non-zero items newest first, ' ; '-joined."""
  items = [int(i) for i in slot_items if i]
  return "history: " + " ; ".join(titles[i] for i in reversed(items))


# -- history as titles ----------------------------------------------------------


def test_history_titles_are_newest_first_and_items_unchanged(tiny_data):
  kwargs = dict(task="history_to_next_title", max_history=4,
                max_input_len=128)
  titled = ilm_data.ILMData("t", tiny_data, items_as="titles", **kwargs)
  slots = ilm_data.ILMData("s", tiny_data, tokens_per_item=2, **kwargs)
  assert titled.items_as == "titles" and titled.tokens_per_item is None
  config = seqio.get_mixture_or_task(titled.task_name).config
  assert config["items_as"] == "titles" and config["tokens_per_item"] is None
  assert seqio.get_mixture_or_task(slots.task_name).config[
      "items_as"] == "slots"
  for s in SPLITS:  # the items keep their meaning and order (oldest first)
    a, b = titled.source.columns(s), slots.source.columns(s)
    for k in COLUMNS:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{s} {k}")
  titles = _titles(tiny_data)
  v = _vocab(tiny_data)
  rows = _eval_rows(titled, "validation",
                    ("inputs_pretokenized", "encoder_input_tokens",
                     ilm_tasks.SLOT_ITEMS, ilm_tasks.HISTORY_ITEMS))
  assert len(rows) == len(titled.source.columns("validation")[
      ilm_tasks.ITEM_INDEX]) > 0
  multi = 0
  for row in rows:
    hist = row[ilm_tasks.SLOT_ITEMS]
    np.testing.assert_array_equal(row[ilm_tasks.HISTORY_ITEMS], hist)
    want = _history_text(hist, titles)
    assert _text(row["inputs_pretokenized"]) == want
    ids = list(v.encode(want))[:127] + [1]
    np.testing.assert_array_equal(row["encoder_input_tokens"],
                                  ids + [0] * (128 - len(ids)))
    multi += int(np.sum(hist != 0) > 1)
  assert multi > 0  # the order is actually tested
  # One hand-read row: the newest item's title comes right after the prompt.
  hist = [int(i) for i in rows[0][ilm_tasks.SLOT_ITEMS] if i]
  assert _text(rows[0]["inputs_pretokenized"]).startswith(
      f"history: {titles[hist[-1]]} ; {titles[hist[-2]]}")
  batch = _first(titled)[0]
  assert batch[ilm_tasks.SLOT_ITEMS].shape == (8, 4)
  assert batch["encoder_input_tokens"].shape == (8, 128)
  assert (batch[ilm_tasks.SLOT_ITEMS][:, 0] > 0).all()


def test_long_history_loses_its_oldest_titles_first(tiny_data):
  v = _vocab(tiny_data)
  titles = _titles(tiny_data)
  longest = max(len(v.encode(f"history: {t}")) for t in titles.values())
  length = longest + 6  # room for the newest title and a little more
  data = ilm_data.ILMData("t", tiny_data, task="history_to_next_title",
                          items_as="titles", max_history=20,
                          max_input_len=length)
  cut = 0
  for row in _eval_rows(data, "test", ("inputs_pretokenized",
                                       "encoder_input_tokens",
                                       ilm_tasks.SLOT_ITEMS)):
    items = [int(i) for i in row[ilm_tasks.SLOT_ITEMS] if i]
    full = list(v.encode(_text(row["inputs_pretokenized"])))
    tokens = [int(t) for t in row["encoder_input_tokens"] if t]
    assert tokens[-1] == 1
    assert tokens[:-1] == full[:length - 1]  # seqio's trim, then EOS
    newest = list(v.encode(f"history: {titles[items[-1]]}"))
    assert tokens[:len(newest)] == newest  # the newest title is whole
    if len(full) > length - 1:  # what is lost is the end of the text:
      cut += 1                  # the oldest title (and maybe more)
      oldest = list(v.encode(titles[items[0]]))
      assert full[-len(oldest):] == oldest
  assert cut > 0  # histories longer than the window in tokens exist


def test_critique_follows_the_titles(tiny_data):
  data = ilm_data.ILMData("t", tiny_data, task="critique_next_title",
                          items_as="titles", max_history=3,
                          max_input_len=256)
  titles = _titles(tiny_data)
  rows = _eval_rows(data, "test", ("inputs_pretokenized", "critique",
                                   ilm_tasks.SLOT_ITEMS))
  assert rows
  for row in rows:
    assert _text(row["inputs_pretokenized"]) == (
        _history_text(row[ilm_tasks.SLOT_ITEMS], titles)
        + f" critique: {_text(row['critique'])}")


# -- the knowledge task ---------------------------------------------------------


def _knowledge_text(row):
  """The reference target, spelled out from an items.jsonl row."""
  return (f"category: {' > '.join(row['categories'])}. brand: "
          f"{row['brand']}. {row['description']}")


@pytest.mark.parametrize("items_as", ["slots", "titles"])
def test_item_to_text_maps_an_item_to_its_text_without_title(tiny_data,
                                                             items_as):
  data = ilm_data.ILMData("t", tiny_data, task="item_to_text",
                          items_as=items_as, tokens_per_item=4,
                          max_history=3, max_input_len=64,
                          max_target_len=128)
  assert data.max_slot_items == 1
  rows = prepared.read_items(tiny_data)
  split = text_tasks.split_items(len(rows), seed=0, validation_fraction=0.05,
                                 test_fraction=0.05)
  for s in SPLITS:
    cols = data.source.columns(s)
    np.testing.assert_array_equal(cols[ilm_tasks.ITEM_INDEX], split[s])
    np.testing.assert_array_equal(cols[ilm_tasks.SLOT_ITEMS][:, 0], split[s])
    np.testing.assert_array_equal(cols[ilm_tasks.TARGET_ITEM][:, 0],
                                  split[s])
    assert cols[ilm_tasks.HISTORY_ITEMS].shape == (len(split[s]), 3)
    assert not cols[ilm_tasks.HISTORY_ITEMS].any()
    assert data.source.stats(s) == {
        "items": len(split[s]), "examples": len(split[s]),
        "skipped_no_title": 0, "skipped_no_text": 0}
  got = _eval_rows(data, "validation", ("inputs_pretokenized",
                                        "targets_pretokenized",
                                        ilm_tasks.TARGET_ITEM))
  assert [int(r[ilm_tasks.TARGET_ITEM][0]) for r in got] == list(
      split["validation"])
  for r in got:
    row = rows[int(r[ilm_tasks.TARGET_ITEM][0]) - 1]
    target = _text(r["targets_pretokenized"])
    assert target == _knowledge_text(row)
    assert row["title"] not in target
    assert _text(r["inputs_pretokenized"]) == (
        f"item: {row['title']}" if items_as == "titles"
        else "item: " + " ".join(["<extra_id_99>"] * 4))
  batch = _first(data)[0]
  assert batch[ilm_tasks.SLOT_ITEMS].shape == (8, 1)
  assert batch[ilm_tasks.HISTORY_ITEMS].shape == (8, 3)
  assert batch["decoder_target_tokens"].shape == (8, 128)


def test_items_without_title_or_text_are_skipped_and_counted(tiny_data,
                                                             tmp_path):
  d = str(tmp_path / "gaps")
  shutil.copytree(tiny_data, d)
  rows = prepared.read_items(d)
  split = text_tasks.split_items(len(rows), seed=0, validation_fraction=0.05,
                                 test_fraction=0.05)
  no_title, no_text = (int(i) for i in split["validation"][:2])
  train_no_text = int(split["train"][0])
  rows[no_title - 1]["title"] = ""
  for i in (no_text, train_no_text):
    rows[i - 1].update(categories=[], brand="", description="")
  with open(os.path.join(d, prepared.ITEMS_FILE), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  data = ilm_data.ILMData("t", d, task="item_to_text", items_as="titles",
                          max_input_len=64)
  n = len(split["validation"])
  assert data.source.stats("validation") == {
      "items": n, "examples": n - 2, "skipped_no_title": 1,
      "skipped_no_text": 1}
  assert data.source.stats("train")["skipped_no_text"] == 1
  kept = data.source.columns("validation")[ilm_tasks.ITEM_INDEX].tolist()
  assert kept == [i for i in split["validation"] if i not in (no_title,
                                                              no_text)]
  assert data.num_examples("validation") == n - 2
  # A history item without a title is left out of the text.
  hist = ilm_data.ILMData("h", d, task="history_to_next_title",
                          items_as="titles", max_history=20,
                          max_input_len=512)
  titles = _titles(d)
  seen = 0
  for row in _eval_rows(hist, "test", ("inputs_pretokenized",
                                       ilm_tasks.SLOT_ITEMS)):
    text = _text(row["inputs_pretokenized"])
    assert text == _history_text(
        [i for i in row[ilm_tasks.SLOT_ITEMS] if i and titles[int(i)]],
        titles)
    seen += int(no_title in row[ilm_tasks.SLOT_ITEMS])
  assert seen > 0


# -- errors -----------------------------------------------------------------------


def _one_line(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_bad_items_as_and_copy_task_are_refused(tiny_data):
  with pytest.raises(ValueError, match=r"ILMData items_as='bogus': expected "
                     r"one of \['slots', 'titles'\]") as e:
    ilm_data.ILMData("t", tiny_data, items_as="bogus")
  _one_line(e)
  with pytest.raises(ValueError, match="ILM items_as='bogus'"):
    ilm_tasks.register_ilm_task("t", tiny_data, task="item_to_text",
                                items_as="bogus")
  with pytest.raises(ValueError, match="'item_to_title' with items_as="
                     "'titles'.*copy task.*'item_to_text'") as e:
    ilm_data.ILMData("t", tiny_data, task="item_to_title", items_as="titles")
  _one_line(e)
  with pytest.raises(ValueError, match="tokens_per_item=None"):
    ilm_tasks.register_ilm_task("t", tiny_data, task="item_to_text",
                                tokens_per_item=None)
  # Titles need no slot token (and no tokens_per_item).
  data = ilm_data.ILMData("t", tiny_data, task="item_to_text",
                          items_as="titles", tokens_per_item=None,
                          max_input_len=64)
  with pytest.raises(ValueError, match="writes no slot tokens"):
    _ = data.slot_id


def test_max_input_len_must_hold_the_longest_title(tiny_data):
  v = _vocab(tiny_data)
  titles = _titles(tiny_data)
  item = max(titles, key=lambda i: len(v.encode(f"history: {titles[i]}")))
  need = len(v.encode(f"history: {titles[item]}")) + 1
  ilm_data.ILMData("t", tiny_data, items_as="titles", max_input_len=need)
  with pytest.raises(ValueError) as e:
    ilm_data.ILMData("t", tiny_data, items_as="titles",
                     max_input_len=need - 1)
  message = _one_line(e)
  assert f"max_input_len={need - 1}" in message
  assert f"(item {item}) is {len(v.encode(titles[item]))} tokens, {need}" in (
      message)


def test_check_title_rows_names_the_bad_example():
  good = {"slot_items": np.array([[7, 0], [7, 9]])}
  ilm_data.check_title_rows(good, where="w")
  with pytest.raises(bad_input.BadInputError,
                     match=r"^w: example 11 \(row 1 .*\[0, 0\] has no item"):
    ilm_data.check_title_rows({"slot_items": np.array([[7, 0], [0, 0]])},
                              where="w", first_example=10)
  padded = {"slot_items": np.array([[7, 0], [0, 0]]),
            "valid": np.array([1.0, 0.0])}
  ilm_data.check_title_rows(padded, where="w")  # an eval batch's padding
  with pytest.raises(bad_input.BadInputError, match="example 1 .*no item"):
    ilm_data.check_title_rows(dict(padded, valid=np.ones(2)), where="w")
  with pytest.raises(bad_input.BadInputError,
                     match=r"example 0 .*after a 0"):
    ilm_data.check_title_rows({"slot_items": np.array([[0, 7], [7, 9]])},
                              where="w")
