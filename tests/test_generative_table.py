"""benchmarks/generative_table: metrics on the users every entry has."""

import json

import numpy as np
import pytest

from benchmarks import generative_table


def _write(path, records, timing=None):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if timing is not None:
    with open(str(path)[:-len(".jsonl")] + ".timing.json", "w") as f:
      json.dump({"steady_rows_per_second": timing}, f)
  return str(path)


def test_same_users_hand_computed_metrics(tmp_path):
  ranking = _write(tmp_path / "a.jsonl", [
      {"user_id": "u1", "target": 7, "top_k": [7, 2, 3]},
      {"user_id": "u2", "target": 5, "top_k": [1, 2, 3, 4, 6, 5]},
      {"user_id": "u3", "target": 9, "top_k": [9]},  # not in b: left out
  ], timing=100.0)
  generative = _write(tmp_path / "b.jsonl", [
      {"user_id": "u1", "target_item": 7, "ranked_items": [3, 7]},
      {"user_id": "u2", "target_item": [5], "ranked_items": [0, 0]},
  ])
  out = str(tmp_path / "t")
  assert generative_table.main([f"--entry=A={ranking}",
                                f"--entry=B={generative}",
                                f"--output={out}"]) == 0
  with open(out + ".json") as f:
    table = json.load(f)
  assert table["users"] == 2
  a, b = table["rows"]["A"], table["rows"]["B"]
  assert a["HR@5"] == 0.5 and a["HR@10"] == 1.0
  assert a["NDCG@10"] == pytest.approx((1.0 + 1.0 / np.log2(7)) / 2)
  assert b["HR@5"] == 0.5 and b["NDCG@5"] == pytest.approx(
      0.5 / np.log2(3))
  assert a["users_per_second"] == 100.0 and b["users_per_second"] is None
  with open(out + ".md") as f:
    text = f.read()
  assert "| A | 0.5000 | 1.0000 |" in text and "2 users" in text


def test_other_targets_and_bad_lines_are_named(tmp_path, capsys):
  a = _write(tmp_path / "a.jsonl", [{"user_id": "u1", "target": 7,
                                     "top_k": [7]}])
  b = _write(tmp_path / "b.jsonl", [{"user_id": "u1", "target_item": 8,
                                     "ranked_items": [8]}])
  assert generative_table.main([f"--entry=A={a}", f"--entry=B={b}",
                                f"--output={tmp_path / 't'}"]) == 1
  assert "not the same split" in capsys.readouterr().err
  bad = tmp_path / "c.jsonl"
  bad.write_text('{"user_id": "u1", "target": 7, "top_k": [7]}\n{oops\n')
  with pytest.raises(Exception, match=r"c\.jsonl.*2"):
    generative_table.main([f"--entry=C={bad}", f"--output={tmp_path / 't'}"])
