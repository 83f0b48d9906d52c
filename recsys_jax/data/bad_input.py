"""Bad-input policy shared by every reader: a clear error, or a counted skip.

Readers never drop anything silently. Each problem is reported through a
`BadInputPolicy`, which either raises `BadInputError` naming the file, line and
what was expected (policy "error", the default), or counts the skip under a
reason key (policy "skip"). The counts end up in `stats.json`.
"""

import collections
import logging
from typing import Optional

ON_BAD_LINE_CHOICES = ("error", "skip")


class BadInputError(ValueError):
  """Malformed or inconsistent input; the message names file, line, expectation."""

  def __init__(self, path: str, line: Optional[int], message: str):
    self.path = str(path)
    self.line = line
    self.detail = message
    where = f"{self.path}:{line}" if line is not None else self.path
    super().__init__(f"{where}: {message}")


class BadInputPolicy:
  """Raises or counts problems found while reading raw files.

  Attributes:
    mode: "error" raises on the first problem; "skip" counts and continues.
    skipped: reason -> number of skipped records.
  """

  def __init__(self, mode: str = "error", max_logged: int = 10):
    if mode not in ON_BAD_LINE_CHOICES:
      raise ValueError(
          f"--on_bad_line={mode!r}: expected one of {ON_BAD_LINE_CHOICES}")
    self.mode = mode
    self.skipped = collections.Counter()
    self._max_logged = max_logged
    self._logged = 0

  def report(self, reason: str, path: str, line: Optional[int], message: str):
    """Handles one bad record: raises in "error" mode, else counts it."""
    if self.mode == "error":
      raise BadInputError(
          path, line,
          f"{message} (pass --on_bad_line=skip to count and skip such records)")
    self.skipped[reason] += 1
    if self._logged < self._max_logged:
      where = f"{path}:{line}" if line is not None else str(path)
      logging.warning("skipping (%s) %s: %s", reason, where, message)
      self._logged += 1

  def summary(self) -> dict:
    return dict(sorted(self.skipped.items()))
