"""Importers for public checkpoints (Hugging Face layouts) into Flax params."""

from recsys_jax.checkpoint_import.common import CheckpointImportError
from recsys_jax.checkpoint_import.common import assign_params
from recsys_jax.checkpoint_import.common import load_hf_state_dict
