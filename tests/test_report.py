"""The evaluation report (`python -m recsys_jax.report`) on tiny fake runs.

The run directories are written with the project's own writers (eval JSON
through `evaluator.write_results`, scalars through `MetricWriter`), so a
change of those formats shows up here.
"""

import base64
import io
import json
import os
import re

import numpy as np
from PIL import Image
import pytest
import tensorboardX

from recsys_jax import report
from recsys_jax.core import metric_writer
from recsys_jax.data import prepared
from recsys_jax.evaluation import critiquing
from recsys_jax.evaluation import evaluator
from recsys_jax.evaluation import metrics
from recsys_jax.reporting import beyond_accuracy
from recsys_jax.reporting import build
from recsys_jax.reporting import eval_results
from recsys_jax.reporting import events
from recsys_jax.reporting import gin_config
from recsys_jax.reporting import run_data
from recsys_jax.runs import predict_run

KS = (1, 5, 10)
NUM_ITEMS = 20
BOUNDS = (1, 5)
IMG = re.compile(r'<img class="figure" alt="([^"]*)" '
                 r'src="data:image/png;base64,([A-Za-z0-9+/=]+)">')
SECTION = re.compile(r'<section id="([a-z_]+)">')


def _ranking(ranks, counts=None) -> dict:
  """An entry as the Evaluator writes it (with frequency buckets when the
  targets' train counts are given)."""
  ranks = np.asarray(ranks)
  acc = metrics.RankingMetrics(KS, metrics.FULL_RANKING_EXCLUDING_HISTORY)
  acc.add(ranks)
  res = acc.result()
  if counts is not None:
    bucket = evaluator.frequency_bucket(counts, BOUNDS)
    accs = []
    for b in range(len(BOUNDS) + 1):
      a = metrics.RankingMetrics(KS, metrics.FULL_RANKING_EXCLUDING_HISTORY)
      a.add(ranks, valid=bucket == b)
      accs.append(a)
    res["by_frequency"] = evaluator.bucket_results(accs, BOUNDS)
    res["frequency_buckets"] = list(BOUNDS)
  return res


def _critiquing_block(base_ranks, critique_ranks) -> dict:
  none, cat = _ranking(base_ranks), _ranking(critique_ranks)
  block = {critiquing.NO_CRITIQUE: none, critiquing.CATEGORY_CRITIQUE: cat}
  for name in metrics.metric_names(KS):
    block[f"lift_{name}"] = (cat[name] / none[name] if none[name] > 0
                             else None)
  block["num_users"] = len(base_ranks)
  return block


# The evaluator's beyond-accuracy block (`metrics.BeyondAccuracy.result()`).
BEYOND = {"coverage@10": 0.4, "covered_items@10": 8, "popularity@10": 12.0,
          "popularity_percentile@10": 0.8, "target_popularity": 6.0,
          "target_popularity_percentile": 0.5}


def _write_ranking_run(model_dir, *, steps=(10, 20), beyond=None,
                       with_critiquing=True, data_dir=None,
                       with_predict=True, lr=1e-3):
  """A ranking run: evaluations at `steps` (model, popularity, EASE with its
  fit description, a skipped Markov chain), train scalars, config.gin and a
  predict output."""
  os.makedirs(model_dir, exist_ok=True)
  counts = np.array([0, 2, 3, 7, 30, 30, 1, 9])
  writer = metric_writer.MetricWriter(model_dir)
  for step in range(5, steps[-1] + 1, 5):
    writer.write_scalars(step, {"train/loss": 10.0 / step,
                                "train/masked_accuracy": step / 100,
                                "train/learning_rate": lr})
  for i, step in enumerate(steps):
    better = len(steps) - i  # later steps rank the targets higher
    results = {}
    for split in ("validation", "test"):
      model = _ranking(np.array([0, 3, 12, 1, 8, 2, 30, 4]) * better, counts)
      if beyond:
        model["beyond_accuracy"] = dict(beyond)
      results[split] = model
      results[f"{split}_popularity"] = _ranking(
          np.array([9, 40, 2, 60, 11, 5, 3, 70]), counts)
      results[f"{split}_ease"] = _ranking(
          np.array([1, 30, 9, 6, 20, 7, 2, 15]), counts)
      results[f"{split}_ease"]["baseline"] = {"l2": 500.0}
      results[f"{split}_markov"] = {"skipped": "no transitions"}
    if with_critiquing:
      results["test" + critiquing.SUFFIX] = _critiquing_block(
          [10, 20, 4, 8], [0, 2, 1, 3])
    evaluator.write_results(model_dir, step, results, writer)
  writer.close()
  with open(os.path.join(model_dir, "config.gin"), "w") as f:
    f.write("from recsys_jax import runs\n\n# Macros:\n"
            f"DATA_DIR = {data_dir!r}\nMODEL_DIR = {model_dir!r}\n"
            f"trainer.OptimizerConfig.learning_rate = {lr}\n"
            "EVALUATION/evaluation.EvalConfig.ks = \\\n    (1, 5, 10)\n"
            "MODEL/builders.bert4rec.hidden = 16  # <b>not html</b>\n")
  if with_predict:
    os.makedirs(os.path.join(model_dir, "predict"))
    with open(os.path.join(model_dir, "predict", "test_step20.jsonl"),
              "w") as f:
      for history, top, target in (([1, 2, 3], [4, 5, 6], 4),
                                   ([1, 4], [5, 6, 7], 6),
                                   ([1, 5], [4, 6, 2], 9)):
        f.write(json.dumps({"user_id": "u", "history": history,
                            "top_k": top, "target": target}) + "\n")


def _write_text_run(model_dir):
  """A text model's run: generation metrics only, no events, no config."""
  evaluator.write_results(model_dir, 7, {
      "test": {"bleu": 12.5, "rougeL": 30.25, "loss": 1.5,
               "num_examples": 40}})


def _images(page):
  """[(alt, decoded PIL image)] of every figure of the page."""
  out = []
  for alt, data in IMG.findall(page):
    png = base64.b64decode(data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(png))
    img.load()
    out.append((alt, img))
  return out


def _sections(page):
  """{section id: its HTML}."""
  parts = SECTION.split(page)
  return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("report")
  data_dir = os.path.join(root, "data")
  os.makedirs(data_dir)
  with open(os.path.join(data_dir, "stats.json"), "w") as f:
    json.dump({"items": NUM_ITEMS}, f)
  _write_ranking_run(os.path.join(root, "sasrec"), data_dir=data_dir)
  _write_ranking_run(os.path.join(root, "bert4rec"), steps=(20,),
                     with_critiquing=False, with_predict=False,
                     data_dir=data_dir, lr=5e-4, beyond=BEYOND)
  _write_text_run(os.path.join(root, "t5"))
  return str(root)


def test_one_run_has_every_section_and_figure(runs_dir):
  out = os.path.join(runs_dir, "one.html")
  assert report.main([f"--model_dir={runs_dir}/sasrec",
                      f"--output={out}"]) == 0
  with open(out, encoding="utf-8") as f:
    page = f.read()
  sections = _sections(page)
  assert list(sections) == [a for a, _, _ in build.SECTIONS]
  assert "failed on these runs" not in page
  alts = [alt for alt, _ in _images(page)]
  assert alts == [
      "coverage and mean popularity of recommended items",
      "popularity distribution of recommended items",
      "metrics by target frequency on test", "training curves",
      "validation vs test over steps", "critique lift"]
  for _, img in _images(page):
    assert img.size[0] == 1100 and img.size[1] > 300
  metrics_html = sections["metrics"]
  # The model, then every `{split}_{name}` baseline (popularity, ease).
  assert "sasrec · step 20" in metrics_html
  assert "popularity (baseline)" in metrics_html
  assert "ease (baseline)" in metrics_html
  assert "markov skipped: no transitions" in metrics_html
  assert "ease: l2=500.0" in metrics_html
  assert "NDCG@10" in metrics_html and "num_users" in metrics_html
  # Beyond accuracy from the predict output: items {4, 5, 6, 7, 2} of 20.
  assert "0.2500" in sections["beyond"]
  assert "1-4" in sections["frequency"] and "5+" in sections["frequency"]
  # config.gin is escaped and collapsible.
  assert "&lt;b&gt;not html&lt;/b&gt;" in sections["config"]
  assert "<details>" in sections["config"]
  assert "<b>not html</b>" not in page


def test_two_runs_side_by_side_with_missing_parts(runs_dir):
  out = os.path.join(runs_dir, "three.html")
  assert report.main([f"--model_dir={runs_dir}/sasrec",
                      f"--model_dir={runs_dir}/bert4rec",
                      f"--model_dir={runs_dir}/t5", f"--output={out}"]) == 0
  with open(out, encoding="utf-8") as f:
    page = f.read()
  sections = _sections(page)
  assert "failed on these runs" not in page
  # One column per run; identical baselines are shown once.
  header = re.search(r"<h3>test</h3>\s*<table>\s*<tr>(.*?)</tr>",
                     sections["metrics"]).group(1)
  assert [c for c in re.findall(r"<th[^>]*>([^<]*)</th>", header)] == [
      "metric", "sasrec · step 20", "bert4rec · step 20", "t5 · step 7",
      "popularity (baseline)", "ease (baseline)", "markov (baseline)"]
  assert "bleu" in sections["metrics"]
  # bert4rec's eval JSON has the evaluator's beyond-accuracy block: its
  # numbers are rows of the tables (ints as ints) and bars of a figure.
  for name in BEYOND:
    assert f">{name}<" in sections["metrics"], name
  assert "<td class=\"num\">8</td>" in sections["beyond"]
  assert "beyond-accuracy metrics on test" in sections["beyond"]
  # Runs without events or config get a note, not a crash.
  assert "t5: no event files" in sections["training"]
  assert "not available: t5: no config.gin" in sections["config"]
  # The configs that exist are compared binding by binding.
  assert "trainer.OptimizerConfig.learning_rate" in sections["config"]
  assert "EVALUATION/evaluation.EvalConfig.ks" not in sections["config"].split(
      "<details>")[0]
  assert len(_images(page)) == 7


def test_missing_parts_are_notes(tmp_path):
  _write_text_run(str(tmp_path / "t5"))
  page = build.render(run_data.load_runs([str(tmp_path / "t5")]))
  sections = _sections(page)
  for anchor, why in (
      ("beyond", "not evaluated: the eval JSON has no coverage"),
      ("frequency", "not available: the evaluations have no by_frequency"),
      ("training", "not available: t5: no event files"),
      ("critiquing", "not available: no run has critiquing results"),
      ("config", "not available: t5: no config.gin")):
    assert why in sections[anchor], anchor
  # The text metrics still make a table and a (one-step) curve.
  assert "rougeL" in sections["metrics"]
  assert "evaluated at one step only" in sections["validation_test"]


def test_bad_model_dirs_are_one_line_errors(tmp_path, capsys):
  assert report.main([f"--model_dir={tmp_path}/nope"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"report: --model_dir={tmp_path}/nope does not exist"
  os.makedirs(tmp_path / "empty" / "eval")
  assert report.main([f"--model_dir={tmp_path}/empty"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and f"--model_dir={tmp_path}/empty" in err
  assert "no evaluation output" in err
  with pytest.raises(SystemExit):
    report.main([])  # --model_dir is required


def test_event_scalars_merge_and_survive_a_cut_file(tmp_path):
  writer = metric_writer.MetricWriter(str(tmp_path))
  writer.write_scalars(1, {"train/loss": 3.0})
  writer.write_scalars(2, {"train/loss": 2.0, "eval/test/HR@10": 0.5})
  writer.close()
  # A resumed run writes step 2 again, later, to a second file (named by
  # the second: a suffix keeps this test from waiting for the next one).
  resumed = tensorboardX.SummaryWriter(str(tmp_path), filename_suffix=".b")
  resumed.add_scalar("train/loss", 1.5, global_step=2)
  resumed.close()
  scalars = events.read_scalars(str(tmp_path))
  assert scalars.series["train/loss"] == [(1, 3.0), (2, 1.5)]
  assert scalars.series["eval/test/HR_10"] == [(2, 0.5)]  # tag as written
  assert scalars.problems == []
  path = sorted(scalars.files)[-1]
  with open(path, "ab") as f:
    f.write(b"\x05\x00")  # a writer killed mid-record
  scalars = events.read_scalars(str(tmp_path))
  assert scalars.series["train/loss"] == [(1, 3.0), (2, 1.5)]
  assert len(scalars.problems) == 1 and "truncated" in scalars.problems[0]


def test_organize_takes_any_baseline_and_critiquing():
  results = {"validation": {"HR@10": 0.1}, "test": {"HR@10": 0.2},
             "test_popularity": {"HR@10": 0.05},
             "test_markov": {"HR@10": 0.15},
             "test_critiquing": {"lift_HR@10": 2.0}, "note": 3}
  org = eval_results.organize(results)
  assert list(org) == ["validation", "test"]
  assert list(org["test"].baselines) == ["popularity", "markov"]
  assert org["test"].critiquing == {"lift_HR@10": 2.0}
  assert org["validation"].baselines == {}
  # Blocks of numbers are metrics; buckets and a fit description are not.
  entry = {"HR@10": 0.2, "num_users": 4, "protocol": "full",
           "beyond_accuracy": {"coverage@10": 0.5, "HR@10": 0.9},
           "baseline": {"l2": 1.0}, "by_frequency": {"0": {"HR@10": 0.0}}}
  assert eval_results.scalar_metrics(entry) == {
      "HR@10": 0.2, "num_users": 4, "coverage@10": 0.5,
      "beyond_accuracy/HR@10": 0.9}
  assert eval_results.headline_metrics(
      ["HR@1", "NDCG@10", "HR@10", "coverage@10"]) == ["NDCG@10", "HR@10"]
  assert eval_results.headline_metrics(
      ["num_examples", "bleu", "loss"]) == ["bleu", "loss"]


def test_gin_config_bindings_and_differences(tmp_path):
  a = ("from recsys_jax import runs\n# c\nA = 1\nB = [\n    1,\n    2]\n"
       "scope/f.x = 'y'\n")
  b = "A = 2\nB = [\n    1,\n    2]\n"
  assert gin_config.bindings(a) == {"A": "1", "B": "[ 1, 2]",
                                    "scope/f.x": "'y'"}
  # gin writes long values on a continuation line after a backslash.
  assert gin_config.bindings("C = \\\n    @f()\n") == {"C": "@f()"}
  assert gin_config.differences([a, None, b]) == [
      ("A", ["1", "2"]), ("scope/f.x", ["'y'", None])]
  data = tmp_path / "d"
  data.mkdir()
  run = tmp_path / "runs" / "r"
  run.mkdir(parents=True)
  # DATA_DIR relative to a directory above MODEL_DIR (the repo root).
  assert gin_config.data_dir("DATA_DIR = 'd'\n", str(run)) == str(data)
  assert gin_config.data_dir("DATA_DIR = 'missing'\n", str(run)) is None


def test_beyond_accuracy_from_predictions(tmp_path):
  _write_ranking_run(str(tmp_path / "r"), steps=(20,), data_dir=None)
  run = run_data.load_run(str(tmp_path / "r"))
  output = beyond_accuracy.pick_prediction(run, "test")
  b = beyond_accuracy.from_predictions(output, num_items=10, k=2)
  # Top-2 slots: 4 5 | 5 6 | 4 6; history counts: 1:3 2:1 3:1 4:1 5:1.
  assert (b.k, b.num_users, b.distinct_items) == (2, 3, 3)
  assert b.coverage == pytest.approx(0.3)
  assert b.mean_popularity == pytest.approx((1 + 1 + 1 + 0 + 1 + 0) / 6)
  assert b.target_mean_popularity == pytest.approx((1 + 0 + 0) / 3)
  assert beyond_accuracy.catalogue_size(None)[0] is None


def test_names_match_the_modules_that_write_them():
  """The report reads these names without importing their writers (which
  pull in JAX and the models): they must not drift apart."""
  assert eval_results.CRITIQUING_SUFFIX == critiquing.SUFFIX
  assert eval_results.CRITIQUE_VARIANTS == (
      critiquing.NO_CRITIQUE, critiquing.CATEGORY_CRITIQUE,
      critiquing.DATA_CRITIQUE)
  assert eval_results.CRITIQUE_GROUPS == (critiquing.OOD,
                                          critiquing.IN_DOMAIN)
  assert run_data.PREDICT_SUBDIR == predict_run.PREDICT_SUBDIR
  assert beyond_accuracy.ITEMS_FILE == prepared.ITEMS_FILE
  assert beyond_accuracy.STATS_FILE == prepared.STATS_FILE
