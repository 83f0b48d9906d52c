"""`python -m recsys_jax.recommend`: an export answers histories.

Tiny models on the tiny synthetic dataset (150 items), each a checkpoint of
its initial state (untrained: serving does not care, and compiling a
training step would be most of these tests' time) exported with
`runs.export`: a bidirectional Bert4Rec, its causal (SASRec-mode) twin, and
a bidirectional FLARE over caches of a small seeded random encoder. Served
answers are checked against `predict`'s records over the evaluation's own
input pipeline (same top-k items and scores for every test user, histories
longer than the model reads included), and FLARE's critiques against the
critiquing evaluation's batch.
"""

import io
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from recsys_jax import runs
from recsys_jax.core import checkpoints
from recsys_jax.core import optimizer
from recsys_jax.core import partitioning
from recsys_jax.core import trainer
from recsys_jax.data import prepared
from recsys_jax.runs import recommend_run
from recsys_jax.serving import catalogue as catalogue_lib
from recsys_jax.serving import critiques as critiques_lib
from recsys_jax.serving import inference
from recsys_jax.serving import requests as requests_lib
from tests import helpers
from tests.helpers import restore_seqio_registry  # pylint: disable=unused-import

MAX_LEN = 8  # short rows: most tiny histories are longer than the model reads
SIZES = dict(max_len=MAX_LEN, hidden=16, num_layers=1, num_heads=2,
             mlp_dim=32, dropout_rate=0.0, attention_dropout_rate=0.0)
TOP_K = 5
# XLA:CPU options that compile several times faster (the same programs,
# less optimised machine code; as tests/test_flare_e2e.py's flags).
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_cpu_use_fusion_emitters": False}


def _checkpoint_and_export(model, model_dir, config_gin, adjust=None):
  """A checkpoint of the model's initial state (no training step: its
  compilation would be most of these tests' time), the run's config.gin,
  then `runs.export`. `adjust(params) -> params` edits the parameters
  first."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  tx, _ = trainer.make_optimizer(optimizer.OptimizerConfig(), 1)
  rng = jax.random.PRNGKey(0)
  init = jax.jit(lambda r: nn.meta.unbox(
      model.get_initial_variables(r)["params"]))
  params = init.lower(rng).compile(FAST_COMPILE)(rng)
  if adjust is not None:
    params = adjust(params)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))
  ckpt = checkpoints.Checkpointer(str(model_dir), keep=1)
  ckpt.save(1, state, {"step": 1, **model.checkpoint_meta(),
                       "architecture": model.architecture()}, force=True)
  ckpt.close()
  with open(os.path.join(model_dir, "config.gin"), "w") as f:
    f.write(config_gin)
  return runs.export(model_dir=str(model_dir), model=model,
                     mesh_config=partitioning.MeshConfig())


def _bert4rec_config(data_dir, model_dir, causal):
  return (f"DATA_DIR = '{data_dir}'\nMODEL_DIR = '{model_dir}'\n"
          "MODEL/builders.bert4rec.dtype = 'float32'\n"
          f"# causal = {causal}\n")


@pytest.fixture(scope="module")
def data_dir():
  return helpers.prepared_dataset()


@pytest.fixture(scope="module")
def titles(data_dir):
  return [""] + [r["title"] for r in prepared.read_items(data_dir)]


def _bert4rec_export(data_dir, tmp_path_factory, causal):
  from recsys_jax.model_lib import builders  # pylint: disable=g-import-not-at-top
  model = builders.bert4rec(data_dir=data_dir, causal=causal, **SIZES)
  model_dir = tmp_path_factory.mktemp("causal" if causal else "bidir")
  return _checkpoint_and_export(model, model_dir,
                           _bert4rec_config(data_dir, model_dir, causal))


@pytest.fixture(scope="module")
def bert4rec_export(data_dir, tmp_path_factory):
  """The bidirectional export (most tests)."""
  return _bert4rec_export(data_dir, tmp_path_factory, causal=False)


@pytest.fixture(scope="module")
def sasrec_export(data_dir, tmp_path_factory):
  return _bert4rec_export(data_dir, tmp_path_factory, causal=True)


@pytest.fixture(scope="module")
def loaded(bert4rec_export):
  return recommend_run.load_export(bert4rec_export)


@pytest.fixture(scope="module")
def recommender(loaded):
  return recommend_run.Recommender(loaded, FAST_COMPILE)


@pytest.fixture(scope="module")
def eval_test_batches(data_dir):
  """The evaluation pipeline's test batches (rows of MAX_LEN)."""
  from recsys_jax.input_pipeline import sequence_data  # pylint: disable=g-import-not-at-top
  data = sequence_data.SequenceData("recommend_test", data_dir,
                                    max_len=MAX_LEN)
  return list(data.eval_batches("test", 256))


def _predict_records(loaded, batches):
  """`predict`'s records (unexcluded top-k) of the export's parameters."""
  from recsys_jax.runs import predict_run  # pylint: disable=g-import-not-at-top
  mesh = partitioning.make_mesh(1, jax.devices()[:1])
  rules = partitioning.get_rules("data_parallel")
  params, _ = runs.restore.restore_params(loaded.model, None, mesh, rules,
                                          exported_dir=loaded.export_dir)
  return list(predict_run.ranking_records(
      loaded.model, params, iter(batches), titles=[""] * (
          loaded.model.num_items + 1), top_k=TOP_K, exclude_history=False,
      mesh=mesh, rules=rules))


@pytest.mark.parametrize("export", ["bert4rec_export", "sasrec_export"])
def test_answers_equal_predict_over_the_evaluation_pipeline(
    export, data_dir, eval_test_batches, request):
  loaded = recommend_run.load_export(request.getfixturevalue(export))
  model = loaded.model
  assert model.causal == (export == "sasrec_export")
  assert loaded.description == ("SASRec-mode Bert4Rec (causal)"
                                if model.causal else "Bert4Rec (bidirectional)")
  records = _predict_records(loaded, eval_test_batches)
  users = list(prepared.PreparedDataset(data_dir).iter_sequences())
  assert len(records) == len(users) == 200
  rec = recommend_run.Recommender(loaded, FAST_COMPILE)
  truncated = 0
  for record, user in zip(records, users):
    history = [int(i) for i in user[prepared.ITEM_IDS][:-1]]
    truncated += len(history) > MAX_LEN - 1
    answer = rec.recommend(history, top_k=TOP_K, include_history=True)
    assert [r["id"] for r in answer["recommendations"]] == record["top_k"]
    np.testing.assert_allclose([r["score"] for r in answer["recommendations"]],
                               record["scores"], rtol=1e-5, atol=1e-5)
    assert bool(answer["notes"]) == (len(history) > MAX_LEN - 1)
  assert truncated > 50  # the last L - 1 items, as the evaluation reads


def test_inference_row_is_the_evaluation_row():
  row, pos = inference.inference_row([5, 6, 7, 8, 9], max_len=4, mask_id=11)
  assert row.tolist() == [[7, 8, 9, 11]] and pos == 3
  row, pos = inference.inference_row([5], max_len=4, mask_id=11)
  assert row.tolist() == [[5, 11, 0, 0]] and pos == 1


def test_history_is_excluded_unless_asked(loaded, recommender, titles):
  rec = recommender
  history = [3, 17, 42, 99]
  n = loaded.model.num_items
  everything = rec.recommend(history, top_k=n, include_history=True)
  excluded = rec.recommend(history, top_k=30)
  ids = [r["id"] for r in everything["recommendations"]]
  assert sorted(ids) == list(range(1, n + 1))
  assert [r["id"] for r in excluded["recommendations"]] == [
      i for i in ids if i not in history][:30]
  assert excluded["recommendations"][0]["title"] == titles[
      excluded["recommendations"][0]["id"]]
  # Asking for every item leaves N - 4 once the history is out.
  rest = rec.recommend(history, top_k=n)
  assert len(rest["recommendations"]) == n - len(history)
  assert "only 146 items are left" in rest["notes"][0]


def test_titles_resolve_exact_contained_fuzzy_and_mixed_with_ids(
    loaded, recommender, titles):
  cat = loaded.catalogue
  assert cat.resolve(titles[7].upper()) == (7, titles[7].upper(), "exact")
  assert cat.resolve(" 12 ").item_id == 12
  assert cat.resolve("#13") == (13, "#13", "id")
  typo = titles[21][:-2] + titles[21][-1:]  # one character dropped
  assert cat.resolve(typo) == (21, typo, "fuzzy")
  # A title's words but its first (the brand), found inside that title only.
  parts = {i: " ".join(t.split()[1:]).lower() for i, t in enumerate(titles)}
  item = next(i for i in range(1, len(titles)) if sum(
      parts[i] in t.lower() for t in titles) == 1)
  assert cat.resolve(parts[item]) == (item, parts[item], "contains")
  brand, *rest = titles[item].split()
  assert cat.resolve(f"{brand} {rest[-2]}").how in ("contains", "fuzzy")
  answer = recommender.recommend(
      [4, "#5", titles[6].lower(), typo], top_k=3)
  assert [(h["id"], h["match"]) for h in answer["history"]] == [
      (4, "id"), (5, "id"), (6, "exact"), (21, "fuzzy")]
  assert not {4, 5, 6, 21} & {r["id"] for r in answer["recommendations"]}


def test_unknown_and_ambiguous_titles_name_the_candidates(loaded, titles):
  cat = loaded.catalogue
  with pytest.raises(catalogue_lib.ResolveError,
                     match=r"'zzzz qqqq': no item has this title or one"):
    cat.resolve("zzzz qqqq")
  with pytest.raises(catalogue_lib.ResolveError, match=r"outside 1\.\.150"):
    cat.resolve("151")
  with pytest.raises(catalogue_lib.ResolveError, match="closest: 8 "):
    cat.resolve(titles[8][:len(titles[8]) * 3 // 4] + " XYZXYZ")
  twins = catalogue_lib.Catalogue(["", "Blue Mug", "blue  mug", "Red Mug"], 3)
  with pytest.raises(catalogue_lib.ResolveError,
                     match=r"title of 2 items: 1 'Blue Mug', 2 'blue  mug'"):
    twins.resolve("BLUE MUG")
  with pytest.raises(catalogue_lib.ResolveError, match=r"part of 3 titles"):
    twins.resolve("mug")
  assert twins.resolve("red").item_id == 3
  no_titles = catalogue_lib.Catalogue(None, 3, "no dataset here")
  with pytest.raises(catalogue_lib.ResolveError, match="no dataset here"):
    no_titles.resolve("Red Mug")


def test_request_lines():
  assert requests_lib.parse_line("  \n") is None
  assert requests_lib.parse_line("a; 2 ;#3;").history == ["a", "2", "#3"]
  req = requests_lib.parse_line(
      '{"history": ["a", 2], "critique": "c", "top_k": 3}')
  assert (req.history, req.critique, req.top_k) == (["a", 2], "c", 3)
  assert requests_lib.parse_line('{"history": "a; b"}').history == ["a", "b"]
  for line, message in (('{"history": [1.5]}', "must be a list"),
                        ('{"histroy": [1]}', "unknown keys"),
                        ('{"history": [1], "top_k": "5"}', "integer"),
                        ('{"history": [1', "invalid JSON")):
    with pytest.raises(requests_lib.RequestError, match=message):
      requests_lib.parse_line(line)


def test_one_shot_errors_and_critique_refused(loaded, recommender,
                                              bert4rec_export):
  rec = recommender
  what = loaded.description
  with pytest.raises(critiques_lib.CritiqueError, match=re.escape(
      f"critique refused: the export in {bert4rec_export} holds a {what} "
      "model, which has no critique input")):
    rec.recommend([1, 2], critique="cheaper")
  with pytest.raises(ValueError, match="empty history"):
    rec.recommend([])
  for history in ("", "1;;2", "no such title at all"):
    out, err = io.StringIO(), io.StringIO()
    assert recommend_run.recommend(export_dir=bert4rec_export,
                                   history=history, stdout=out,
                                   stderr=err) == 1
    errors = [l for l in err.getvalue().splitlines()
              if l.startswith("error:")]
    assert len(errors) == 1 and not out.getvalue(), err.getvalue()
  out, err = io.StringIO(), io.StringIO()
  assert recommend_run.recommend(export_dir=bert4rec_export, history="1; 2",
                                 top_k=3, output_format="json", stdout=out,
                                 stderr=err) == 0
  answer = json.loads(out.getvalue())
  assert [h["id"] for h in answer["history"]] == [1, 2]
  assert len(answer["recommendations"]) == 3


def test_export_without_titles_reads_the_dataset_or_serves_ids(
    bert4rec_export, tmp_path, titles):
  old = str(tmp_path / "old_export")
  shutil.copytree(bert4rec_export, old)
  os.remove(os.path.join(old, catalogue_lib.TITLES_FILE))
  loaded = recommend_run.load_export(old)
  assert "has no item_titles.json" in loaded.notes[0]
  assert loaded.catalogue.resolve(titles[9]).item_id == 9
  with open(os.path.join(old, "config.gin"), "w") as f:
    f.write("MODEL_DIR = 'elsewhere'\n")
  loaded = recommend_run.load_export(old)
  assert loaded.catalogue.resolve("9").item_id == 9
  with pytest.raises(catalogue_lib.ResolveError,
                     match="config.gin names no DATA_DIR"):
    loaded.catalogue.resolve(titles[9])


def test_cli_session_goes_on_after_bad_lines_without_tensorflow(
    bert4rec_export, titles):
  lines = [
      "1; 2; 3",
      "a title nobody wrote; 2",
      json.dumps({"history": [titles[5], 6], "top_k": 3}),
      "",
      '{"history": []}',
      '{"history": [1',
      "#7",
  ]
  env = helpers.subprocess_env(extra={
      "PYTHONPROFILEIMPORTTIME": "1",
      "XLA_FLAGS": ("--xla_backend_optimization_level=0 "
                    "--xla_cpu_use_fusion_emitters=false")})
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [helpers.PYTHON, "-m", "recsys_jax.recommend",
       f"--export_dir={bert4rec_export}", "--format=json", "--top_k=4"],
      input="\n".join(lines) + "\n", capture_output=True, text=True,
      env=env, cwd=helpers.REPO_ROOT, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  answers = [json.loads(l) for l in proc.stdout.splitlines()]
  assert [a.get("line") for a in answers] == [None, 2, None, 5, 6, None]
  assert [len(a["recommendations"]) for a in answers if "error" not in a
          ] == [4, 3, 4]
  assert "a title nobody wrote" in answers[1]["error"]
  assert "empty history" in answers[3]["error"]
  stderr = [l for l in proc.stderr.splitlines()
            if not l.startswith("import time:")]
  assert [l.split(":")[0] for l in stderr if l.startswith("error")] == [
      "error"] * 3, stderr
  assert "Loaded " in "\n".join(stderr)
  imported = {l.rsplit("|", 1)[-1].strip() for l in proc.stderr.splitlines()
              if l.startswith("import time:")}
  assert not {"tensorflow", "seqio"} & imported


# -- FLARE ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_random_encoder():
  """`embed_items` draws the random encoder's weights eagerly, seconds a
  time; the two caches and the critique input here draw the same one, so
  it is drawn once (its fingerprint is still checked against the cache's)."""
  from recsys_jax import embed_items  # pylint: disable=g-import-not-at-top
  drawn = {}
  draw = embed_items.random_bert_encoder

  def once(vocab, random_encoder=None):
    key = (vocab.vocab_size, vocab.pad_id, json.dumps(
        embed_items.resolve_random_encoder(random_encoder), sort_keys=True))
    if key not in drawn:
      drawn[key] = draw(vocab, random_encoder)
    return drawn[key]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(embed_items, "random_bert_encoder", once)
    yield


@pytest.fixture(scope="module")
def flare_export(data_dir, tmp_path_factory, one_random_encoder):
  del one_random_encoder
  return _flare_export(data_dir, tmp_path_factory.mktemp("flare"))


def _flare_export(data_dir, root):
  """A FLARE export over caches of a small random encoder, its text gate
  open (tanh(1)) so that text and critiques move the scores."""
  from recsys_jax import embed_items  # pylint: disable=g-import-not-at-top
  from recsys_jax.model_lib import builders  # pylint: disable=g-import-not-at-top
  caches = {}
  for texts in ("items", "critiques"):
    caches[texts] = str(root / texts)
    embed_items.build_cache(
        data_dir, "bert_random", None, None, caches[texts], texts=texts,
        max_text_len=8, dtype="float32", log=lambda _: None,
        random_encoder={"hidden_size": 16, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "intermediate_size": 32,
                        "max_position_embeddings": 16})
  fields = dict(SIZES, perceiver_mlp_dim=16, num_latents=2,
                max_distinct_items=None)
  model = builders.flare(data_dir=data_dir, item_text_cache=caches["items"],
                         critique_text_cache=caches["critiques"], **fields)
  config = ["from __gin__ import dynamic_registration",
            "from recsys_jax.model_lib import builders",
            f"DATA_DIR = '{data_dir}'", "MODEL = @builders.flare()",
            "MODEL/builders.flare.data_dir = %DATA_DIR",
            f"MODEL/builders.flare.item_text_cache = '{caches['items']}'",
            "MODEL/builders.flare.critique_text_cache = "
            f"'{caches['critiques']}'"]
  config += [f"MODEL/builders.flare.{k} = {v!r}" for k, v in fields.items()]
  run_dir = root / "run"
  run_dir.mkdir()
  return _checkpoint_and_export(
      model, run_dir, "\n".join(config) + "\n",
      adjust=lambda p: dict(p, text_gate=np.ones_like(p["text_gate"])))


def test_flare_critiques_known_normalised_and_encoded(flare_export,
                                                      one_random_encoder):
  del one_random_encoder
  from recsys_jax.evaluation import critiquing  # pylint: disable=g-import-not-at-top
  loaded = recommend_run.load_export(flare_export)
  assert loaded.description == "FLARE on a bidirectional backbone"
  crit = loaded.critiques
  assert crit is not None, loaded.no_critique
  rec = recommend_run.Recommender(loaded, FAST_COMPILE)
  history = [3, 17, 42]
  text = crit.texts[4]
  answer = rec.recommend(history, critique=text, top_k=TOP_K,
                         include_history=True)
  assert answer["critique"] == {"text": text, "how": "table", "id": 5}
  # Another critique whose (8-token) encoding differs from critique 5's.
  other_id = next(c for c in range(1, crit.free_id)
                  if np.abs(crit.tokens[c] - crit.tokens[5]).max() > 0)
  # The critiquing evaluation's batch of this history and critique gives
  # the same answer (the scorer is the model's score_fn either way).
  row, pos = inference.inference_row(history, MAX_LEN, loaded.model.mask_id)
  rows = critiquing.CritiquingRows(
      item_ids=row, targets=np.zeros_like(row), exclude_ids=row,
      valid=np.array([True]), mask_pos=np.array([pos]),
      category_critique=np.array([5]), data_critique=np.array([0]),
      removed=np.array([0]), skipped=np.array([False]))
  batch = critiquing.critiqued_batch(rows, np.array([5]))
  scores, items = rec._top_k(  # pylint: disable=protected-access
      loaded.params, {k: batch[k] for k in (
          "item_ids", critiquing.INPUT_CRITIQUE_IDS)},
      inference.exclude_row([]), TOP_K, crit.tables())
  assert [r["id"] for r in answer["recommendations"]] == items.tolist()
  np.testing.assert_allclose([r["score"] for r in answer["recommendations"]],
                             scores, rtol=1e-5, atol=1e-5)
  other = rec.recommend(history, critique=crit.texts[other_id - 1],
                        top_k=TOP_K,
                        include_history=True)
  assert _scores(other) != _scores(answer)  # the critique is read
  assert rec.recommend(history, critique=text.upper(), top_k=TOP_K,
                       include_history=True)["critique"]["how"] == (
                           "normalised")
  # A new text is encoded by the rebuilt encoder: a text of the table
  # encodes to its cached row, so the encoder is the cache's.
  crit._encode(text)  # pylint: disable=protected-access
  np.testing.assert_allclose(crit.tokens[crit.free_id], crit.tokens[5],
                             atol=1e-5)
  np.testing.assert_array_equal(crit.mask[crit.free_id], crit.mask[5])
  new = rec.recommend(history, critique="something else entirely, please",
                      top_k=TOP_K, include_history=True)
  assert new["critique"]["how"] == "encoded"
  assert _scores(new) not in (_scores(answer), _scores(other))


def _scores(answer):
  return [(r["id"], r["score"]) for r in answer["recommendations"]]
