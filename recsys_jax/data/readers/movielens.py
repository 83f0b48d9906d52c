"""Reader of the GroupLens MovieLens releases (100K, 1M, 10M, 20M, 25M).

The release is detected from the files in the input directory:
  100K     u.data (tab: user item rating timestamp), u.item (Latin-1, `|`:
           id|title|release date|video date|url|19 genre flags), u.genre
  1M, 10M  ratings.dat (user::item::rating::timestamp), movies.dat
           (id::title::A|B genres)
  20M, 25M ratings.csv, movies.csv (with header; titles may be quoted)

Every rating becomes an implicit interaction (the rating value is not used).
Each user's interactions are ordered by timestamp, ties kept in file order.
Genres become `categories`; the title is kept verbatim and its year is also
stored in `extra["year"]`.
"""

import collections
import csv
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.data.readers import item_metadata

# u.genre order of the 100K release, used when u.genre is absent.
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
NO_GENRES = "(no genres listed)"
_YEAR_RE = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$")

# variant -> (ratings file, movies file)
_LAYOUTS = {
    "100k": ("u.data", "u.item"),
    "1m_10m": ("ratings.dat", "movies.dat"),
    "20m_25m": ("ratings.csv", "movies.csv"),
}


def detect_variant(input_dir: str) -> str:
  """Returns "100k", "1m_10m" or "20m_25m" from the files in `input_dir`."""
  if not os.path.isdir(input_dir):
    raise bad_input.BadInputError(
        input_dir, None, "MovieLens input not found; expected a directory "
        "holding u.data, ratings.dat or ratings.csv")
  for variant, (ratings, _) in _LAYOUTS.items():
    if os.path.isfile(os.path.join(input_dir, ratings)):
      return variant
  raise bad_input.BadInputError(
      input_dir, None, "no MovieLens ratings file; expected u.data (100K), "
      "ratings.dat (1M/10M) or ratings.csv (20M/25M) in this directory")


def _year(title: str) -> Optional[int]:
  m = _YEAR_RE.search(title)
  return int(m.group(1)) if m else None


def _rating_fields(fields: List[str]) -> Tuple[str, str, int]:
  """(user, item, timestamp) of one rating; ValueError if malformed."""
  if len(fields) != 4:
    raise ValueError(f"{len(fields)} fields")
  user, item, rating, ts = (f.strip() for f in fields)
  if not user or not item:
    raise ValueError("empty user or item id")
  float(rating)
  return user, item, int(ts)


def _read_ratings(path: str, variant: str,
                  policy: bad_input.BadInputPolicy) -> Iterator[tuple]:
  """Yields (user, item, timestamp, lineno) of every well-formed rating."""
  expected = {
      "100k": "user<TAB>item<TAB>rating<TAB>timestamp",
      "1m_10m": "user::item::rating::timestamp",
      "20m_25m": "userId,movieId,rating,timestamp",
  }[variant]
  lines = item_metadata.iter_lines(path, policy, progress="ratings read")
  header = None
  for lineno, text in lines:
    if not text.strip():
      continue
    if variant == "20m_25m" and header is None:
      header = [h.strip() for h in text.split(",")]
      if header[:4] != ["userId", "movieId", "rating", "timestamp"]:
        raise bad_input.BadInputError(
            path, lineno, f"header {text!r}; expected {expected!r}")
      continue
    if variant == "100k":
      fields = text.split("\t")
    elif variant == "1m_10m":
      fields = text.split("::")
    else:
      fields = text.split(",")
    try:
      user, item, ts = _rating_fields(fields)
    except ValueError as e:
      policy.report("bad_rating_line", path, lineno,
                    f"{text[:80]!r} ({e}); expected {expected} with integer "
                    "ids and timestamp")
      continue
    yield user, item, ts, lineno


def _genre_names(input_dir: str, policy) -> List[str]:
  path = os.path.join(input_dir, "u.genre")
  if not os.path.isfile(path):
    return list(GENRES_100K)
  by_index = {}
  for lineno, text in item_metadata.iter_lines(path, policy,
                                               encoding="latin-1"):
    if not text.strip():
      continue
    name, sep, idx = text.rpartition("|")
    if not sep or not idx.strip().isdigit():
      raise bad_input.BadInputError(
          path, lineno, f"{text!r}; expected 'genre name|index'")
    by_index[int(idx)] = name
  if sorted(by_index) != list(range(len(by_index))):
    raise bad_input.BadInputError(
        path, None, f"genre indices {sorted(by_index)}; expected 0..n-1")
  return [by_index[i] for i in range(len(by_index))]


def _read_movies_100k(path: str, input_dir: str,
                      policy) -> Dict[str, prepared.ItemMeta]:
  genres = _genre_names(input_dir, policy)
  items = {}
  for lineno, text in item_metadata.iter_lines(path, policy,
                                               encoding="latin-1"):
    if not text.strip():
      continue
    fields = text.split("|")
    flags = fields[5:]
    if (len(fields) < 5 or len(flags) != len(genres)
        or any(f not in ("0", "1") for f in flags)):
      policy.report(
          "bad_movie_line", path, lineno,
          f"{len(fields)} fields; expected id|title|release date|video "
          f"release date|IMDb URL followed by {len(genres)} 0/1 genre flags")
      continue
    movie_id, title, release, video_release, url = (
        f.strip() for f in fields[:5])
    year = _year(title)
    if year is None and re.search(r"\d{4}$", release):
      year = int(release[-4:])
    extra = {"year": year, "release_date": release, "imdb_url": url}
    if video_release:
      extra["video_release_date"] = video_release
    cats = [g for g, f in zip(genres, flags) if f == "1"]
    items[movie_id] = prepared.ItemMeta(item_id=movie_id, title=title,
                                        categories=cats, extra=extra)
  return items


def _movie(movie_id: str, title: str, genres: str) -> prepared.ItemMeta:
  cats = [] if genres.strip() == NO_GENRES else [
      g.strip() for g in genres.split("|") if g.strip()]
  return prepared.ItemMeta(item_id=movie_id.strip(), title=title.strip(),
                           categories=cats,
                           extra={"year": _year(title)})


def _read_movies_dat(path: str, policy) -> Dict[str, prepared.ItemMeta]:
  items = {}
  # 1M is Latin-1, 10M UTF-8: decode UTF-8 and fall back per line.
  for lineno, text in item_metadata.iter_lines(path, policy,
                                               fallback_encoding="latin-1"):
    if not text.strip():
      continue
    fields = text.split("::")
    if len(fields) != 3 or not fields[0].strip():
      policy.report("bad_movie_line", path, lineno,
                    f"{len(fields)} fields; expected id::title::genres")
      continue
    meta = _movie(*fields)
    items[meta.item_id] = meta
  return items


def _read_movies_csv(path: str, policy) -> Dict[str, prepared.ItemMeta]:
  items = {}
  lines = (text for _, text in item_metadata.iter_lines(path, policy))
  reader = csv.reader(lines)
  header = next(reader, None)
  if header is None or [h.strip() for h in header[:3]] != [
      "movieId", "title", "genres"]:
    raise bad_input.BadInputError(
        path, 1, f"header {header!r}; expected 'movieId,title,genres'")
  for row in reader:
    if not row:
      continue
    if len(row) != 3 or not row[0].strip():
      policy.report("bad_movie_line", path, reader.line_num,
                    f"{len(row)} fields; expected movieId,title,genres "
                    "(titles with commas in double quotes)")
      continue
    meta = _movie(*row)
    items[meta.item_id] = meta
  return items


def _user_order(users: List[str]) -> List[str]:
  if all(u.isdigit() for u in users):
    return sorted(users, key=int)
  return users


def read_movielens(
    input_dir: str,
    *,
    policy: Optional[bad_input.BadInputPolicy] = None,
) -> Tuple[List[prepared.UserRecord], Dict[str, prepared.ItemMeta], dict]:
  """Reads a MovieLens release directory into time-ordered user sequences.

  Args:
    input_dir: directory of an unpacked MovieLens release.
    policy: bad-input policy (default: raise on the first problem).

  Returns:
    (users, items, source): users in numeric user-id order; items keyed by
    movie id. Rated movies missing from the movies file are reported by
    `write_prepared` as "item_without_metadata".
  """
  policy = policy or bad_input.BadInputPolicy("error")
  variant = detect_variant(input_dir)
  ratings_name, movies_name = _LAYOUTS[variant]
  ratings_path = os.path.join(input_dir, ratings_name)
  movies_path = os.path.join(input_dir, movies_name)
  item_metadata.check_file(movies_path, f"MovieLens {movies_name}")

  if variant == "100k":
    items = _read_movies_100k(movies_path, input_dir, policy)
  elif variant == "1m_10m":
    items = _read_movies_dat(movies_path, policy)
  else:
    items = _read_movies_csv(movies_path, policy)

  by_user = collections.OrderedDict()
  first_line = {}
  n = 0
  for user, item, ts, lineno in _read_ratings(ratings_path, variant, policy):
    by_user.setdefault(user, []).append((ts, item))
    first_line.setdefault(user, lineno)
    n += 1
  users = []
  for user in _user_order(list(by_user)):
    # sorted() is stable: equal timestamps keep their file order.
    events = sorted(by_user[user], key=lambda e: e[0])
    users.append(prepared.UserRecord(
        user_id=user, item_ids=[it for _, it in events],
        timestamps=[ts for ts, _ in events],
        source=(ratings_path, first_line[user])))
  source = {"format": "movielens", "variant": variant, "input": input_dir,
            "ratings": ratings_path, "movies": movies_path,
            "ratings_read": n}
  return users, items, source
