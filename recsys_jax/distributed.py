"""Multi-host start-up over JAX's own runtime (jax.distributed)."""

import os
from typing import Optional

import jax


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
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
