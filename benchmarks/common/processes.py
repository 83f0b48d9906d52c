"""Processes of one measurement: pinned data-parallel launches and the
strict alternation of timed windows between ours and RecBole."""

import os
import shutil
import socket
import time
from typing import List

# Environment of every process of a multi-process run on this machine.
PROCESS_ENV = {"JAX_PLATFORMS": "cpu", "RECSYS_CPU_COLLECTIVES": "gloo"}


def pinned_commands(cmd: List[str], num_processes: int,
                    add_num_processes: bool = True) -> List[List[str]]:
  """`cmd` as process i of a data-parallel run on loopback, for each i.

  Process i runs under `taskset -c` on its block of this process's cores
  (cores / num_processes each, at least one; as `launch/local.sh
  --pin_cores`), with `--coordinator_address=127.0.0.1:PORT` (a free port)
  and `--process_id=i` (and `--num_processes=N` if `add_num_processes`)
  appended. Run them with `PROCESS_ENV` added to the environment.
  """
  taskset = shutil.which("taskset")
  if not taskset:
    raise SystemExit(f"{num_processes} pinned processes need `taskset` "
                     "(util-linux), which is not on PATH")
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  cores = sorted(os.sched_getaffinity(0))
  per = max(1, len(cores) // num_processes)
  out = []
  for i in range(num_processes):
    first = (i * per) % len(cores)
    pin = ",".join(str(c) for c in cores[first:first + per])
    flags = [f"--coordinator_address=127.0.0.1:{port}", f"--process_id={i}"]
    if add_num_processes:
      flags.append(f"--num_processes={num_processes}")
    out.append([taskset, "-c", pin, *cmd, *flags])
  return out


def add_duel_flags(parser, other: str) -> None:
  """--duel / --duel_windows / --duel_eval_windows, shared by both sides."""
  parser.add_argument("--duel", default=None,
                      help=f"a turn file shared with {other} --duel: "
                      "alternate timed windows with the other side")
  parser.add_argument("--duel_windows", type=int, default=4)
  parser.add_argument("--duel_eval_windows", type=int, default=2)


class Turns:
  """Strict alternation of timed windows between two processes.

  Ours (parity 0) and RecBole (parity 1) share a counter file; a process
  times a window only when `counter % 2 == parity` and then advances it, so
  the other side waits (sleeping) while one measures, and consecutive
  windows of the two sides see nearly the same machine load.
  """

  # The phases both sides walk through, in order; ours does the named mode,
  # RecBole its staged (staged_*), DataLoader (pipeline_*) or eval window.
  PHASES = ("staged_padded", "staged_packed", "pipeline_padded",
            "pipeline_packed", "eval")

  def __init__(self, path: str, parity: int, timeout_s: float = 3600.0):
    self.path, self.parity, self.timeout_s = path, int(parity), timeout_s

  def _read(self) -> int:
    try:
      with open(self.path) as f:
        return int(f.read().strip() or 0)
    except FileNotFoundError:
      return 0

  def wait(self) -> None:
    deadline = time.monotonic() + self.timeout_s
    while self._read() % 2 != self.parity:
      if time.monotonic() > deadline:
        raise TimeoutError(f"{self.path}: the other side did not finish its "
                           f"window within {self.timeout_s:.0f}s")
      time.sleep(0.05)

  def done(self) -> None:
    tmp = f"{self.path}.{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(str(self._read() + 1))
    os.replace(tmp, self.path)
