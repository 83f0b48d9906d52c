"""Multi-host start-up over JAX's own runtime (jax.distributed)."""

import itertools
import os
from typing import Optional

import jax

# Barriers through the coordination service wait this long by default.
BARRIER_TIMEOUT_S = 1800
_barrier_ids = itertools.count()


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               multihost: bool = False,
               platform: Optional[str] = None):
  """Starts jax.distributed when asked to; a no-op for one process.

  Args:
    coordinator_address: host:port of process 0 (GPU/CPU clusters).
    num_processes: total processes; process_id: this one's index.
    multihost: initialise even without explicit flags (TPU pods and SLURM
      clusters let JAX detect everything).
    platform: 'cpu', 'gpu' or 'tpu' to pin JAX's backend.
  """
  if platform:
    jax.config.update("jax_platforms", platform)
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and "
                     "--process_id")
  if not (explicit or multihost):
    return
  cpu = (platform == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu" or
         os.environ.get("RECSYS_CPU_COLLECTIVES"))
  if cpu:
    # Cross-process collectives on CPU go over gloo (loopback or LAN).
    jax.config.update("jax_cpu_collectives_implementation",
                      os.environ.get("RECSYS_CPU_COLLECTIVES", "gloo"))
    _orbax_barriers_without_devices()
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S):
  """Waits until every process gets here; a no-op for one process.

  Goes through the coordination service (no device collective), so hosts may
  arrive minutes apart. Call it after per-host work of uneven length
  (compilation, input start-up) and before the first collective of a new
  device group: gloo gives up when a peer is ~30 s late to set one up.
  Every process must pass the same sequence of names.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:  # initialised by other means: fall back to a collective
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"recsys_jax/{name}/{next(_barrier_ids)}",
                         int(timeout_s * 1000))


def _orbax_barriers_without_devices():
  """Makes orbax synchronise over the coordination service, not gloo.

  Orbax's default barrier is a device collective; on CPU its gloo group would
  be set up inside checkpoint code with the 30 s limit above.
  """
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint  # pylint: disable=g-import-not-at-top,unused-import
    name = "experimental_orbax_use_distributed_barrier"
    if name in flags.FLAGS:
      flags.FLAGS[name].value = True
  except ImportError:
    pass
