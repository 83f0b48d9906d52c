"""Shared test helpers: one tiny prepared dataset, entry points in subprocesses.

Fixtures here are imported by the test modules that use them; the dataset and
the reference training run are cached per process, so a pytest session makes
each once however many modules ask for it.

Every test process (pytest's own, set up by conftest.py, and the subprocesses,
`subprocess_env`) compiles with the same fast-compile XLA flags and shares one
persistent XLA compilation cache for the whole session.
"""

import atexit
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# Sizes every CLI test shares: a ~10k-parameter Bert4Rec on 150 items.
TINY_MODEL_FLAGS = (
    "--gin_file=gin/quickstart.gin",
    "--gin.MAX_LEN=20",
    "--gin.MAX_PREDICTIONS=10",  # quickstart.gin's 24 is for length-50 rows
    "--gin.builders.bert4rec.hidden=16",
    "--gin.builders.bert4rec.mlp_dim=32",
    # The CLI tests exercise the bidirectional cloze model (quickstart.gin
    # trains the causal mode; test_gin_files builds that config on real batches).
    "--gin.builders.bert4rec.causal=False",
    "--gin.builders.bert4rec.positions_from_end=True",
    "--gin.builders.bert4rec.output_transform=True",
    "--gin.input_pipeline.SequenceData.last_item_mask_prob=0.2",
)
# Only train and eval include runs/evaluation.gin (export does not).
EVAL_FLAGS = ("--gin.evaluation.EvalConfig.batch_size=64",)

# The reference run: enough checkpoints that a killed run can resume from one
# that is neither the first nor the last. Constant learning rate so that a few
# steps visibly move the parameters (checkpoints of different steps differ).
REF_STEPS = 40
REF_CHECKPOINT_EVERY = 4
REF_KEEP = 3
REF_BATCH_SIZE = 16

_PROGRESS = re.compile(r"^step (\d+)/(\d+) \| ", re.M)


# The programs under test are tiny: compiling them, not running them, is most
# of the suite's time. LLVM's optimisation passes only make the generated host
# code faster, and XLA:CPU's older (non-MLIR) fusion emitters compile the same
# programs faster again: a tiny training run takes ~30% less CPU, an in-process
# test file of jitted models up to 3x less. Results may differ from the default
# compiler's in the last float bits (tests compare with tolerances, or runs
# compiled alike). RECSYS_JAX_TEST_XLA_DEFAULTS=1 runs the tests with XLA's
# default (production) compiler settings instead.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0",
                          "--xla_cpu_use_fusion_emitters=false")
_XLA_DEFAULTS_ENV = "RECSYS_JAX_TEST_XLA_DEFAULTS"
# Set by the first pytest process (the pytest-xdist controller, before it
# starts its workers): every process of the session shares the directory.
_SHARED_TMP_ENV = "RECSYS_JAX_TEST_SHARED_TMP"


def _tmp_root() -> str:
  root = tempfile.mkdtemp(prefix="recsys_jax_tests_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  return root


@functools.lru_cache(maxsize=None)
def _session_tmp() -> str:
  return _tmp_root()


def shared_tmp() -> str:
  """A temporary directory of the whole test session: made by the first
  pytest process (removed when it exits), inherited by the pytest-xdist
  workers it starts and by every subprocess."""
  path = os.environ.get(_SHARED_TMP_ENV)
  if not path or not os.path.isdir(path):
    path = _tmp_root()
    os.environ[_SHARED_TMP_ENV] = path
  return path


def xla_flags(devices: Optional[int] = None, base: str = "") -> str:
  """XLA_FLAGS of a test process: `base`, the fast-compile flags (unless
  RECSYS_JAX_TEST_XLA_DEFAULTS=1) and `devices` emulated CPU devices."""
  flags = base.split()
  if os.environ.get(_XLA_DEFAULTS_ENV, "") in ("", "0"):
    flags += [f for f in FAST_COMPILE_XLA_FLAGS if f not in flags]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def compilation_cache_env() -> Dict[str, str]:
  """JAX's persistent compilation cache, one for all processes of the
  session: identical programs (the many short runs of the same tiny model,
  the same jitted function in several tests) compile once, and every
  process loads the same executable, so results are unchanged."""
  return {"JAX_COMPILATION_CACHE_DIR": os.path.join(shared_tmp(),
                                                     "xla_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@functools.lru_cache(maxsize=None)
def prepared_dataset() -> str:
  """A tiny synthetic prepared dataset (200 users, 150 items), made once."""
  from recsys_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  out = os.path.join(_session_tmp(), "tiny_synthetic")
  synthetic.generate(out, **synthetic.TINY)
  return out


@pytest.fixture(scope="session")
def tiny_data() -> str:
  return prepared_dataset()


@pytest.fixture(autouse=True)
def restore_seqio_registry():
  """The SeqIO task registry is process-global: restored after each test.

  Autouse in every test module that imports it (`from tests.helpers import
  restore_seqio_registry`).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  registry = dict(seqio.TaskRegistry._REGISTRY)  # pylint: disable=protected-access
  yield
  seqio.TaskRegistry._REGISTRY.clear()  # pylint: disable=protected-access
  seqio.TaskRegistry._REGISTRY.update(registry)  # pylint: disable=protected-access


def subprocess_env(xla_devices: Optional[int] = None,
                   extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
  """The caller's environment with the repo importable and JAX on CPU.

  XLA_FLAGS: the caller's are dropped; the fast-compile flags and
  `xla_devices` emulated devices. `extra` is applied last."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["JAX_PLATFORMS"] = "cpu"
  env.update(compilation_cache_env())
  env["XLA_FLAGS"] = xla_flags(xla_devices)
  env.update(extra or {})
  return env


@dataclasses.dataclass
class Result:
  rc: int
  stdout: str
  stderr: str

  def check(self) -> "Result":
    assert self.rc == 0, (f"exit {self.rc}\n--- stdout\n{self.stdout[-4000:]}"
                          f"\n--- stderr\n{self.stderr[-6000:]}")
    return self


def run_entry(module: str, args: Sequence[str], *, cwd: str = REPO_ROOT,
              env: Optional[Dict[str, str]] = None,
              timeout: float = 900) -> Result:
  """Runs `python -m <module> args...` to completion."""
  proc = subprocess.run([PYTHON, "-m", module, *args], cwd=cwd,
                        env=env or subprocess_env(), capture_output=True,
                        text=True, timeout=timeout)
  return Result(proc.returncode, proc.stdout, proc.stderr)


def run_script(code: str, args: Sequence[str] = (), *, cwd: str = REPO_ROOT,
               env: Optional[Dict[str, str]] = None,
               timeout: float = 900) -> Result:
  """Runs `python -c code args...` to completion."""
  proc = subprocess.run([PYTHON, "-c", code, *args], cwd=cwd,
                        env=env or subprocess_env(), capture_output=True,
                        text=True, timeout=timeout)
  return Result(proc.returncode, proc.stdout, proc.stderr)


class Background:
  """`python -m module args` in the background, output in files to poll."""

  def __init__(self, module: str, args: Sequence[str], log_dir: str, *,
               cwd: str = REPO_ROOT, env: Optional[Dict[str, str]] = None):
    os.makedirs(log_dir, exist_ok=True)
    self._out_path = os.path.join(log_dir, "stdout.txt")
    self._err_path = os.path.join(log_dir, "stderr.txt")
    self._out = open(self._out_path, "w")
    self._err = open(self._err_path, "w")
    self.proc = subprocess.Popen([PYTHON, "-m", module, *args], cwd=cwd,
                                 env=env or subprocess_env(),
                                 stdout=self._out, stderr=self._err)

  def stdout(self) -> str:
    with open(self._out_path) as f:
      return f.read()

  def stderr(self) -> str:
    with open(self._err_path) as f:
      return f.read()

  def wait_for(self, predicate, what: str, timeout: float = 600,
               poll: float = 0.02):
    """Polls `predicate()` until true; fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      if predicate():
        return
      if self.proc.poll() is not None:
        if predicate():
          return
        pytest.fail(f"process exited ({self.proc.returncode}) before {what}"
                    f"\n--- stdout\n{self.stdout()[-3000:]}\n--- stderr\n"
                    f"{self.stderr()[-5000:]}")
      time.sleep(poll)
    self.kill()
    pytest.fail(f"timed out waiting for {what}\n--- stdout\n"
                f"{self.stdout()[-3000:]}")

  def wait(self, timeout: float = 600) -> Result:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise
    self._out.close()
    self._err.close()
    return Result(rc, self.stdout(), self.stderr())

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def train_flags(data_dir: str, model_dir: str, *, steps: int = REF_STEPS,
                checkpoint_every: int = REF_CHECKPOINT_EVERY,
                keep: int = REF_KEEP, batch_size: int = REF_BATCH_SIZE,
                log_every: int = 1, extra: Sequence[str] = ()) -> List[str]:
  """Flags of a tiny `recsys_jax.train` run."""
  return list(TINY_MODEL_FLAGS + EVAL_FLAGS) + [
      f"--gin.DATA_DIR='{data_dir}'",
      f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={steps}",
      f"--gin.BATCH_SIZE={batch_size}",
      f"--gin.trainer.TrainLoopConfig.log_every={log_every}",
      f"--gin.trainer.TrainLoopConfig.checkpoint_every={checkpoint_every}",
      f"--gin.trainer.TrainLoopConfig.keep_checkpoints={keep}",
      "--gin.trainer.OptimizerConfig.warmup_steps=0",
      "--gin.trainer.OptimizerConfig.decay='constant'",
  ] + list(extra)


def model_flags(data_dir: str, model_dir: str, extra: Sequence[str] = (), *,
                evaluation: bool = True) -> List[str]:
  """Flags of `recsys_jax.eval` (or export: evaluation=False), tiny model."""
  flags = TINY_MODEL_FLAGS + (EVAL_FLAGS if evaluation else ())
  return list(flags) + [f"--gin.DATA_DIR='{data_dir}'",
                        f"--gin.MODEL_DIR='{model_dir}'"] + list(extra)


@dataclasses.dataclass
class ReferenceRun:
  model_dir: str
  result: Result


@functools.lru_cache(maxsize=None)
def reference_run() -> ReferenceRun:
  """The uninterrupted tiny training run (REF_STEPS steps), made once."""
  model_dir = os.path.join(_session_tmp(), "reference_run")
  res = run_entry("recsys_jax.train",
                  train_flags(prepared_dataset(), model_dir)).check()
  return ReferenceRun(model_dir, res)


@pytest.fixture(scope="session")
def reference() -> ReferenceRun:
  return reference_run()


# -- reading run directories -------------------------------------------------


def checkpoint_steps(model_dir: str) -> List[int]:
  """Steps of the finalised `checkpoint_<step>` directories."""
  if not os.path.isdir(model_dir):
    return []
  return sorted(int(m.group(1)) for m in
                (re.fullmatch(r"checkpoint_(\d+)", n)
                 for n in os.listdir(model_dir)) if m)


def checkpoint_meta(model_dir: str, step: int) -> dict:
  with open(os.path.join(model_dir, f"checkpoint_{step}", "meta",
                         "metadata")) as f:
    return json.load(f)


def restore_state(model_dir: str, step: int) -> dict:
  """The saved TrainState of a checkpoint as a nested dict of numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(model_dir), f"checkpoint_{step}",
                      "state")
  with warnings.catch_warnings():
    # "Sharding info not provided": fine, tests restore on the saving host.
    warnings.simplefilter("ignore", UserWarning)
    tree = ocp.PyTreeCheckpointer().restore(path)
  return jax.tree.map(np.asarray, tree)


def flat(tree) -> Dict[str, np.ndarray]:
  """{'/a/b/c': array} for a nested dict / pytree of arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def assert_trees_equal(a, b, what: str = ""):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys(), f"{what}: different leaves"
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=f"{what}{k}")


def progress_steps(stdout: str) -> List[int]:
  return [int(m.group(1)) for m in _PROGRESS.finditer(stdout)]


def random_flare_tables(vocab: int, num_items: int, text_len: int, dim: int,
                        num_critiques: int, critique_len: int):
  """Random FLARE text tables (no cache): masked item tokens, item 3
  without text, critique 2 with one padded token, random categories."""
  from recsys_jax.model_lib import flare  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  mask = rng.random((vocab, text_len)) < 0.7
  mask[:, 0] = True
  mask[0] = False
  mask[num_items + 1:] = False
  mask[3] = False  # an item without text
  crit_mask = np.ones((num_critiques + 1, critique_len), bool)
  crit_mask[0] = False
  crit_mask[2, 2] = False
  category = np.zeros(vocab, np.int32)
  category[1:num_items + 1] = rng.integers(1, num_critiques + 1, num_items)
  return flare.FlareTextTables(
      item_tokens=(rng.normal(size=(vocab, text_len, dim)) * mask[..., None]
                   ).astype(np.float32),
      item_mask=mask,
      critique_tokens=rng.normal(size=(num_critiques + 1, critique_len, dim)
                                 ).astype(np.float32),
      critique_mask=crit_mask, item_category=category)


def reconstruct_spans(inputs, targets, vocab_size: int,
                      extra_ids: int) -> List[int]:
  """Original tokens from span-corrupted inputs and targets (no EOS): each
  sentinel of `inputs` (the top `extra_ids` ids) replaced by the tokens that
  follow it in `targets`."""
  first = vocab_size - extra_ids
  spans, cur = {}, None
  for t in targets:
    if t >= first:
      cur = int(t)
      spans[cur] = []
    else:
      spans[cur].append(int(t))
  out = []
  for t in inputs:
    out.extend(spans[int(t)] if t >= first else [int(t)])
  return out


def write_item_text_cache(path: str, pooled: np.ndarray,
                          texts: Optional[Sequence[str]] = None) -> None:
  """A tiny item-text cache at `path`: `pooled` [N, D] vectors, 2-token
  all-ones encodings, one chunk; `texts` default 'item <i>'."""
  from recsys_jax.text import item_text_cache  # pylint: disable=g-import-not-at-top
  n, d = pooled.shape
  if texts is None:
    texts = [f"item {i}" for i in range(n)]
  writer = item_text_cache.CacheWriter(path, {
      "encoder": "test", "checkpoint_fingerprint": "none", "vocab": "none",
      "texts_kind": item_text_cache.ITEMS, "num_items": n,
      "max_text_len": 2, "d_model": d, "dtype": "float32",
      "pooling": "mean", "store_tokens": False, "chunk_size": n},
                                       texts=texts)
  writer.write_chunk(0, {"mask": np.ones((n, 2), bool),
                         "token_ids": np.ones((n, 2), np.int32),
                         "pooled": pooled})


def save_random_t5(data_dir: str, out_dir: str):
  """A tiny random T5 (d_model 16, 1 + 1 layers) saved as a params-only
  checkpoint (`params/`), the form an imported T5 takes: the LM that ILM's
  phase 2 and LANCER freeze. (Training one first,
  gin/experiments/synthetic_ilm_lm.gin, is the README's path; here it would
  only cost time.)"""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from recsys_jax.model_lib import builders  # pylint: disable=g-import-not-at-top
  model = builders.t5(data_dir=data_dir, d_model=16, num_heads=2, d_kv=8,
                      d_ff=32, num_encoder_layers=1, num_decoder_layers=1)
  params = nn.meta.unbox(
      model.get_initial_variables(jax.random.PRNGKey(1))["params"])
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, "params"), params, force=True)
  ckptr.wait_until_finished()


# builders.t5 sizes of `save_random_t5`'s LM (d_model is the experiment's
# D_MODEL macro where it has one).
TINY_T5_FLAGS = ["--gin.builders.t5.num_heads=2", "--gin.builders.t5.d_kv=8",
                 "--gin.builders.t5.d_ff=32",
                 "--gin.builders.t5.num_encoder_layers=1",
                 "--gin.builders.t5.num_decoder_layers=1"]


def source_params(path: str) -> Dict[str, np.ndarray]:
  """A run's (or params-only checkpoint's) parameters, '/'-joined names ->
  arrays, as `init_from` reads them."""
  from recsys_jax.core import init_from  # pylint: disable=g-import-not-at-top
  return init_from.load_source(init_from.InitFrom(path=path))[1]
