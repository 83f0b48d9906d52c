"""Benchmarks: FLOP count vs the model's own matmuls, --smoke runs, RESULTS.md.

The RecBole peer never runs here (it needs its own virtualenv); only its
data conversion is checked.
"""

import json
import math
import os

import jax
import jax.extend
import numpy as np
import pytest

from benchmarks import common
from benchmarks import eval_throughput
from benchmarks import recbole_peer
from benchmarks import time_to_quality
from benchmarks import train_throughput
from recsys_jax.model_lib import sequence as model_lib
from recsys_jax.models import bert4rec


def _dot_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general in a (closed) jaxpr, recursively."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), (lb, _) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      out = eqn.outvars[0].aval.shape
      contract = math.prod(lhs[d] for d in lc)
      del rhs, lb
      total += 2.0 * math.prod(out) * contract
  for sub in jax.extend.core.subjaxprs(jaxpr):
    total += _dot_flops(getattr(sub, "jaxpr", sub))
  return total


@pytest.mark.parametrize("output_transform", [True, False])
def test_flop_count_equals_the_models_matmuls(output_transform):
  cfg = bert4rec.Bert4RecConfig(num_items=40, max_len=6, hidden=8,
                                num_layers=2, num_heads=2, mlp_dim=12,
                                dropout_rate=0.0, attention_dropout_rate=0.0,
                                output_transform=output_transform)
  model = model_lib.Bert4RecModel(cfg, max_predictions=3)
  # Shapes only: the jaxpr, hence its matmuls, does not depend on the values
  # (an eager initialisation would compile each of its ops).
  params = __import__("flax").linen.meta.unbox(jax.eval_shape(
      model.get_initial_variables, jax.random.PRNGKey(0))["params"])
  b, l = 5, cfg.max_len
  ids = np.arange(1, b * l + 1, dtype=np.int32).reshape(b, l) % 40 + 1
  weights = np.zeros((b, l), np.float32)
  weights[:, :2] = 1.0
  batch = {"item_ids": ids, "targets": ids * (weights > 0),
           "loss_weights": weights}
  jaxpr = jax.make_jaxpr(lambda p: model.loss_fn(p, batch, None)[0])(params)
  counted = common.bert4rec_flops_per_row(
      length=l, hidden=8, num_layers=2, mlp_dim=12, predictions=3,
      vocab=cfg.padded_vocab, output_transform=output_transform)
  # The output bias rides in the tied matmul as an extra table column
  # (losses.tied_softmax_cross_entropy): 2 x V FLOPs per prediction that the
  # analytic (model-FLOP) count leaves out, as it leaves out bias adds.
  bias_column = 2.0 * b * 3 * cfg.padded_vocab
  assert counted["total"] * b + bias_column == _dot_flops(jaxpr.jaxpr)
  assert common.train_flops_per_step(
      b, length=l, hidden=8, num_layers=2, mlp_dim=12, predictions=3,
      vocab=cfg.padded_vocab, output_transform=output_transform) == (
          3 * b * counted["total"])


def test_flop_count_by_hand():
  f = common.bert4rec_flops_per_row(length=4, hidden=8, num_layers=1,
                                    mlp_dim=16, predictions=2, vocab=32)
  assert f["qkv_out"] == 4 * (2 * 4 * 8 * 8)
  assert f["attention"] == 2 * (2 * 4 * 4 * 8)
  assert f["mlp"] == 2 * (2 * 4 * 8 * 16)
  assert f["output"] == 2 * 2 * 8 * 32 + 2 * 2 * 8 * 8
  assert f["total"] == sum(v for k, v in f.items() if k != "total")


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bench") / "synthetic")
  common.ensure_synthetic(path, num_users=120, num_items=100)
  return path


@pytest.fixture
def fast_compile_children(monkeypatch):
  """XLA's LLVM optimisation off and its older (non-MLIR) CPU fusion
  emitters in the processes a --num_processes run starts (they inherit this
  environment): only their host code gets slower, their compilations (most
  of these smoke runs' time) several times faster, as in
  tests/test_multihost.py. This process's backend is initialised first, so
  its own flags do not change."""
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
       "--xla_cpu_use_fusion_emitters=false"]).strip())


def test_train_throughput_smoke(smoke_data, tmp_path):
  out = tmp_path / "train.json"
  # Two of the four modes (one per compiled step: padded and packed) keep
  # the test short; XLA:CPU compiles dominate its time.
  train_throughput.main(["--smoke", "--data_dir", smoke_data,
                         "--modes", "staged_padded,staged_packed,"
                         "pipeline_packed", "--output", str(out)])
  res = json.loads(out.read_text())
  assert set(res["modes"]) == {"staged_padded", "staged_packed",
                                "pipeline_packed"}
  peak = res["matmul_peak"]["best_gflops"]
  assert peak > 0
  length = train_throughput.SMOKE_SIZES["max_len"]
  for mode, m in res["modes"].items():
    assert m["step_time_s"] > 0
    assert m["sequences_per_s"] == pytest.approx(
        m["rows_per_step"] / m["step_time_s"])
    assert 0 < m["interactions_per_row"] <= length
    assert m["mfu"] == pytest.approx(m["achieved_gflops"] / peak)
    assert m["achieved_gflops"] == pytest.approx(
        m["gflop_per_step"] / m["step_time_s"])
    if mode.endswith("padded"):
      assert m["users_per_row"] == 1.0
      assert m["masked_dropped_fraction"] == 0.0
  packed = res["modes"]["staged_packed"]
  padded = res["modes"]["staged_padded"]
  # Packing puts several users in a row, so far fewer padding positions.
  assert packed["users_per_row"] > 1.0
  assert packed["interactions_per_row"] > padded["interactions_per_row"]
  assert res["machine"]["command"]
  assert res["machine"]["cpu_model"]


def test_train_throughput_smoke_with_microbatches(smoke_data, tmp_path):
  out = tmp_path / "train_mb.json"
  train_throughput.main(["--smoke", "--data_dir", smoke_data,
                         "--modes", "staged_padded", "--num_microbatches",
                         "2", "--output", str(out)])
  res = json.loads(out.read_text())
  assert res["num_microbatches"] == 2
  m = res["modes"]["staged_padded"]
  assert m["num_microbatches"] == 2
  assert m["step_time_s"] > 0
  # The whole batch still counts as one step's rows.
  assert m["rows_per_step"] == train_throughput.SMOKE_SIZES["batch_size"]
  with pytest.raises(SystemExit):  # 8 rows do not split into 3
    train_throughput.parse_args(["--smoke", "--num_microbatches=3",
                                 "--output", str(out)])


def test_train_throughput_smoke_two_processes(smoke_data, tmp_path,
                                              fast_compile_children):
  """--num_processes=2: the launcher, jax.distributed over gloo, one flat
  all-reduce a step (local accumulation), counts and peak of both."""
  out = tmp_path / "train_mp.json"
  train_throughput.main([
      "--smoke", "--data_dir", smoke_data, "--modes",
      "staged_packed,pipeline_padded", "--num_processes=2",
      "--local_accumulation", "--num_microbatches=2", "--steps=2",
      "--repeats=1", "--output", str(out)])
  res = json.loads(out.read_text())
  assert res["machine"]["command"] and res["process_machine"]["command"]
  assert res["num_processes"] == 2 and res["local_accumulation"]
  assert len(res["devices"]) == 2
  peak = res["matmul_peak"]
  assert len(peak["processes_together"][0]["per_process_best_gflops"]) == 2
  assert peak["best_gflops"] >= peak["launcher_best_gflops"] > 0
  batch = train_throughput.SMOKE_SIZES["batch_size"]
  for mode in ("staged_packed", "pipeline_padded"):
    m = res["modes"][mode]
    # Both processes' rows: the global batch.
    assert m["rows_per_step"] == batch, mode
    assert m["mfu"] == pytest.approx(
        m["achieved_gflops"] / peak["best_gflops"])
  assert res["modes"]["pipeline_padded"]["users_per_row"] == 1.0
  with pytest.raises(SystemExit):  # 4 rows per process do not split into 8
    train_throughput.parse_args(["--smoke", "--num_processes=2",
                                 "--num_microbatches=8", "--output",
                                 str(out)])


def test_eval_throughput_smoke(smoke_data, tmp_path):
  out = tmp_path / "eval.json"
  eval_throughput.main(["--smoke", "--data_dir", smoke_data,
                        "--output", str(out)])
  res = json.loads(out.read_text())
  assert res["users"] == 120  # every validation user once
  assert res["metrics_untrained"]["num_users"] == 120
  for mode in eval_throughput.MODES:
    m = res["modes"][mode]
    assert m["users_per_s"] == pytest.approx(
        120 / float(np.median(m["seconds"])))
  assert res["users_per_s"] == res["modes"]["cached"]["users_per_s"]
  # Regrouping users by length and cutting padding must not change metrics;
  # nor may the cache or the input pipeline.
  bucketed = res["modes"]["staged"]
  assert min(bucketed["row_lengths"]) < train_throughput.SMOKE_SIZES["max_len"]
  for mode in ("cached", "pipeline", "staged"):
    for k, v in res["modes"]["staged_padded"]["metrics"].items():
      assert res["modes"][mode]["metrics"][k] == pytest.approx(
          v, rel=1e-5, abs=1e-7), (mode, k)
  assert 0.0 <= res["metrics_untrained"]["NDCG@10"] <= 1.0


def test_recbole_inter_file(tmp_path):
  raw = tmp_path / "Beauty.txt"
  raw.write_text("1 5 7 9\n2 7 3\n")
  path = recbole_peer.write_inter_file(str(raw), str(tmp_path / "work"))
  lines = open(path).read().splitlines()
  assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
  assert lines[1:] == ["1\t5\t0", "1\t7\t1", "1\t9\t2", "2\t7\t0", "2\t3\t1"]
  bad = tmp_path / "bad.txt"
  bad.write_text("1 5\n7\n")
  with pytest.raises(ValueError, match="bad.txt:2"):
    recbole_peer.write_inter_file(str(bad), str(tmp_path / "work2"))


def _fake(path, payload):
  common.write_result(str(path), payload)


def test_summarize_ratios_and_targets(tmp_path):
  res = tmp_path / "results"
  res.mkdir()
  mode = {"step_time_s": 1.0, "sequences_per_s": 300.0, "users_per_s": 300.0,
          "interactions_per_s": 2000.0, "tokens_per_s": 15000.0,
          "gflop_per_step": 20.0, "achieved_gflops": 20.0, "mfu": 0.4}
  packed = dict(mode, interactions_per_s=4000.0)
  for r, ours_seq in ((1, 300.0), (2, 320.0), (3, 310.0)):
    _fake(res / f"train_throughput_round{r}.json",
          {"modes": {"staged_padded": dict(mode, sequences_per_s=ours_seq),
                     "pipeline_packed": packed},
           "matmul_peak": {"best_gflops": 50.0}})
    _fake(res / f"recbole_round{r}.json",
          {"trainer": {"sequences_per_s": 100.0, "interactions_per_s": 1000.0},
           "staged": {"sequences_per_s": 200.0},
           "users_per_s": 100.0})
    _fake(res / f"eval_throughput_round{r}.json", {"users_per_s": 250.0})
  out = common.summarize(str(res), str(tmp_path / "RESULTS.md"))
  text = open(out).read()
  # staged padded: median 310 vs 200 -> 1.55x, target 1.5x met.
  assert "| 310 | 200 | 1.55x | >= 1.5x RecBole seq/s, padded: met |" in text
  # packed interactions 4000 vs 1000 -> 4.00x >= 3x.
  assert "| 4,000 | 1,000 | 4.00x |" in text
  # evaluation 250 vs 100 = 2.5x < 3x.
  assert "| 250 | 100 | 2.50x | >= 3x RecBole users/s: NOT met |" in text
  assert "MFU target (>= 50% of the matmul peak): NOT met on all cores" in text
  assert "micro-batches" not in text

  # Micro-batched staged rounds get their own rows and count for the MFU.
  for r in (1, 2):
    _fake(res / f"train_throughput_mb_round{r}.json",
          {"num_microbatches": 4,
           "modes": {"staged_padded": dict(mode, step_time_s=0.8, mfu=0.52)},
           "matmul_peak": {"best_gflops": 50.0}})
  text = open(common.summarize(str(res), str(tmp_path / "RESULTS.md"))).read()
  assert "| staged_padded, 4 micro-batches | 0.800 |" in text
  assert "| staged_padded | 1.000 |" in text
  assert ("MFU target (>= 50% of the matmul peak): met on all cores (best "
          "52.0%, staged_padded, 4 micro-batches).") in text

  # Multi-process rounds: their own rows, a RecBole comparison, the MFU.
  for r in (1, 2):
    _fake(res / f"train_throughput_mp_round{r}.json",
          {"num_processes": 2, "num_microbatches": 4,
           "local_accumulation": True,
           "modes": {"staged_padded": dict(mode, step_time_s=0.6, mfu=0.61,
                                           sequences_per_s=640.0),
                     "pipeline_packed": dict(packed, mfu=0.55)},
           "matmul_peak": {"best_gflops": 50.0}})
  text = open(common.summarize(str(res), str(tmp_path / "RESULTS.md"))).read()
  label = "2 processes (one per core), local accumulation of 4 micro-batches"
  assert f"| staged_padded, {label} | 0.600 |" in text
  assert f"| pipeline_packed, {label} | 1.000 |" in text
  assert (f"| train, padded, pre-staged, {label}: sequences/s | 640 | 200 | "
          "3.20x |") in text
  assert ("MFU target (>= 50% of the matmul peak): met on all cores (best "
          f"61.0%, staged_padded, {label}).") in text
  # The conservative column: GFLOP/s over the highest peak of any run.
  _fake(res / "train_throughput_mp_round2.json",
        {"num_processes": 2, "num_microbatches": 4,
         "local_accumulation": True,
         "modes": {"staged_padded": dict(mode, step_time_s=0.6, mfu=0.61,
                                         sequences_per_s=640.0)},
         "matmul_peak": {"best_gflops": 80.0}})
  text = open(common.summarize(str(res), str(tmp_path / "RESULTS.md"))).read()
  assert f"| staged_padded, {label} | 0.600 |" in text
  assert "| 20.0 | 61.0% | 25.0% |" in text  # 20 GFLOP/s of 80
  assert ("Against the highest peak of any run (80.0 GFLOP/s) the best on "
          "all cores is 25.0%") in text


def test_summarize_head_change_record_and_quality(tmp_path):
  res = tmp_path / "results"
  res.mkdir()
  mode = {"step_time_s": 2.0, "sequences_per_s": 128.0, "users_per_s": 128.0,
          "interactions_per_s": 900.0, "tokens_per_s": 6400.0,
          "gflop_per_step": 20.0, "achieved_gflops": 10.0, "mfu": 0.1}
  # An older round file written with the former --compare_proposed_head.
  old = res / "old_train.json"
  _fake(old, {"modes": {"staged_padded": mode},
              "proposed_head_modes": {"staged_padded": dict(
                  mode, step_time_s=1.0, mfu=0.2,
                  speedup_per_window=[1.9, 2.0, 2.1])},
              "proposed_head_max_abs_diff_padded": 1e-7})
  record = common.head_change_record([str(old), str(res / "missing.json")])
  assert len(record["runs"]) == 1
  assert record["runs"][0]["max_abs_diff_loss_and_grads"] == {"padded": 1e-7}
  (res / common.HEAD_CHANGE_RECORD).write_text(json.dumps(record))
  old.unlink()
  _fake(res / "recbole_quality_sasrec.json",
        {"peer": "RecBole 1.2.1 SASRec", "budget_s": 120.0, "train_s": 121.0,
         "epochs": 0.5, "eval_every_s": 60.0, "target_ndcg@10": 0.04,
         "final_test": {"hit@10": 0.05, "ndcg@10": 0.025},
         "best_test_ndcg@10": 0.025, "time_to_target_train_s": None})
  text = open(common.summarize(str(res), str(tmp_path / "R.md"))).read()
  assert "Record: the output-layer change, before / after" in text
  assert "| staged_padded | 2.000 | 1.000 | 2.00x | 10.0% | 20.0% | 1 |" in text
  _fake(res / "ours_quality_sasrec.json",
        {"system": "recsys_jax", "gin_file": "gin/experiments/x.gin",
         "budget_s": 900.0, "target_ndcg@10": 0.04,
         "points": [{"train_s": 100.0, "step": 250,
                     "test": {"hr@10": 0.06, "ndcg@10": 0.03}},
                    {"train_s": 300.0, "step": 500,
                     "test": {"hr@10": 0.07, "ndcg@10": 0.041}}],
         "final_test": {"hr@10": 0.07, "ndcg@10": 0.041},
         "best_test_ndcg@10": 0.041, "time_to_target_train_s": 240.0,
         "time_to_target_wall_s": 300.0})
  text = open(common.summarize(str(res), str(tmp_path / "R.md"))).read()
  assert "| RecBole 1.2.1 SASRec | 120 | 121 | 0.50 | 0.0500 | 0.0250 |" in text
  assert "not reached" in text
  # Our runs are named by gin file and date (the same file is rerun).
  day = json.loads((res / "ours_quality_sasrec.json").read_text())[
      "machine"]["date_utc"][:10]
  assert (f"| recsys_jax x.gin ({day}) | 900 | 300 | n/a | 0.0700 | 0.0410 | "
          "0.0410 | 4.0 min | 5.0 min |") in text
  # Equal budget: RecBole's 120 training seconds against our step 250.
  assert ("| 120 | RecBole 1.2.1 SASRec: 0.0500 / 0.0250 | recsys_jax x.gin "
          f"({day}) (step 250, 100 s): 0.0600 / 0.0300 |") in text
  # A run stopped at the target, in two processes, says so.
  _fake(res / "ours_quality_sasrec.json",
        {"system": "recsys_jax", "gin_file": "gin/experiments/x.gin",
         "budget_s": 900.0, "target_ndcg@10": 0.04, "num_processes": 2,
         "stop_reason": "target reached",
         "points": [{"train_s": 100.0, "step": 250,
                     "test": {"hr@10": 0.07, "ndcg@10": 0.041}}],
         "final_test": {"hr@10": 0.07, "ndcg@10": 0.041},
         "best_test_ndcg@10": 0.041, "time_to_target_train_s": 100.0,
         "time_to_target_wall_s": 150.0})
  text = open(common.summarize(str(res), str(tmp_path / "R.md"))).read()
  assert (f"| recsys_jax x.gin ({day}), 2 pinned processes, local accumulation"
          " (stopped at the target) | 900 | 100 |") in text
  assert (f"recsys_jax x.gin ({day}), 2 pinned processes, local accumulation "
          "(step 250, 100 s, stopped at the target): 0.0700 / 0.0410 |") in text


def test_time_to_quality_smoke_two_processes(smoke_data, tmp_path,
                                             fast_compile_children):
  """--num_processes=2: pinned processes with local accumulation; process
  0's evaluation lines are read, process 1 logs to the run directory."""
  run_dir = tmp_path / "run"
  # The quick-start model shrunk (1 layer, width 16): what is smoke-tested
  # here is the two-process run and how its output is read.
  res = time_to_quality.main([
      "--smoke", "--data_dir", smoke_data, "--num_processes=2",
      "--gin", "builders.bert4rec.num_layers=1",
      "--gin", "builders.bert4rec.hidden=16",
      "--gin", "builders.bert4rec.mlp_dim=32",
      "--model_dir", str(run_dir), "--output", str(tmp_path / "ttq.json")])
  assert res["num_processes"] == 2 and res["exit_code"] == 0
  assert res["stop_reason"] == "schedule end"
  assert res["train_command"].endswith(
      "--gin.trainer.TrainLoopConfig.local_accumulation=True")
  assert [p["step"] for p in res["points"]] == [10, 20]
  assert all(p["users"] == 120 for p in res["points"])
  assert "local_accumulation = True" in (run_dir / "config.gin").read_text()
  log1 = (run_dir / "process_1.log").read_text()
  assert "Traceback" not in log1


def test_time_to_quality_log_parsing():
  log = time_to_quality.RunLog()
  t0 = log.t0
  lines = [
      (10.0, "step 100/400 | loss 9.1 | masked acc 0.01 | ETA 1m"),
      (12.0, "[eval step 100] validation (full_ranking, 50 users): "
             "HR@10=0.2000 NDCG@10=0.1000 MRR=0.0500"),
      (14.0, "[eval step 100] test (full_ranking, 50 users): "
             "HR@10=0.1000 NDCG@10=0.0300 MRR=0.0200"),
      (15.0, "[eval step 100] test_popularity (full_ranking, 50 users): "
             "HR@10=0.0500 NDCG@10=0.0100 MRR=0.0100"),
      (30.0, "step 200/400 | loss 8.0"),
      (33.0, "[eval step 200] test (full_ranking, 50 users): HR@10=0.2000 "
             "NDCG@10=0.0500 MRR=0.0300"),
      (34.0, "some other line"),
  ]
  points = [log.feed(line, t0 + t) for t, line in lines]
  first, second = points[2], points[5]
  assert [p for p in points if p] == [first, second]
  assert first["step"] == 100 and first["users"] == 50
  assert first["test"] == {"hr@10": 0.1, "ndcg@10": 0.03, "mrr": 0.02}
  assert first["wall_s"] == 14.0 and first["train_s"] == 10.0
  # The step-100 evaluation took 10 -> 15 s; the step-200 one 30 -> 33 s.
  assert second["train_s"] == 33.0 - 5.0 - 3.0
  assert log.eval_s_total == 8.0 and log.last_step == 200
