"""Runs sweep points as local subprocesses, N at a time, each on its own cores.

Each of the N slots owns a disjoint block of the cores this process may use
(`os.sched_getaffinity`, split like `launch/local.sh --pin_cores`): its runs
start under `taskset -c <block>` with OMP / TensorFlow thread counts set to
the block's size (XLA's CPU thread pool already follows the affinity), and,
with `gpus_per_slot`, `CUDA_VISIBLE_DEVICES` set to its own GPUs.

Every run starts in its own session with its output appended to the point's
train.log. SIGINT, SIGTERM or SIGHUP to the sweep sends SIGTERM to every
running point's process group -- the trainer saves a checkpoint at the next
step and exits, so a rerun resumes there -- and SIGKILL after `grace_s` or at
a second signal. Runs also get SIGTERM if the sweep itself is killed
(Linux's parent-death signal).
"""

import collections
import ctypes
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from recsys_jax.sweeps import run_dir

TRAIN_MODULE = "recsys_jax.train"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SlotError(ValueError):
  """--parallel / --gpus_per_point that this machine cannot serve."""


class LaunchError(OSError):
  """A run that could not be started (its program is missing, ...)."""


class Interrupted(Exception):
  """The sweep got a stop signal; its running points were stopped."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


# -- slots ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one run at a time executes: its cores and GPUs (None: all)."""
  cores: Optional[Tuple[int, ...]] = None
  gpus: Optional[Tuple[str, ...]] = None

  def prefix(self) -> List[str]:
    if self.cores is None:
      return []
    return ["taskset", "-c", ",".join(map(str, self.cores))]

  def env(self) -> Dict[str, str]:
    env = {}
    if self.cores is not None:
      n = str(len(self.cores))
      env.update(OMP_NUM_THREADS=n, TF_NUM_INTRAOP_THREADS=n,
                 TF_NUM_INTEROP_THREADS=n)
    if self.gpus is not None:
      env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
    return env

  def describe(self) -> str:
    parts = []
    if self.cores is not None:
      parts.append(f"cores {','.join(map(str, self.cores))}")
    if self.gpus is not None:
      parts.append(f"GPUs {','.join(self.gpus)}")
    return ", ".join(parts) or "all cores"


def visible_gpus(env: Optional[Dict[str, str]] = None) -> List[str]:
  """CUDA_VISIBLE_DEVICES when set, else the indices `nvidia-smi -L` lists."""
  env = os.environ if env is None else env
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [d for d in visible.split(",") if d.strip()]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                         timeout=30, check=False).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(
      l for l in out.splitlines() if l.startswith("GPU "))]


def make_slots(parallel: int, pin_cores: bool = True, gpus_per_slot: int = 0,
               cores: Optional[Sequence[int]] = None,
               gpus: Optional[Sequence[str]] = None) -> List[Slot]:
  """`parallel` slots over disjoint cores (and GPUs), as even as they split.

  Args:
    parallel: number of runs at a time.
    pin_cores: pin slots to cores (only when parallel > 1: one run may use
      every core).
    gpus_per_slot: GPUs per slot (0: leave CUDA_VISIBLE_DEVICES alone).
    cores: the cores to split (default: this process's affinity).
    gpus: the GPUs to split (default: `visible_gpus()`).

  Raises:
    SlotError: more slots than cores or GPUs, or no taskset to pin with.
  """
  if parallel < 1:
    raise SlotError(f"--parallel={parallel}: expected an integer >= 1")
  core_blocks: List[Optional[Tuple[int, ...]]] = [None] * parallel
  if pin_cores and parallel > 1:
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if parallel > len(cores):
      raise SlotError(
          f"--parallel={parallel} needs as many cores, but this process may "
          f"use {len(cores)} ({','.join(map(str, cores))}); lower --parallel "
          "or pass --nopin_cores to share them")
    if shutil.which("taskset") is None:
      raise SlotError("pinning --parallel runs to cores needs taskset "
                      "(util-linux), which is not on PATH; install it or "
                      "pass --nopin_cores")
    # Blocks differ by at most one core; the first ones get the extra.
    base, extra = divmod(len(cores), parallel)
    start = 0
    for i in range(parallel):
      size = base + (i < extra)
      core_blocks[i] = tuple(cores[start:start + size])
      start += size
  gpu_blocks: List[Optional[Tuple[str, ...]]] = [None] * parallel
  if gpus_per_slot:
    gpus = visible_gpus() if gpus is None else list(gpus)
    need = gpus_per_slot * parallel
    if need > len(gpus):
      raise SlotError(
          f"--gpus_per_point={gpus_per_slot} x --parallel={parallel} needs "
          f"{need} GPUs; {len(gpus)} visible ({','.join(gpus) or 'none'})")
    gpu_blocks = [tuple(gpus[i * gpus_per_slot:(i + 1) * gpus_per_slot])
                  for i in range(parallel)]
  return [Slot(c, g) for c, g in zip(core_blocks, gpu_blocks)]


# -- commands ------------------------------------------------------------------


def train_command(python: str, train_args: Sequence[str],
                  slot: Slot) -> List[str]:
  """argv of one point's training in `slot`."""
  return slot.prefix() + [python, "-m", TRAIN_MODULE] + list(train_args)


_SAFE_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_DOUBLE_QUOTE_SPECIAL = re.compile(r"[$`\\\"!]")


def quote(word: str) -> str:
  """One shell word, as launch/common.sh's launch_quote writes it.

  Bare when safe; in double quotes when it holds single quotes but nothing
  double quotes would expand (gin strings: "--gin.MODEL_DIR='runs/x'"); else
  single-quoted (shlex.quote).
  """
  if _SAFE_WORD.fullmatch(word):
    return word
  if "'" in word and not _DOUBLE_QUOTE_SPECIAL.search(word):
    return f'"{word}"'
  return shlex.quote(word)


def shell_line(argv: Sequence[str], env: Dict[str, str],
               log: Optional[str] = None) -> str:
  """A copy-pasteable POSIX shell line: `A=1 argv... >> log 2>&1`."""
  words = [f"{k}={quote(v)}" for k, v in env.items()]
  words += [quote(a) for a in argv]
  if log:
    words += [">>", quote(log), "2>&1"]
  return " ".join(words)


# -- running -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  """One point to run: its directory, train arguments and final step."""
  name: str
  model_dir: str
  train_args: Tuple[str, ...]
  train_steps: int


@dataclasses.dataclass
class Outcome:
  name: str
  state: str  # finished, failed
  returncode: Optional[int]
  seconds: float


_libc = None


def _die_with_parent():
  """In the child: SIGTERM when the sweep dies (prctl PR_SET_PDEATHSIG)."""
  if _libc is not None:
    _libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)


def _load_libc():
  global _libc
  if _libc is None and sys.platform.startswith("linux"):
    try:
      _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
      _libc = None


@dataclasses.dataclass
class _Running:
  job: Job
  proc: subprocess.Popen
  log: object
  start: float


class LocalRunner:
  """Runs jobs on slots; see the module docstring for signals."""

  def __init__(self, slots: Sequence[Slot], python: str,
               base_env: Dict[str, str], grace_s: float = 60.0,
               out: Callable[[str], None] = print, poll_s: float = 0.1,
               on_start: Optional[Callable[[Job, List[str], Dict[str, str]],
                                           None]] = None,
               describe: Optional[Callable[[Job], str]] = None):
    """Args:
      slots: where runs execute (their number is the parallelism).
      python: the interpreter that runs `-m recsys_jax.train`.
      base_env: the environment of every run (before the slot's additions).
      grace_s: seconds between SIGTERM and SIGKILL when stopping runs.
      out: where progress lines go.
      poll_s: polling period.
      on_start: called with (job, argv, slot env) as each run starts.
      describe: a job's one-line result, printed when it finishes.
    """
    self._slots = list(slots)
    self._python = python
    self._base_env = dict(base_env)
    self._grace_s = grace_s
    self._out = out
    self._poll_s = poll_s
    self._on_start = on_start
    self._describe = describe
    self._signals: List[int] = []

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    self._signals.append(signum)

  def _start(self, job: Job, slot: Slot, index: str) -> _Running:
    argv = train_command(self._python, job.train_args, slot)
    env = {**self._base_env, **slot.env()}
    os.makedirs(job.model_dir, exist_ok=True)
    if self._on_start is not None:
      self._on_start(job, argv, slot.env())
    stale = run_dir.set_aside_evals_after_resume_point(job.model_dir)
    log = open(os.path.join(job.model_dir, run_dir.LOG_FILE), "a")
    log.write(f"\n=== sweep: start {time.strftime('%Y-%m-%dT%H:%M:%S')} "
              f"({slot.describe()})\n=== {shell_line(argv, slot.env())}\n")
    if stale:
      log.write(f"=== evaluations of steps {stale} (after the newest "
                "checkpoint) moved to eval/superseded/\n")
    log.flush()
    _load_libc()
    try:
      proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env,
                              start_new_session=True,
                              preexec_fn=_die_with_parent)
    except OSError as e:
      log.close()
      raise LaunchError(f"cannot start {job.name}: {argv[0]}: "
                        f"{e.strerror or e}") from e
    run_dir.write_status(job.model_dir, "running", pid=proc.pid,
                         slot=slot.describe())
    self._out(f"{index} start {job.name} ({slot.describe()}; log "
              f"{os.path.join(job.model_dir, run_dir.LOG_FILE)})")
    return _Running(job, proc, log, time.time())

  def _finish(self, r: _Running, rc: int, index: str) -> Outcome:
    r.log.close()
    seconds = time.time() - r.start
    job = r.job
    if rc == 0 and run_dir.is_finished(job.model_dir, job.train_steps):
      run_dir.mark_done(job.model_dir, job.train_steps, seconds)
      run_dir.write_status(job.model_dir, "finished", returncode=0,
                           seconds=round(seconds, 1))
      summary = f": {self._describe(job)}" if self._describe else ""
      self._out(f"{index} finished {job.name} in {seconds:.1f}s{summary}")
      return Outcome(job.name, "finished", rc, seconds)
    why = (f"exit status {rc}" if rc else
           f"exited 0 without an evaluation and checkpoint at step "
           f"{job.train_steps} (stopped by SIGTERM?)")
    run_dir.write_status(job.model_dir, "failed", returncode=rc,
                         seconds=round(seconds, 1), why=why)
    tail = run_dir.log_tail(job.model_dir).rstrip()
    self._out(f"{index} FAILED {job.name} after {seconds:.1f}s: {why}; last "
              f"lines of {os.path.join(job.model_dir, run_dir.LOG_FILE)}:\n"
              + "\n".join("    " + l for l in tail.splitlines()))
    return Outcome(job.name, "failed", rc, seconds)

  def _stop(self, running: Dict[int, _Running]):
    """SIGTERM to every run's group; SIGKILL after grace_s or a 2nd signal."""
    names = ", ".join(r.job.name for r in running.values())
    self._out(f"stopping {len(running)} running point(s) ({names}): SIGTERM, "
              f"SIGKILL in {self._grace_s:g}s or at another Ctrl-C")
    seen = len(self._signals)
    for r in running.values():
      _signal_group(r.proc, signal.SIGTERM)
    deadline = time.time() + self._grace_s
    while any(r.proc.poll() is None for r in running.values()):
      if time.time() > deadline or len(self._signals) > seen:
        for r in running.values():
          _signal_group(r.proc, signal.SIGKILL)
        for r in running.values():
          r.proc.wait()
        break
      time.sleep(self._poll_s)
    for r in running.values():
      # The group may hold grandchildren: they go with the run.
      _signal_group(r.proc, signal.SIGKILL)
      if r.proc.returncode == 0 and run_dir.is_finished(
          r.job.model_dir, r.job.train_steps):  # it ended as the signal came
        self._finish(r, 0, "[stopping]")
        continue
      r.log.close()
      run_dir.write_status(r.job.model_dir, "interrupted",
                           returncode=r.proc.returncode,
                           seconds=round(time.time() - r.start, 1))

  def run(self, jobs: Sequence[Job]) -> List[Outcome]:
    """Runs every job; returns their outcomes in completion order.

    Raises:
      Interrupted: a stop signal came; running points were stopped first.
    """
    pending = collections.deque(jobs)
    total = len(pending)
    running: Dict[int, _Running] = {}
    free = list(range(len(self._slots)))
    outcomes: List[Outcome] = []
    started = 0
    previous = {}
    try:
      for s in _STOP_SIGNALS:
        previous[s] = signal.signal(s, self._on_signal)
    except ValueError:  # not the main thread: the caller handles signals
      pass
    try:
      while (pending or running) and not self._signals:
        while pending and free and not self._signals:
          slot = free.pop(0)
          started += 1
          running[slot] = self._start(pending.popleft(), self._slots[slot],
                                      f"[{started}/{total}]")
        for slot, r in list(running.items()):
          rc = r.proc.poll()
          if rc is not None:
            del running[slot]
            outcomes.append(self._finish(
                r, rc, f"[{len(outcomes) + 1}/{total} done]"))
            free.append(slot)
            free.sort()
        if pending or running:
          time.sleep(self._poll_s)
    finally:
      if running:
        self._stop(running)
      for s, h in previous.items():
        signal.signal(s, h)
    if self._signals:
      raise Interrupted(self._signals[0])
    return outcomes


def _signal_group(proc: subprocess.Popen, signum: int):
  try:
    os.killpg(proc.pid, signum)
  except (ProcessLookupError, PermissionError):
    pass
