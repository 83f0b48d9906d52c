"""Item titles by vocabulary id, and what a user types resolved to ids.

An entry of a history is an item id (digits, optionally after '#': the
vocabulary index 1..N that `predict` and the evaluation report) or a title.
A title resolves, in order, by

  1. exact match after normalisation (Unicode NFKC, case folded, runs of
     white space as one space);
  2. containment: the normalised entry (3 characters or more) inside
     exactly one normalised title, else every word of it among the words
     of exactly one title ('pexsart baking sheet');
  3. fuzzy match (`difflib` ratio): the best title when it scores at least
     `FUZZY_ACCEPT` and leads the next one by `FUZZY_MARGIN`.

Several items behind one exact title, several containing titles, or no
confident fuzzy match raise `ResolveError`, whose one-line message lists
the candidates (id and title).
"""

import difflib
import json
import os
import re
import unicodedata
from typing import Dict, List, NamedTuple, Optional, Sequence

TITLES_FILE = "item_titles.json"
# difflib ratios: candidates shown from FUZZY_CUTOFF, accepted from
# FUZZY_ACCEPT when the runner-up is FUZZY_MARGIN behind.
FUZZY_CUTOFF, FUZZY_ACCEPT, FUZZY_MARGIN = 0.6, 0.85, 0.05
MIN_CONTAINED = 3
MAX_SHOWN = 5
_ID = re.compile(r"#?(\d+)")
_WORD = re.compile(r"\w+")


class ResolveError(ValueError):
  """An entry names no item, or several; the message lists candidates."""


class Resolved(NamedTuple):
  item_id: int
  entry: str
  how: str  # 'id', 'exact', 'contains' or 'fuzzy'


def normalise(text: str) -> str:
  """NFKC, case folded, white space collapsed (what exact matching compares)."""
  return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


def write_titles(path: str, titles: Sequence[str]) -> None:
  """Writes `{"1": title, ...}` for titles of ids 1..N (`titles[0]` unused)."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({str(i): titles[i] for i in range(1, len(titles))}, f,
              ensure_ascii=False, indent=0)
  os.replace(path + ".tmp", path)


def read_titles(path: str, num_items: int) -> List[str]:
  """Titles by id (`[""] + N titles`) from a `write_titles` file.

  Raises:
    ValueError: naming the file, when it is not such a map of ids 1..N.
  """
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
  want = {str(i) for i in range(1, num_items + 1)}
  if not isinstance(table, dict) or set(table) != want:
    raise ValueError(f"{path}: expected a JSON object of item ids 1.."
                     f"{num_items} (the model's catalogue) to titles")
  return [""] + [str(table[str(i)]) for i in range(1, num_items + 1)]


class Catalogue:
  """Titles of items 1..N and resolution of entries to ids (module doc).

  Args:
    titles: `titles[i]` is item i's title for i in 1..N (`titles[0]`, the
      padding id, is ignored); None: ids only (`reason` says why).
    num_items: N.
    reason: why there are no titles, named when a title is asked for.
  """

  def __init__(self, titles: Optional[Sequence[str]], num_items: int,
               reason: str = ""):
    self.num_items = int(num_items)
    self.reason = reason
    self.titles = None if titles is None else [""] + list(titles[1:])
    if self.titles is not None and len(self.titles) != self.num_items + 1:
      raise ValueError(f"{len(self.titles) - 1} titles for a model of "
                       f"{self.num_items} items")
    self._exact: Dict[str, List[int]] = {}
    for i, title in enumerate(self.titles or [], start=0):
      if i and title:
        self._exact.setdefault(normalise(title), []).append(i)
    self._keys = list(self._exact)
    self._words = [set(_WORD.findall(k)) for k in self._keys]

  @property
  def has_titles(self) -> bool:
    return self.titles is not None

  def title(self, item_id: int) -> Optional[str]:
    return None if self.titles is None else self.titles[item_id]

  def _describe(self, ids: Sequence[int]) -> str:
    shown = ", ".join(f"{i} {self.titles[i]!r}" for i in ids[:MAX_SHOWN])
    more = len(ids) - MAX_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")

  def resolve(self, entry: str) -> Resolved:
    """The item an entry names (module docstring).

    Raises:
      ResolveError: one line naming the entry and the candidates.
    """
    text = str(entry).strip()
    if not text:
      raise ResolveError("an empty history entry (two ';' in a row?)")
    m = _ID.fullmatch(text)
    if m:
      item = int(m.group(1))
      if not 1 <= item <= self.num_items:
        raise ResolveError(f"item id {item} is outside 1..{self.num_items} "
                           "(the model's catalogue)")
      return Resolved(item, text, "id")
    if self.titles is None:
      raise ResolveError(f"{text!r}: no titles to resolve it ({self.reason});"
                         " give item ids")
    key = normalise(text)
    exact = self._exact.get(key)
    if exact:
      if len(exact) > 1:
        raise ResolveError(f"{text!r} is the title of {len(exact)} items: "
                           f"{self._describe(exact)}; give the id")
      return Resolved(exact[0], text, "exact")
    if len(key) >= MIN_CONTAINED:
      inside = sorted(i for k in self._keys if key in k
                      for i in self._exact[k])
      words = set(_WORD.findall(key))
      if not inside and words:
        inside = sorted(i for k, w in zip(self._keys, self._words)
                        if words <= w for i in self._exact[k])
      if len(inside) == 1:
        return Resolved(inside[0], text, "contains")
      if inside:
        raise ResolveError(f"{text!r} is part of {len(inside)} titles: "
                           f"{self._describe(inside)}; be more specific or "
                           "give the id")
    close = self._close(key)
    if close and close[0][0] >= FUZZY_ACCEPT and (
        len(close) == 1 or close[0][0] - close[1][0] >= FUZZY_MARGIN):
      ids = self._exact[close[0][1]]
      if len(ids) == 1:
        return Resolved(ids[0], text, "fuzzy")
    ids = [i for _, k in close for i in self._exact[k]]
    if ids:
      raise ResolveError(f"{text!r}: no item has this title; closest: "
                         f"{self._describe(ids)}")
    raise ResolveError(f"{text!r}: no item has this title or one like it")

  def _close(self, key: str) -> List[tuple]:
    """`[(ratio, normalised title)]`, best first, from FUZZY_CUTOFF."""
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(key)
    scored = []
    for k in self._keys:
      matcher.set_seq1(k)
      if (matcher.real_quick_ratio() >= FUZZY_CUTOFF
          and matcher.quick_ratio() >= FUZZY_CUTOFF):
        ratio = matcher.ratio()
        if ratio >= FUZZY_CUTOFF:
          scored.append((ratio, k))
    scored.sort(key=lambda rk: (-rk[0], rk[1]))
    return scored[:MAX_SHOWN]
