"""Finds missing and truncated data files of an orbax (OCDBT) checkpoint.

Orbax writes each item of a checkpoint (e.g. `checkpoint_40/state/`) as an
OCDBT key-value database: `manifest.ocdbt` points to a b-tree whose nodes
and large values live at byte ranges of files under `d/` (and, for
multi-process saves, `ocdbt.process_<i>/d/`). Walking the b-tree (small
nodes, no array data) tells which file each array needs and how many bytes
of it, so a damaged checkpoint is named by file, not by a tensorstore
traceback, before any array is read. Corrupted bytes inside a file of the
right length are not detected here (orbax stores no checksums); reading
them fails in tensorstore, or not at all.
"""

import os
import re
from typing import Dict, List, Optional, Tuple

# 'btreenode:<prefix>:<file>:<offset>:<length>' or 'value:...' (same fields):
# the file is <database>/<prefix><file>.
_REF = re.compile(r"^(?:value|btreenode):([^:]*):(.+):(\d+):(\d+)$")
_NODE_LABEL = "a b-tree node"


def _short(e: BaseException) -> str:
  return " ".join(str(e).split())[:200]


class _Needs:
  """Bytes each referenced file must hold, and which arrays need them."""

  def __init__(self, directory: str):
    self.directory = directory
    self.end: Dict[str, int] = {}
    self.arrays: Dict[str, List[str]] = {}

  def add(self, ref: str, array: str) -> Optional[str]:
    m = _REF.match(ref)
    if not m:
      return None
    path = os.path.join(self.directory, m.group(1), m.group(2))
    end = int(m.group(3)) + int(m.group(4))
    self.end[path] = max(self.end.get(path, 0), end)
    names = self.arrays.setdefault(path, [])
    if array not in names:
      names.append(array)
    return path

  def problem(self, path: str) -> Optional[str]:
    """What is wrong with `path`, if it cannot hold what is needed of it."""
    try:
      size = os.path.getsize(path)
    except OSError:
      size = None
    if size is not None and size >= self.end[path]:
      return None
    names = self.arrays[path]
    shown = ", ".join(names[:3]) + (
        f" and {len(names) - 3} more" if len(names) > 3 else "")
    if size is None:
      return f"{path} is missing (needed by {shown})"
    return (f"{path} is truncated to {size} bytes ({shown} need"
            f"{'s' if len(names) == 1 else ''} {self.end[path]})")


def _walk(directory: str, keys: str) -> Tuple[_Needs, List[str], set]:
  """Walks the b-tree of the OCDBT database at `directory`.

  Returns:
    (what each referenced file must hold, problems met while walking, the
    files those problems name).
  """
  needs = _Needs(directory)
  problems: List[str] = []
  named = set()
  manifest_path = os.path.join(directory, "manifest.ocdbt")
  if not os.path.exists(manifest_path):
    return needs, problems, named
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  try:
    base = ts.KvStore.open(f"file://{directory}/").result()
    manifest = ts.ocdbt.dump(base).result()
  except Exception as e:  # pylint: disable=broad-except
    return needs, [f"{manifest_path} is unreadable ({_short(e)})"], named
  versions = manifest.get("versions") or []
  root = versions[-1].get("root", {}).get("location") if versions else None

  def array_name(key: bytes) -> str:
    return key.decode("utf-8", "replace").rsplit("/", 1)[0]

  def walk(location: str, prefix: bytes):
    path = needs.add(location, _NODE_LABEL)
    if path is None:
      return
    problem = needs.problem(path)
    if problem:
      problems.append(problem)
      named.add(path)
      return
    try:
      node = ts.ocdbt.dump(base, location).result()
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"{path}: unreadable b-tree node ({_short(e)})")
      named.add(path)
      return
    for entry in node.get("entries", []):
      key = prefix + entry.get("key", b"")
      child = entry.get("location")
      if isinstance(child, str) and child.startswith("btreenode:"):
        # Keys below are relative to the subtree's common prefix.
        walk(child, prefix + entry.get("subtree_common_prefix", b""))
      elif "indirect_value" in entry:
        name = array_name(key)
        if name.startswith(keys):
          needs.add(entry["indirect_value"], name)

  if root:
    walk(root, b"")
  return needs, problems, named


def missing_or_truncated(directory: str, keys: str = "") -> List[str]:
  """Problems of the files the OCDBT database at `directory` refers to.

  Args:
    directory: an orbax item directory holding `manifest.ocdbt`; any other
      directory (an older, non-OCDBT format) is not checked ([]).
    keys: only arrays whose key starts with this (e.g. 'params.' for the
      params of a TrainState) are checked; b-tree nodes always are.

  Returns:
    One line per missing or too-short file, naming the file and the arrays
    that need it; [] when every needed byte is there.
  """
  needs, problems, named = _walk(os.path.abspath(directory), keys)
  for path in needs.end:
    if path not in named:
      problem = needs.problem(path)
      if problem:
        problems.append(problem)
  return problems


def array_files(directory: str, keys: str = "") -> Dict[str, List[str]]:
  """`{data file: [array names]}` of the arrays (keys starting with `keys`)
  whose values live in files of the OCDBT database at `directory`."""
  needs, _, _ = _walk(os.path.abspath(directory), keys)
  return {path: [a for a in arrays if a != _NODE_LABEL]
          for path, arrays in needs.arrays.items()
          if any(a != _NODE_LABEL for a in arrays)}
