"""Registered SeqIO tasks; importing this package registers them."""

from tasks import sequence_tasks  # pylint: disable=unused-import
