"""Tests for launch/*.sh: dry-run commands, quoting, SLURM defaults, errors.

Nothing here trains: dry runs only print, and the few real runs use a fake
python (a bash script) that records its arguments, sleeps or fails on cue.
"""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
LOCAL = os.path.join(LAUNCH, "local.sh")
TPU = os.path.join(LAUNCH, "tpu_pod.sh")
GPU = os.path.join(LAUNCH, "gpu_multinode.sh")
SCRIPTS = [LOCAL, TPU, GPU]

# Argument values that break naive quoting; each must reach python unchanged.
TRICKY = [
    "--gin.MODEL_DIR='runs/with space/it'\"'\"'s'",
    "--gin.MODEL_DIR='gs-free/local/dir'",
    "--gin.NAME=\"a $HOME `b` \\\\ !c\"",
    "--gin.EMPTY=''",
    "",
    "--gin.LIST=[1, 2, 'x']",
]


def _env(**extra):
  """A clean environment: no SLURM/XLA leaking in from the caller."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k != "XLA_FLAGS"}
  env.update(extra)
  return env


def _run(script, *args, env=None, timeout=30):
  return subprocess.run(["bash", script, *args], capture_output=True,
                        text=True, env=env or _env(), timeout=timeout)


def _lines(proc):
  assert proc.returncode == 0, proc.stderr
  return [l for l in proc.stdout.splitlines() if l.strip()]


def _write_exe(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return str(path)


def _argv_dumper(tmp_path):
  """A fake python that appends its argv (JSON) and selected env to a file."""
  out = tmp_path / "calls.jsonl"
  dumper = _write_exe(tmp_path / "fakepy.py", (
      f"#!{sys.executable}\n"
      "import json, os, sys\n"
      f"with open({str(out)!r}, 'a') as f:\n"
      "  env = {k: os.environ.get(k) for k in ('JAX_PLATFORMS', 'XLA_FLAGS',\n"
      "         'RECSYS_CPU_COLLECTIVES', 'CUDA_VISIBLE_DEVICES')}\n"
      "  f.write(json.dumps({'argv': sys.argv[1:], 'env': env,\n"
      "                      'cwd': os.getcwd()}) + '\\n')\n"
      "sys.exit(int(os.environ.get('FAKE_EXIT_' + sys.argv[2].split('.')[-1],"
      " '0')))\n"))
  return dumper, out


def _calls(out):
  with open(out) as f:
    return [json.loads(l) for l in f]


def _copy_launch(tmp_path):
  """A throwaway repo with the launch scripts, for data/ and runs/ state."""
  repo = tmp_path / "repo"
  shutil.copytree(LAUNCH, repo / "launch")
  return repo


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_have_help(script):
  assert subprocess.run(["bash", "-n", script]).returncode == 0
  proc = _run(script, "--help")
  assert proc.returncode == 0
  assert proc.stdout.startswith("Usage: launch/" + os.path.basename(script))
  assert "--dry_run" in proc.stdout


@pytest.mark.parametrize("script,base", [
    (LOCAL, []),
    (TPU, ["--tpu=t", "--zone=z"]),
    (GPU, ["--coordinator=h:1", "--num_nodes=2", "--node_rank=0"]),
])
def test_unknown_option_and_bare_value_are_named(script, base):
  proc = _run(script, "--dry_run", *base, "--bogus_flag=1")
  assert proc.returncode != 0
  assert "unknown option '--bogus_flag=1'" in proc.stderr
  assert proc.stdout == ""
  proc = _run(script, "--dry_run", *base, "stray")
  assert proc.returncode != 0 and "'stray'" in proc.stderr
  proc = _run(script, "--dry_run", *base, "--python")
  assert proc.returncode != 0
  assert "--python needs a value" in proc.stderr


def test_local_train_dry_run_quotes_survive(tmp_path):
  lines = _lines(_run(LOCAL, "--dry_run", "--python=/opt/py", "--",
                      "--gin_file=gin/a.gin", *TRICKY))
  assert shlex.split(lines[0]) == ["cd", REPO]
  assert len(lines) == 2
  words = shlex.split(lines[1])
  assert words == ["/opt/py", "-m", "recsys_jax.train", "--gin_file=gin/a.gin",
                   *TRICKY]
  # The printed line also works in a real shell, not only with shlex.
  dumper, out = _argv_dumper(tmp_path)
  line = _lines(_run(LOCAL, "--dry_run", f"--python={dumper}", "--",
                     *TRICKY))[1]
  subprocess.run(["bash", "-c", line], check=True, env=_env())
  assert _calls(out)[0]["argv"] == ["-m", "recsys_jax.train", *TRICKY]


def test_local_default_python_is_project_venv():
  lines = _lines(_run(LOCAL, "--dry_run", "--mode=eval", "--",
                      "--gin.MODEL_DIR='r'", "--gin.CHECKPOINT_STEP=5"))
  assert lines[1] == "source scripts/env.sh"
  assert shlex.split(lines[2]) == ["python", "-m", "recsys_jax.eval",
                                   "--gin.MODEL_DIR='r'",
                                   "--gin.CHECKPOINT_STEP=5"]


def test_local_predict_mode_runs_the_predict_entry_point():
  lines = _lines(_run(LOCAL, "--dry_run", "--python=py", "--mode=predict",
                      "--", "--gin_file=gin/quickstart.gin",
                      "--gin.MODEL_DIR='runs/quickstart'"))
  assert shlex.split(lines[-1]) == ["py", "-m", "recsys_jax.predict",
                                    "--gin_file=gin/quickstart.gin",
                                    "--gin.MODEL_DIR='runs/quickstart'"]


def test_local_devices_sets_emulation_env():
  env = _env(XLA_FLAGS="--xla_dump_to=/tmp/x")
  lines = _lines(_run(LOCAL, "--dry_run", "--python=py", "--devices=8",
                      "--mode=export", "--", "--gin.EXPORT_DIR='o'",
                      env=env))
  words = shlex.split(lines[-1])
  assert words == [
      "JAX_PLATFORMS=cpu",
      "XLA_FLAGS=--xla_dump_to=/tmp/x "
      "--xla_force_host_platform_device_count=8",
      "py", "-m", "recsys_jax.export", "--gin.EXPORT_DIR='o'"]


def test_local_num_processes_dry_run():
  lines = _lines(_run(LOCAL, "--dry_run", "--python=py", "--num_processes=3",
                      "--devices=2", "--port=4321", "--",
                      "--gin.MODEL_DIR='runs/mp x'"))
  cmds = [shlex.split(l) for l in lines[1:]]
  assert len(cmds) == 3
  ids = []
  for words in cmds:
    assert words[:3] == ["JAX_PLATFORMS=cpu",
                         "XLA_FLAGS=--xla_force_host_platform_device_count=2",
                         "RECSYS_CPU_COLLECTIVES=gloo"]
    assert words[3:6] == ["py", "-m", "recsys_jax.train"]
    assert "--coordinator_address=127.0.0.1:4321" in words
    assert "--num_processes=3" in words
    assert words[-1] == "--gin.MODEL_DIR='runs/mp x'"
    ids += [w.split("=")[1] for w in words if w.startswith("--process_id=")]
  assert ids == ["0", "1", "2"]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="no taskset")
def test_local_pin_cores_gives_each_process_its_cores():
  cores = sorted(os.sched_getaffinity(0))

  def pins(allowed, n):
    proc = subprocess.run(
        ["taskset", "-c", ",".join(map(str, allowed)), "bash", LOCAL,
         "--dry_run", "--python=py", f"--num_processes={n}", "--pin_cores"],
        capture_output=True, text=True, env=_env(), timeout=30)
    out = []
    for words in (shlex.split(l) for l in _lines(proc)[1:]):
      at = words.index("taskset")
      assert words[at + 1] == "-c" and words[at + 3:at + 6] == [
          "py", "-m", "recsys_jax.train"], words
      out.append(words[at + 2])
    return out

  one = cores[0]
  # More processes than cores: they share them, in turn.
  assert pins([one], 2) == [str(one), str(one)]
  if len(cores) >= 2:
    a, b = cores[:2]
    assert pins([a, b], 2) == [str(a), str(b)]
    assert pins([a, b], 1) == [f"{a},{b}"]  # one process: all its cores
  # Without --num_processes, --pin_cores is an error.
  proc = _run(LOCAL, "--dry_run", "--python=py", "--pin_cores")
  assert proc.returncode == 2 and "--pin_cores needs --num_processes" in (
      proc.stderr)


@pytest.mark.parametrize("args,message", [
    (["--num_processes=2", "--mode=eval"], "--num_processes needs --mode=train"),
    (["--num_processes=0"], "--num_processes must be an integer >= 1"),
    (["--devices=two"], "--devices must be an integer"),
    (["--mode=serve"], "--mode must be one of"),
    (["--num_processes=2", "--", "--process_id=1"], "--process_id=1"),
])
def test_local_bad_values(args, message):
  proc = _run(LOCAL, "--dry_run", "--python=py", *args)
  assert proc.returncode == 2
  assert message in proc.stderr


def test_local_quickstart_dry_run_skips_prepared_data(tmp_path):
  repo = _copy_launch(tmp_path)
  script = str(repo / "launch" / "local.sh")
  lines = _lines(_run(script, "--dry_run", "--python=py", "--mode=quickstart",
                      "--", "--gin.TRAIN_STEPS=3"))
  cmds = [shlex.split(l) for l in lines]
  assert cmds[0] == ["cd", str(repo)]
  gin = ["--gin_file=gin/quickstart.gin", "--gin.MODEL_DIR='runs/quickstart'"]
  assert cmds[1:] == [
      ["py", "-m", "recsys_jax.data.prepare", "--format=synthetic",
       "--output_dir=data/synthetic"],
      ["py", "-m", "recsys_jax.train", *gin, "--gin.TRAIN_STEPS=3"],
      ["py", "-m", "recsys_jax.eval", *gin, "--gin.TRAIN_STEPS=3"],
      ["py", "-m", "recsys_jax.export", *gin, "--gin.TRAIN_STEPS=3"],
  ]
  (repo / "data" / "synthetic").mkdir(parents=True)
  (repo / "data" / "synthetic" / "stats.json").write_text("{}")
  proc = _run(script, "--dry_run", "--python=py", "--mode=quickstart")
  modules = [shlex.split(l)[2] for l in _lines(proc)[1:]]
  assert modules == ["recsys_jax.train", "recsys_jax.eval",
                     "recsys_jax.export"]
  assert "skipping prepare" in proc.stderr


def test_local_quickstart_runs_steps_in_order_and_stops_on_failure(tmp_path):
  repo = _copy_launch(tmp_path)
  script = str(repo / "launch" / "local.sh")
  dumper, out = _argv_dumper(tmp_path)
  proc = _run(script, f"--python={dumper}", "--mode=quickstart")
  assert proc.returncode == 0, proc.stderr
  calls = _calls(out)
  assert [c["argv"][1] for c in calls] == [
      "recsys_jax.data.prepare", "recsys_jax.train", "recsys_jax.eval",
      "recsys_jax.export"]
  assert {c["cwd"] for c in calls} == {str(repo)}
  os.remove(out)
  proc = _run(script, f"--python={dumper}", "--mode=quickstart",
              env=_env(FAKE_EXIT_train="7"))
  assert proc.returncode == 7
  # data/synthetic has no stats.json (the fake wrote none): prepare reruns,
  # then the failed train stops the sequence.
  assert [c["argv"][1] for c in _calls(out)] == [
      "recsys_jax.data.prepare", "recsys_jax.train"]


def _fake_worker(tmp_path):
  """A fake python for --num_processes: records pid/argv, fails on cue."""
  return _write_exe(tmp_path / "fakeworker.sh", (
      "#!/usr/bin/env bash\n"
      "for a; do case $a in --process_id=*) id=${a#*=};; esac; done\n"
      "echo \"argv: $*\"\n"
      "echo \"env: $JAX_PLATFORMS $RECSYS_CPU_COLLECTIVES\"\n"
      "echo $$ > \"$PID_DIR/$id.pid\"\n"
      "if [[ \"$id\" == \"${FAIL_ID:-}\" ]]; then sleep 1; echo boom; exit 3;"
      " fi\n"
      "exec sleep \"${SLEEP_S:-0}\"\n"))


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie not yet reaped by its (now gone) parent counts as dead.
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_local_num_processes_runs_all_and_logs_each(tmp_path):
  fake = _fake_worker(tmp_path)
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  model_dir = tmp_path / "model dir"
  proc = _run(LOCAL, f"--python={fake}", "--num_processes=3", "--port=5555",
              "--", f"--gin.MODEL_DIR='{model_dir}'",
              env=_env(PID_DIR=str(pid_dir), SLEEP_S="0.3"))
  assert proc.returncode == 0, proc.stderr
  assert "all 3 processes finished" in proc.stderr
  for i in range(3):
    log = (model_dir / f"process_{i}.log").read_text()
    assert f"--process_id={i}" in log
    assert "--coordinator_address=127.0.0.1:5555 --num_processes=3" in log
    assert "env: cpu gloo" in log


def test_local_num_processes_failure_stops_the_rest(tmp_path):
  fake = _fake_worker(tmp_path)
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  log_dir = tmp_path / "logs"
  start = time.monotonic()
  proc = _run(LOCAL, f"--python={fake}", "--num_processes=3",
              f"--log_dir={log_dir}",
              env=_env(PID_DIR=str(pid_dir), SLEEP_S="60", FAIL_ID="1"))
  elapsed = time.monotonic() - start
  assert proc.returncode == 3
  assert elapsed < 20
  assert "process 1 exited with status 3" in proc.stderr
  assert "boom" in proc.stderr  # tail of the failing log
  assert (log_dir / "process_1.log").exists()
  for i in (0, 2):
    pid = int((pid_dir / f"{i}.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not _alive(pid), f"process {i} (pid {pid}) was not stopped"


def _remote_words(command_word):
  """Splits gcloud's --command=... into (cd target, train argv)."""
  assert command_word.startswith("--command=")
  remote = command_word[len("--command="):]
  cd_part, run_part = remote.split(" && ", 1)
  return shlex.split(cd_part), shlex.split(run_part)


def test_tpu_pod_dry_run_quotes_nested_command():
  lines = _lines(_run(TPU, "--dry_run", "--tpu=pod-1", "--zone=us-central2-b",
                      "--project=proj", "--", "--gin_file=gin/a.gin", *TRICKY))
  assert len(lines) == 1
  words = shlex.split(lines[0])
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
  assert "--zone=us-central2-b" in words
  assert "--project=proj" in words
  assert "--worker=all" in words
  cd, train = _remote_words(words[-1])
  assert cd == ["cd", "~/recsys_jax"]
  assert train == ["python3", "-m", "recsys_jax.train", "--multihost",
                   "--gin_file=gin/a.gin", *TRICKY]


def test_tpu_pod_setup_and_custom_repo_dir():
  lines = _lines(_run(TPU, "--dry_run", "--tpu=t", "--zone=z", "--setup",
                      "--repo_dir=/opt/my repo", "--python=/v/bin/python",
                      "--", "--gin.MODEL_DIR='/mnt/runs/a'"))
  assert len(lines) == 2
  setup_words, train_words = shlex.split(lines[0]), shlex.split(lines[1])
  assert "--project" not in lines[0]
  for words in (setup_words, train_words):
    assert "--worker=all" in words
  cd, install = _remote_words(setup_words[-1])
  assert cd == ["cd", "/opt/my repo"]
  with open(os.path.join(REPO, "requirements.txt")) as f:
    jax_pin = [l.split("==")[1].split()[0] for l in f
               if l.startswith("jax==")]
  want_jax = "jax[tpu]" + (f"=={jax_pin[0]}" if jax_pin else "")
  assert install == ["/v/bin/python", "-m", "pip", "install", "-r",
                     "requirements.txt", want_jax]
  cd, train = _remote_words(train_words[-1])
  assert cd == ["cd", "/opt/my repo"]
  assert train[-1] == "--gin.MODEL_DIR='/mnt/runs/a'"


@pytest.mark.parametrize("args,flag", [
    (["--zone=z"], "--tpu"),
    (["--tpu=t"], "--zone"),
    (["--tpu=t", "--zone=z", "--", "--process_id=0"], "--process_id=0"),
])
def test_tpu_pod_missing_flags(args, flag):
  proc = _run(TPU, "--dry_run", *args)
  assert proc.returncode == 2
  assert flag in proc.stderr and proc.stdout == ""


def test_gpu_multinode_explicit_flags():
  lines = _lines(_run(GPU, "--dry_run", "--python=py",
                      "--coordinator=10.1.2.3:9999", "--num_nodes=4",
                      "--node_rank=3", "--gpus_per_node=8", "--", *TRICKY))
  assert shlex.split(lines[0]) == ["cd", REPO]
  words = shlex.split(lines[-1])
  assert words == [
      "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7", "py", "-m", "recsys_jax.train",
      "--platform=gpu", "--coordinator_address=10.1.2.3:9999",
      "--num_processes=4", "--process_id=3", *TRICKY]


def test_gpu_multinode_slurm_env_with_scontrol(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # Fake scontrol: expands only what this test hands it.
  _write_exe(bin_dir / "scontrol", (
      "#!/usr/bin/env bash\n"
      "[[ \"$1 $2 $3\" == 'show hostnames gpu[07-08]' ]] || exit 1\n"
      "printf 'gpu07\\ngpu08\\n'\n"))
  env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2",
             SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[07-08]",
             SLURM_JOB_ID="123456")
  words = shlex.split(_lines(_run(GPU, "--dry_run", "--python=py", "--",
                                  "--gin.MODEL_DIR='/s/r'", env=env))[-1])
  port = 20000 + 123456 % 20000
  assert words == ["py", "-m", "recsys_jax.train", "--platform=gpu",
                   f"--coordinator_address=gpu07:{port}",
                   "--num_processes=2", "--process_id=1",
                   "--gin.MODEL_DIR='/s/r'"]
  # Flags win over SLURM variables.
  words = shlex.split(_lines(_run(GPU, "--dry_run", "--python=py",
                                  "--node_rank=0", "--port=7000",
                                  env=env))[-1])
  assert "--process_id=0" in words
  assert "--coordinator_address=gpu07:7000" in words


def test_gpu_multinode_slurm_plain_nodelist_without_scontrol(tmp_path):
  path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                         if not os.path.exists(os.path.join(p, "scontrol")))
  env = _env(PATH=path, SLURM_NNODES="2", SLURM_NODEID="0",
             SLURM_JOB_NODELIST="nodea,nodeb")
  words = shlex.split(_lines(_run(GPU, "--dry_run", "--python=py",
                                  env=env))[-1])
  assert "--coordinator_address=nodea:8476" in words
  assert "--process_id=0" in words and "--num_processes=2" in words
  env["SLURM_JOB_NODELIST"] = "node[1-2]"
  proc = _run(GPU, "--dry_run", "--python=py", env=env)
  assert proc.returncode == 2 and "--coordinator=HOST:PORT" in proc.stderr


@pytest.mark.parametrize("args,extra_env,flag", [
    (["--num_nodes=2", "--node_rank=0"], {}, "missing --coordinator"),
    (["--coordinator=h:1", "--node_rank=0"], {}, "missing --num_nodes"),
    (["--coordinator=h:1", "--num_nodes=2"], {}, "missing --node_rank"),
    (["--coordinator=h:1", "--num_nodes=2", "--node_rank=2"], {},
     "--node_rank=2 must be < --num_nodes=2"),
    (["--coordinator=h", "--num_nodes=2", "--node_rank=0"], {},
     "--coordinator must be HOST:PORT"),
    (["--coordinator=h:1", "--num_nodes=2", "--node_rank=0",
      "--gpus_per_node=0"], {}, "--gpus_per_node must be an integer >= 1"),
    (["--coordinator=h:1"], {"SLURM_NNODES": "2", "SLURM_NODEID": "0",
                             "SLURM_STEP_NUM_TASKS": "16",
                             "SLURM_STEP_NUM_NODES": "2"},
     "one task per node"),
])
def test_gpu_multinode_errors(args, extra_env, flag):
  proc = _run(GPU, "--dry_run", "--python=py", *args, env=_env(**extra_env))
  assert proc.returncode == 2
  assert flag in proc.stderr and proc.stdout == ""


def test_local_num_processes_sigterm_stops_children(tmp_path):
  fake = _fake_worker(tmp_path)
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  proc = subprocess.Popen(
      ["bash", LOCAL, f"--python={fake}", "--num_processes=2",
       f"--log_dir={tmp_path / 'logs'}"],
      env=_env(PID_DIR=str(pid_dir), SLEEP_S="60"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE)
  deadline = time.monotonic() + 15
  while (sum(os.path.getsize(pid_dir / n) > 0 for n in os.listdir(pid_dir))
         < 2 and time.monotonic() < deadline):
    time.sleep(0.05)
  pids = [int((pid_dir / f"{i}.pid").read_text()) for i in range(2)]
  proc.terminate()
  assert proc.wait(timeout=15) == 143
  deadline = time.monotonic() + 5
  while any(map(_alive, pids)) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(map(_alive, pids))


_FAKE_TRAIN = """
import os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
import jax
jax.config.update("jax_cpu_collectives_implementation",
                  os.environ["RECSYS_CPU_COLLECTIVES"])
jax.distributed.initialize(coordinator_address=args["coordinator_address"],
                           num_processes=int(args["num_processes"]),
                           process_id=int(args["process_id"]))
import jax.numpy as jnp
from jax.experimental import multihost_utils
got = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
print("RESULT", jax.process_index(), jax.process_count(),
      jax.local_device_count(), jax.device_count(), got.ravel().tolist(),
      flush=True)
"""


def test_local_num_processes_forms_a_real_jax_cluster(tmp_path):
  """The launcher's flags and env are enough for jax.distributed over gloo."""
  pytest.importorskip("jax")
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  repo = _copy_launch(tmp_path)
  # A stand-in train module in the throwaway repo: joins the cluster and
  # all-gathers the process ids (no model, no data).
  (repo / "recsys_jax").mkdir()
  (repo / "recsys_jax" / "__init__.py").write_text("")
  (repo / "recsys_jax" / "train.py").write_text(_FAKE_TRAIN)
  logs = tmp_path / "logs"
  proc = _run(str(repo / "launch" / "local.sh"), f"--python={sys.executable}",
              "--num_processes=2", "--devices=2", f"--port={port}",
              f"--log_dir={logs}", timeout=120)
  assert proc.returncode == 0, proc.stderr
  for i in range(2):
    result = [l for l in (logs / f"process_{i}.log").read_text().splitlines()
              if l.startswith("RESULT")]
    assert result == [f"RESULT {i} 2 2 4 [0, 1]"]
