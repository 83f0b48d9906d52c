"""Raw-format readers: tiny fixtures per format, exact vocab and sequences.

Each fixture is written by the test; expected vocabularies, sequences and
texts are worked out by hand from the fixture. Bad input is checked in both
policies: "error" must name file:line and the expectation, "skip" must count
the record in stats.json.
"""

import collections
import gzip
import json
import os
import random
import re

import pytest

from recsys_jax.data import bad_input
from recsys_jax.data import prepared
from recsys_jax.data import readers
from recsys_jax.data.readers import item_metadata

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")


def write(path, content, *, gz=False):
  data = content.encode("utf-8") if isinstance(content, str) else content
  with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
    f.write(data)
  return str(path)


def jsonl(records):
  return "".join(json.dumps(r) + "\n" for r in records)


def prepare(out_dir, read_result, policy=None, min_interactions=1):
  users, items, source = read_result
  extra = source.pop("extra_stats", None)
  stats = prepared.write_prepared(
      str(out_dir), users, items, policy=policy, source=source,
      min_interactions=min_interactions, text_vocab_size=None,
      extra_stats=extra)
  return stats


def load(out_dir):
  """(items.jsonl rows, user_id -> {feature: list}) of a prepared dir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = prepared.PreparedDataset(str(out_dir))
  users = {}
  for path in ds.sequence_files:
    for rec in tf.compat.v1.io.tf_record_iterator(path):
      ex = tf.train.Example.FromString(rec)
      feats = {}
      for k, f in ex.features.feature.items():
        if f.HasField("int64_list"):
          feats[k] = list(f.int64_list.value)
        else:
          feats[k] = [v.decode("utf-8") for v in f.bytes_list.value]
      users[feats[prepared.USER_ID][0]] = feats
  return ds.items(), users


def skip_policy():
  return bad_input.BadInputPolicy("skip")


# --------------------------------------------------------------------------
# Sequence files.

SEQ = "u1 3 1 2\nu2 2 3 10\n\nu3 10 1 1\n"
META = [
    {"item_id": 1, "asin": "A1", "title": "One", "categories": [["Beauty",
     "Nails"], ["Beauty", "Tools"]], "brand": "B1", "price": 2.5,
     "sales_rank": 7},
    {"item_id": 2, "title": "Two", "categories": ["Beauty"], "price": "$3"},
    {"item_id": 3, "title": "Three"},
    {"item_id": 10, "title": "Ten", "brand": "B10"},
]


@pytest.mark.parametrize("gz", [False, True])
def test_sequence_file_vocab_sequences_metadata(tmp_path, gz):
  seq = write(tmp_path / "seq.txt", SEQ, gz=gz)
  meta = write(tmp_path / "meta.jsonl", jsonl(META), gz=gz)
  stats = prepare(tmp_path / "out",
                  readers.read_sequence_file(seq, item_metadata_path=meta))
  items, users = load(tmp_path / "out")
  # Integer ids keep numeric order: 1, 2, 3, 10 -> indices 1..4.
  assert [it["item_id"] for it in items] == ["1", "2", "3", "10"]
  assert [it["index"] for it in items] == [1, 2, 3, 4]
  assert users["u1"]["item_ids"] == [3, 1, 2]
  assert users["u2"]["item_ids"] == [2, 3, 4]
  assert users["u3"]["item_ids"] == [4, 1, 1]
  assert stats["users"] == 3 and stats["interactions"] == 9
  one = items[0]
  assert one["title"] == "One"
  assert one["categories"] == ["Beauty", "Nails", "Tools"]  # nested, flattened
  assert one["brand"] == "B1" and one["price"] == 2.5
  assert one["asin"] == "A1" and one["sales_rank"] == 7  # unknown keys kept
  assert items[1]["price"] == 3.0
  assert items[3]["brand"] == "B10"


def test_sequence_file_string_ids_first_seen_order(tmp_path):
  seq = write(tmp_path / "seq.txt", "a x y\nb z x\n")
  prepare(tmp_path / "out", readers.read_sequence_file(seq))
  items, users = load(tmp_path / "out")
  assert [it["item_id"] for it in items] == ["x", "y", "z"]
  assert users["b"]["item_ids"] == [3, 1]


def test_sequence_file_windows_line_endings(tmp_path):
  seq = write(tmp_path / "seq.txt", "1 1 2\r\n2 2 1\r\n")
  prepare(tmp_path / "out", readers.read_sequence_file(seq))
  items, users = load(tmp_path / "out")
  assert [it["item_id"] for it in items] == ["1", "2"]
  assert users["2"]["item_ids"] == [2, 1]


# (sequence file, metadata or None, error regex with file:line, skip reason,
#  users left in skip mode)
SEQ_BAD_CASES = {
    "only_user_id": (b"u1 1 2\nu2\nu3 2 1\n", None,
                     r"seq\.txt:2: user 'u2' has no items; expected",
                     "user_without_items", 2),
    "duplicate_user": (b"u1 1 2\nu2 2 1\nu1 1 1\n", None,
                       r"seq\.txt:3: user 'u1' already appeared on line 1",
                       "duplicate_user", 2),
    "non_utf8": (b"u1 1 2\nu2 caf\xe9 1\nu3 1 2\n", None,
                 r"seq\.txt:2: byte b'\\xe9' at column 7 is not valid utf-8",
                 "not_utf8", 2),
    "metadata_not_json": (b"u1 1 2\n", b'{"item_id": 1}\n{oops\n{"item_id": 2}\n',
                          r"meta\.jsonl:2: not JSON .*expected one JSON object",
                          "metadata_not_json", 1),
    "metadata_without_item_id": (
        b"u1 1 2\n", b'{"item_id": 1}\n{"item_id": 2}\n{"title": "x"}\n',
        r"meta\.jsonl:3: no 'item_id' key", "metadata_missing_id", 1),
    "metadata_duplicate": (
        b"u1 1 2\n", b'{"item_id": 1}\n{"item_id": 2}\n{"item_id": 1}\n',
        r"meta\.jsonl:3: item_id '1' already described on line 1",
        "duplicate_item_metadata", 1),
    "item_without_metadata": (b"u1 1 2\nu2 2 7\n", b'{"item_id": 1}\n{"item_id": 2}\n',
                              r"seq\.txt:2: item '7' has no entry",
                              "item_without_metadata", 2),
}


@pytest.mark.parametrize("case", sorted(SEQ_BAD_CASES))
def test_sequence_file_bad_input(tmp_path, case):
  seq_bytes, meta_bytes, message, reason, users_left = SEQ_BAD_CASES[case]
  seq = write(tmp_path / "seq.txt", seq_bytes)
  meta = write(tmp_path / "meta.jsonl", meta_bytes) if meta_bytes else None
  with pytest.raises(bad_input.BadInputError, match=message) as err:
    prepare(tmp_path / "err", readers.read_sequence_file(
        seq, item_metadata_path=meta))
  assert "--on_bad_line=skip" in str(err.value)
  policy = skip_policy()
  stats = prepare(tmp_path / "skip", readers.read_sequence_file(
      seq, item_metadata_path=meta, policy=policy), policy=policy)
  assert stats["skipped"] == {reason: 1}
  assert stats["users"] == users_left
  with open(tmp_path / "skip" / prepared.STATS_FILE) as f:
    assert json.load(f)["skipped"] == {reason: 1}


def test_sequence_file_empty_file_errors_in_both_modes(tmp_path):
  seq = write(tmp_path / "seq.txt", "\n\n")
  for mode in ("error", "skip"):
    policy = bad_input.BadInputPolicy(mode)
    with pytest.raises(bad_input.BadInputError,
                       match=r"seq\.txt: file is empty; expected one line"):
      prepare(tmp_path / mode, readers.read_sequence_file(seq, policy=policy),
              policy=policy)


def test_sequence_file_missing_file(tmp_path):
  with pytest.raises(bad_input.BadInputError, match="sequence file not found"):
    readers.read_sequence_file(str(tmp_path / "nope.txt"))


def test_sequence_file_short_user_reported(tmp_path):
  seq = write(tmp_path / "seq.txt", "u1 1 2 3\nu2 1 2\n")
  with pytest.raises(bad_input.BadInputError,
                     match=r"seq\.txt:2: user 'u2' has 2 interactions"):
    prepare(tmp_path / "e", readers.read_sequence_file(seq),
            min_interactions=3)


# --------------------------------------------------------------------------
# Shared metadata parsing.

def test_flatten_categories_and_price():
  assert item_metadata.flatten_categories(
      [["A", "B"], ["A", "C", ["D"]], "E"]) == ["A", "B", "C", "D", "E"]
  assert item_metadata.flatten_categories("A") == ["A"]
  assert item_metadata.flatten_categories(None) == []
  assert item_metadata.parse_price("$1,299.50") == 1299.5
  assert item_metadata.parse_price(4) == 4.0
  assert item_metadata.parse_price("") is None
  assert item_metadata.parse_price("unknown") is None


def test_python_literal_parsing_never_evaluates_code(tmp_path):
  marker = tmp_path / "pwned"
  code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
  with pytest.raises(ValueError, match="nor a Python literal"):
    item_metadata.parse_record(code, allow_python_literal=True)
  assert not marker.exists()
  assert item_metadata.parse_record(
      "{'asin': 'A', 'price': 1.5}", allow_python_literal=True) == {
          "asin": "A", "price": 1.5}
  with pytest.raises(ValueError, match="not JSON"):
    item_metadata.parse_record("{'asin': 'A'}")


# --------------------------------------------------------------------------
# MovieLens.

def _u_item_line(movie_id, title, date, flags):
  return f"{movie_id}|{title}|{date}||http://x/{movie_id}|" + "|".join(
      str(f) for f in flags)


def test_movielens_100k_latin1_genre_file_and_stable_time_order(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  # user 7: times 100, 50, 100 -> order by time, tie keeps file order.
  write(d / "u.data", "7\t5\t3\t100\n7\t2\t4\t50\n2\t2\t1\t10\n7\t3\t5\t100\n"
        "2\t5\t2\t5\n")
  write(d / "u.genre", "unknown|0\nDrama|1\nNoir|2\n\n")
  lines = [_u_item_line(2, "Café Society (1999)", "01-Jan-1999", [0, 1, 0]),
           _u_item_line(3, "Untitled", "05-May-1971", [0, 1, 1]),
           _u_item_line(5, "Zed (1995)", "", [1, 0, 0])]
  write(d / "u.item", ("\n".join(lines) + "\n").encode("latin-1"))
  users, items, source = readers.read_movielens(str(d))
  assert source["variant"] == "100k"
  assert [u.user_id for u in users] == ["2", "7"]  # numeric user order
  assert users[1].item_ids == ["2", "5", "3"]
  assert users[1].timestamps == [50, 100, 100]
  assert users[0].item_ids == ["5", "2"]
  assert items["2"].title == "Café Society (1999)"
  assert items["2"].categories == ["Drama"]
  assert items["2"].extra["year"] == 1999
  assert items["3"].categories == ["Drama", "Noir"]
  assert items["3"].extra["year"] == 1971  # from the release date
  prepare(tmp_path / "out", (users, items, source))
  rows, seqs = load(tmp_path / "out")
  assert [r["item_id"] for r in rows] == ["2", "3", "5"]
  assert seqs["7"]["item_ids"] == [1, 3, 2]
  assert seqs["7"]["timestamps"] == [50, 100, 100]


def test_movielens_100k_standard_genres_without_u_genre(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  write(d / "u.data", "1\t1\t5\t1\n")
  flags = [0] * 19
  flags[1] = flags[18] = 1
  write(d / "u.item", _u_item_line(1, "A (1990)", "", flags) + "\n")
  _, items, _ = readers.read_movielens(str(d))
  assert items["1"].categories == ["Action", "Western"]


def test_movielens_1m_dat(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  write(d / "ratings.dat", "1::20::5::300\n1::10::3::200\n2::10::4::100\n")
  write(d / "movies.dat", "10::Heat (1995)::Action|Crime|Thriller\n"
        "20::Amélie (2001)::Comedy|Romance\n".encode("latin-1"))
  users, items, source = readers.read_movielens(str(d))
  assert source["variant"] == "1m_10m"
  assert users[0].item_ids == ["10", "20"]
  assert items["10"].categories == ["Action", "Crime", "Thriller"]
  assert items["20"].title == "Amélie (2001)"  # Latin-1 line decoded
  assert items["20"].extra["year"] == 2001


def test_movielens_20m_csv_quoted_titles(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  write(d / "ratings.csv", "userId,movieId,rating,timestamp\n"
        "3,11,4.5,20\n3,7,3.0,10\n3,11,1.0,10\n")
  write(d / "movies.csv", "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "7,Sabrina (1995),(no genres listed)\n")
  users, items, source = readers.read_movielens(str(d))
  assert source["variant"] == "20m_25m"
  assert users[0].item_ids == ["7", "11", "11"]
  assert items["11"].title == "American President, The (1995)"
  assert items["11"].categories == ["Comedy", "Drama", "Romance"]
  assert items["7"].categories == []
  prepare(tmp_path / "out", (users, items, source))
  rows, seqs = load(tmp_path / "out")
  assert [r["item_id"] for r in rows] == ["7", "11"]
  assert seqs["3"]["item_ids"] == [1, 2, 2]


def test_movielens_bad_rating_line(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  write(d / "u.data", "1\t1\t5\t1\n1\t2\t5\n1\t1\t4\t2\n")
  write(d / "u.item", _u_item_line(1, "A", "", [0] * 19) + "\n")
  with pytest.raises(bad_input.BadInputError,
                     match=r"u\.data:2: .*expected user<TAB>item<TAB>rating"):
    readers.read_movielens(str(d))
  policy = skip_policy()
  stats = prepare(tmp_path / "out", readers.read_movielens(str(d),
                                                           policy=policy),
                  policy=policy)
  assert stats["skipped"] == {"bad_rating_line": 1}
  assert stats["interactions"] == 2


def test_movielens_bad_u_item_flags(tmp_path):
  d = tmp_path / "ml"
  d.mkdir()
  write(d / "u.data", "1\t1\t5\t1\n")
  write(d / "u.item", _u_item_line(1, "A", "", [0] * 18) + "\n")
  with pytest.raises(bad_input.BadInputError,
                     match=r"u\.item:1: 23 fields; expected .* 19 0/1 genre"):
    readers.read_movielens(str(d))


def test_movielens_no_ratings_file(tmp_path):
  with pytest.raises(bad_input.BadInputError,
                     match="expected u.data .* ratings.dat .* ratings.csv"):
    readers.read_movielens(str(tmp_path))


# --------------------------------------------------------------------------
# Amazon.

def _review(user, asin, t):
  return {"reviewerID": user, "asin": asin, "unixReviewTime": t,
          "overall": 5.0, "reviewText": "ok"}


AMAZON_REVIEWS = [
    _review("A", "x", 3), _review("A", "y", 1), _review("B", "x", 1),
    _review("A", "z", 2), _review("B", "y", 2), _review("C", "z", 5),
    _review("B", "x", 1),  # exact duplicate of line 3
]


def test_amazon_2014_gzip_literal_metadata_kcore(tmp_path):
  reviews = write(tmp_path / "reviews.json.gz", jsonl(AMAZON_REVIEWS), gz=True)
  meta_lines = [
      "{'asin': 'x', 'title': 'Ex', 'categories': [['Beauty', 'Nails'], "
      "['Beauty', 'Tools']], 'brand': 'BX', 'price': 9.5, 'salesRank': "
      "{'Beauty': 3}}",
      "{'asin': 'y', 'title': \"Why's\", 'description': 'desc y'}",
      "{'asin': 'z', 'title': 'Zed'}",
  ]
  meta = write(tmp_path / "meta.json.gz", "\n".join(meta_lines) + "\n",
               gz=True)
  result = readers.read_amazon(reviews, metadata_path=meta, kcore=2)
  stats = prepare(tmp_path / "out", result)
  # Round 1 drops C (1 review); then z has 1 review left and is dropped.
  assert stats["kcore"] == {"k": 2, "users_removed": 1, "items_removed": 1,
                            "interactions_removed": 2, "rounds": 2}
  assert stats["duplicate_reviews_removed"] == 1
  items, users = load(tmp_path / "out")
  # First-seen order over users in file order: A (y, x), then B.
  assert [it["item_id"] for it in items] == ["y", "x"]
  assert users["A"]["item_ids"] == [1, 2]
  assert users["A"]["timestamps"] == [1, 3]
  assert users["B"]["item_ids"] == [2, 1]
  assert set(users) == {"A", "B"}
  x = items[1]
  assert x["title"] == "Ex" and x["brand"] == "BX" and x["price"] == 9.5
  assert x["categories"] == ["Beauty", "Nails", "Tools"]
  assert x["salesRank"] == {"Beauty": 3}
  assert items[0]["title"] == "Why's" and items[0]["description"] == "desc y"


def test_amazon_2018_json_metadata(tmp_path):
  reviews = write(tmp_path / "r.json", jsonl(AMAZON_REVIEWS[:5]))
  meta = write(tmp_path / "m.json", jsonl([
      {"asin": "x", "title": "Ex", "category": ["Office", "Pens"],
       "description": ["Line one.", "Line two."], "price": "$1,012.99",
       "also_buy": ["y"]},
      {"asin": "y", "title": "Why", "price": "$1.00 - $2.00"},
      {"asin": "z", "title": "Zed", "price": ""},
  ]))
  users, items, _ = readers.read_amazon(reviews, metadata_path=meta, kcore=0)
  assert [u.item_ids for u in users] == [["y", "z", "x"], ["x", "y"]]
  assert items["x"].categories == ["Office", "Pens"]
  assert items["x"].description == "Line one. Line two."
  assert items["x"].price == 1012.99
  assert items["x"].extra["also_buy"] == ["y"]
  assert items["y"].price == 1.0
  assert items["z"].price is None


def reference_kcore(pairs, k):
  """Removes all under-k users and items at once, repeatedly, to a fixpoint."""
  pairs = list(pairs)
  while True:
    ud = collections.Counter(u for u, _ in pairs)
    idg = collections.Counter(i for _, i in pairs)
    new = [(u, i) for u, i in pairs if ud[u] >= k and idg[i] >= k]
    if len(new) == len(pairs):
      return new
    pairs = new


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcore_matches_reference(seed):
  rng = random.Random(seed)
  by_user = {f"u{u}": [f"i{int(rng.paretovariate(1.0)) % 40}"
                       for _ in range(rng.randint(1, 12))] for u in range(80)}
  k = 3
  kept, counts = readers.kcore_filter(by_user, k)
  got = sorted((u, by_user[u][p]) for u, ps in kept.items() for p in ps)
  want = sorted(reference_kcore(
      [(u, i) for u, items in by_user.items() for i in items], k))
  assert got == want and got  # non-trivial: something is kept
  assert counts["interactions_removed"] == (
      sum(len(v) for v in by_user.values()) - len(want))
  assert counts["users_removed"] == len(by_user) - len({u for u, _ in want})
  degrees = collections.Counter(i for _, i in got)
  assert min(degrees.values()) >= k


def test_amazon_bad_review_line(tmp_path):
  lines = jsonl(AMAZON_REVIEWS[:2]) + '{"reviewerID": "A", "unixReviewTime": 4}\n'
  reviews = write(tmp_path / "r.json", lines + "not json at all\n")
  with pytest.raises(bad_input.BadInputError,
                     match=r"r\.json:3: no asin; expected every review"):
    readers.read_amazon(reviews, kcore=0)
  policy = skip_policy()
  users, _, _ = readers.read_amazon(reviews, kcore=0, policy=policy)
  assert policy.summary() == {"review_missing_field": 1, "review_not_json": 1}
  assert users[0].item_ids == ["y", "x"]


def test_amazon_bad_metadata_line_names_file_and_line(tmp_path):
  reviews = write(tmp_path / "r.json", jsonl(AMAZON_REVIEWS[:2]))
  meta = write(tmp_path / "m.json", "{'asin': 'x'}\n{'asin': 'y', \n")
  with pytest.raises(bad_input.BadInputError,
                     match=r"m\.json:2: neither JSON .* nor a Python literal"):
    readers.read_amazon(reviews, metadata_path=meta, kcore=0)


# --------------------------------------------------------------------------
# REGEN.

def _purchase(asin, t, rating, summary, **extra):
  return {"item": {"asin": asin, "title": f"T {asin}",
                   "category": ["Office", asin.upper()], "price": 2.0},
          "review": {"summary": summary, "rating": rating,
                     "text": f"text {asin}", "unix_time": t}, **extra}


REGEN_NESTED = [
    {"reviewer_id": "R1",
     "purchase_history": [_purchase("b", 20, 5.0, "great b"),
                          _purchase("a", 10, 3, "ok a"),
                          _purchase("c", 30, 4.5, "fine c")],
     "user": {"long_summary": "Likes pens.", "short_summary": "pens",
              "reasons": {"purchase_reason": "work"}, "age": 40},
     "last_purchase": "c",
     "critiques": ["cheaper please", "in blue"]},
    {"reviewer_id": "R2",
     "purchase_history": [_purchase("a", 5, 1, "bad", critique="sturdier"),
                          _purchase("d", 6, 2, "meh")],
     "user": {"long_summary": "Buys paper."}},
]


def test_regen_nested(tmp_path):
  path = write(tmp_path / "office.jsonl", jsonl(REGEN_NESTED))
  users, items, source = readers.read_regen(path)
  assert source["form"] == "nested"
  r1 = users[0]
  # Ordered by unix_time: a (10), b (20), c (30).
  assert r1.item_ids == ["a", "b", "c"]
  assert r1.timestamps == [10, 20, 30]
  assert r1.narratives == {"last_purchase": "c", "long_summary": "Likes pens.",
                           "short_summary": "pens",
                           "reasons.purchase_reason": "work"}
  assert r1.per_item["review_summary"] == ["ok a", "great b", "fine c"]
  assert r1.per_item["review_rating"] == ["3", "5", "4.5"]
  assert r1.per_item["review_text"] == ["text a", "text b", "text c"]
  # 2 critiques for 3 purchases: before the 2nd and 3rd purchase in file
  # order (b, a, c), i.e. a and c; then reordered with the items.
  assert r1.critiques == ["cheaper please", "", "in blue"]
  assert users[1].critiques == ["sturdier", ""]
  assert items["c"].categories == ["Office", "C"]
  assert items["a"].title == "T a" and items["a"].price == 2.0
  prepare(tmp_path / "out", (users, items, source))
  rows, seqs = load(tmp_path / "out")
  assert [r["item_id"] for r in rows] == ["a", "b", "c", "d"]
  assert seqs["R1"]["item_ids"] == [1, 2, 3]
  assert seqs["R2"]["item_ids"] == [1, 4]
  assert seqs["R1"]["narrative/long_summary"] == ["Likes pens."]
  assert seqs["R1"]["per_item/review_summary"] == ["ok a", "great b",
                                                   "fine c"]
  assert seqs["R2"]["critiques"] == ["sturdier", ""]
  stats = prepared.PreparedDataset(str(tmp_path / "out")).stats
  assert stats["has_critiques"] is True
  assert "long_summary" in stats["narrative_fields"]


def test_regen_flattened_json_array(tmp_path):
  rows = [
      {"reviewer_id": "R9", "asin": "q", "title": "Q", "category":
       " Office - Paper - Notebooks", "price": 1.5, "rating": 4,
       "review": "nice q", "long_summary": "A note taker.",
       "purchase_date": "03/02/2015"},
      {"reviewer_id": "R9", "asin": "p", "title": "P", "category": "Office",
       "price": 2, "rating": 5, "review": "nice p",
       "long_summary": "A note taker.", "purchase_date": "01/02/2015"},
  ]
  path = write(tmp_path / "flat.json", json.dumps(rows, indent=1))
  users, items, source = readers.read_regen(path)
  assert source["form"] == "flattened"
  (u,) = users
  assert u.item_ids == ["p", "q"]
  assert u.timestamps == [1420156800, 1425254400]  # UTC midnights
  assert u.narratives == {"long_summary": "A note taker."}
  assert u.per_item == {"review_rating": ["5", "4"],
                        "review_text": ["nice p", "nice q"]}
  assert u.source == (path, 2)  # the line the user's first row starts on
  assert items["q"].categories == ["Office", "Paper", "Notebooks"]


REGEN_BAD_CASES = {
    "no_asin": ({"reviewer_id": "R3", "purchase_history": [
        {"item": {"title": "x"}, "review": {}}]},
                r"office\.jsonl:2: user 'R3': purchase_history\[0\] has no "
                r"item\.asin", "regen_missing_field"),
    "critiques_misaligned": (
        dict(REGEN_NESTED[1], reviewer_id="R3",
             critiques=["a", "b", "c", "d"]),
        r"office\.jsonl:2: user 'R3': 4 critiques for 2 purchases; "
        r"expected 2 or 1", "critiques_misaligned"),
    "empty_history": ({"reviewer_id": "R3", "purchase_history": []},
                      r"office\.jsonl:2: user 'R3': purchase_history is list; "
                      "expected a non-empty list", "user_without_items"),
    "duplicate_user": (REGEN_NESTED[0],
                       r"office\.jsonl:2: user 'R1' already appeared on line 1",
                       "duplicate_user"),
}


@pytest.mark.parametrize("case", sorted(REGEN_BAD_CASES))
def test_regen_bad_input(tmp_path, case):
  record, message, reason = REGEN_BAD_CASES[case]
  path = write(tmp_path / "office.jsonl", jsonl([REGEN_NESTED[0], record]))
  with pytest.raises(bad_input.BadInputError, match=message):
    readers.read_regen(path)
  policy = skip_policy()
  users, _, _ = readers.read_regen(path, policy=policy)
  assert policy.summary() == {reason: 1}
  assert [u.user_id for u in users] == ["R1"]


def test_regen_not_json_line(tmp_path):
  path = write(tmp_path / "office.jsonl",
               jsonl(REGEN_NESTED[:1]) + "{broken\n")
  with pytest.raises(bad_input.BadInputError,
                     match=r"office\.jsonl:2: not JSON"):
    readers.read_regen(path)


def test_regen_real_flattened_sample(tmp_path):
  path = os.path.join(SHARED_DATA, "regen",
                      "thirdparty_flattened_office_user_sample.json")
  if not os.path.exists(path):
    pytest.skip(f"real REGEN sample not present at {path}")
  with open(path) as f:
    rows = json.load(f)
  (u,), items, _ = readers.read_regen(path)
  assert u.user_id == rows[0]["reviewer_id"]
  assert u.item_ids == [r["asin"] for r in rows]  # already in date order
  assert len(items) == len({r["asin"] for r in rows})
  assert u.narratives == {"long_summary": rows[0]["long_summary"]}
  assert u.per_item["review_text"] == [r["review"] for r in rows]
  assert u.per_item["review_rating"] == [str(r["rating"]) for r in rows]
  assert all(re.fullmatch(r"\d+", str(t)) for t in u.timestamps)
  assert u.timestamps == sorted(u.timestamps)
