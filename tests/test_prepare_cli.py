"""The `prepare` CLI: end to end in a subprocess, exit code 2 on bad input."""

import json
import os
import subprocess
import sys

import pytest

from recsys_jax.data import prepare
from recsys_jax.data import prepared

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEQ = "1 3 1 2\n2 2 3 4\n3 4 1 1 2\n"
META = "".join(json.dumps({"item_id": i, "title": t, "categories": [c]}) + "\n"
               for i, t, c in [(1, "red pen", "pens"), (2, "blue pen", "pens"),
                               (3, "notebook", "paper"),
                               (4, "stapler", "tools")])


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3",
             CUDA_VISIBLE_DEVICES="")
  return subprocess.run(
      [sys.executable, "-m", "recsys_jax.data.prepare", *args],
      capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_cli_end_to_end_sequence_file(tmp_path):
  seq = tmp_path / "seq.txt"
  seq.write_text(SEQ)
  meta = tmp_path / "meta.jsonl"
  meta.write_text(META)
  out = tmp_path / "out"
  proc = run_cli("--format=sequence_file", f"--input={seq}",
                 f"--item_metadata={meta}", f"--output_dir={out}",
                 "--num_shards=2", "--text_vocab_size=30")
  assert proc.returncode == 0, proc.stderr
  assert "users:        3" in proc.stdout
  assert "interactions: 10" in proc.stdout
  assert "p50=3" in proc.stdout and "max=4" in proc.stdout
  ds = prepared.PreparedDataset(str(out))
  assert ds.stats["users"] == 3 and ds.num_items == 4
  assert len(ds.sequence_files) == 2
  assert [it["title"] for it in ds.items()] == ["red pen", "blue pen",
                                                "notebook", "stapler"]
  assert os.path.exists(ds.text_vocab_path)
  seqs = {s["user_id"].decode(): list(s["item_ids"])
          for s in ds.iter_sequences()}
  assert seqs == {"1": [3, 1, 2], "2": [2, 3, 4], "3": [4, 1, 1, 2]}


def test_cli_bad_input_exit_code_2_one_line(tmp_path):
  seq = tmp_path / "seq.txt"
  seq.write_text("1 3 1 2\n2\n")
  proc = run_cli("--format=sequence_file", f"--input={seq}",
                 f"--output_dir={tmp_path / 'out'}", "--text_vocab_size=0")
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  error_lines = [l for l in proc.stderr.splitlines()
                 if l.startswith("prepare: error:")]
  assert error_lines == [
      f"prepare: error: {seq}:2: user '2' has no items; expected 'user item1 "
      "item2 ...' (whitespace separated) (pass --on_bad_line=skip to count "
      "and skip such records)"]


def test_cli_skip_mode_counts_in_stats(tmp_path, capsys):
  seq = tmp_path / "seq.txt"
  seq.write_text("1 3 1 2\n2\n1 1 1 1\n3 1 2 3\n")
  out = tmp_path / "out"
  rc = prepare.main(["--format=sequence_file", f"--input={seq}",
                     f"--output_dir={out}", "--on_bad_line=skip",
                     "--text_vocab_size=0"])
  assert rc == 0
  assert '"duplicate_user": 1' in capsys.readouterr().out
  with open(out / prepared.STATS_FILE) as f:
    stats = json.load(f)
  assert stats["skipped"] == {"duplicate_user": 1, "user_without_items": 1}
  assert stats["users"] == 2


def test_cli_missing_input_file(tmp_path, capsys):
  rc = prepare.main(["--format=sequence_file",
                     f"--input={tmp_path / 'absent.txt'}",
                     f"--output_dir={tmp_path / 'out'}"])
  assert rc == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"prepare: error: {tmp_path / 'absent.txt'}: sequence file "
                 "not found; expected an existing file")


def test_cli_missing_input_flag(tmp_path, capsys):
  rc = prepare.main(["--format=regen", f"--output_dir={tmp_path}"])
  assert rc == 2
  assert "--input: missing" in capsys.readouterr().err


def test_cli_rejects_unknown_format(tmp_path):
  with pytest.raises(SystemExit) as e:
    prepare.main(["--format=csv", f"--output_dir={tmp_path}"])
  assert e.value.code == 2  # argparse usage error


def test_cli_kcore_flag_reaches_amazon_reader(tmp_path, capsys):
  reviews = tmp_path / "r.json"
  reviews.write_text("".join(
      json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t}) + "\n"
      for u, a, t in [("A", "x", 1), ("A", "y", 2), ("B", "x", 1),
                      ("B", "y", 2), ("C", "x", 3)]))
  out = tmp_path / "out"
  rc = prepare.main(["--format=amazon", f"--input={reviews}",
                     f"--output_dir={out}", "--kcore=2",
                     "--min_interactions=2", "--text_vocab_size=0"])
  assert rc == 0
  stats = prepared.PreparedDataset(str(out)).stats
  assert stats["kcore"]["users_removed"] == 1  # C has one review
  assert stats["users"] == 2 and stats["interactions"] == 4
  assert "kcore:" in capsys.readouterr().out


def test_cli_synthetic_dispatch(tmp_path, monkeypatch):
  from recsys_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_generate(output_dir, **kwargs):
    calls.append((output_dir, kwargs))
    return {"users": kwargs.get("num_users", 0), "items": 0,
            "interactions": 0}

  monkeypatch.setattr(synthetic, "generate", fake_generate)
  rc = prepare.main(["--format=synthetic", f"--output_dir={tmp_path}",
                     "--num_users=7", "--num_items=5", "--seed=3",
                     "--num_shards=2", "--text_vocab_size=0"])
  assert rc == 0
  assert calls == [(str(tmp_path), {"num_users": 7, "num_items": 5, "seed": 3,
                                    "num_shards": 2,
                                    "text_vocab_size": None})]
