"""Synthetic interaction store: the project's embedded default dataset.

A small generative model of shopping sessions with structure a sequential
recommender can learn (docs/SYNTHETIC.md has the full description):

  * items sit in a 3-level category path (top > mid > leaf sub-category), have
    a brand of their top category and a Zipf popularity;
  * each user has sparse Dirichlet preferences over sub-categories and brands;
  * the sub-category of each next purchase follows a Markov chain with strong
    routine transitions (cleanser -> toner -> serum ...), mixed with the user's
    preference, so order matters; within the sub-category the item is drawn by
    popularity x the user's brand affinity, never repeating the previous item;
  * titles/descriptions come from sub-category, top-category and brand words;
  * critiques mark sub-category changes; narratives state the true causes.

Everything is a deterministic function of the seed. Users are simulated one at
a time from their own random stream and streamed to `write_prepared`; the item
tables are NumPy arrays and every draw is a binary search, so 10^6 users x
10^6 items fit in memory.
"""

import argparse
import collections.abc
import dataclasses
import random
import resource
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

import numpy as np

from recsys_jax.data import prepared
from recsys_jax.data import synthetic_text as text

TINY = dict(num_users=200, num_items=150, num_categories=12,
            num_top_categories=3, brands_per_top=4, text_vocab_size=300)
DEFAULT = dict(num_users=20000, num_items=2000, num_categories=48,
               num_top_categories=6, brands_per_top=8, text_vocab_size=2000)
PRESETS = {"tiny": TINY, "default": DEFAULT}

_EPOCH_START = 1_420_070_400  # 2015-01-01 UTC
_FIVE_YEARS = 5 * 365 * 86_400
_CAUSES = ("preference", "routine", "same", "complement", "browse")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Parameters of the generative process (see docs/SYNTHETIC.md).

  Attributes:
    num_users: users to simulate.
    num_items: catalogue size N (>= 2 items per sub-category).
    seed: everything is a deterministic function of it.
    num_categories: leaf sub-categories C (the Markov chain's states).
    num_top_categories: top categories; leaves are split evenly among them.
    brands_per_top: brands of each top category.
    item_zipf: exponent of item popularity, weight = rank^-item_zipf.
    category_zipf: exponent of sub-category popularity (Dirichlet base).
    brand_zipf: exponent of brand popularity within a top category.
    category_concentration: Dirichlet concentration per sub-category; small
      values give users a few favourite sub-categories.
    brand_concentration: the same for brands.
    brand_loyalty: weight of the user's brand affinity against a uniform
      brand choice when picking an item inside a sub-category.
    preference_weight: probability that the next sub-category is drawn from
      the user's preference instead of the transition process.
    transition_next: transition probability to the next sub-category of the
      routine chain of the top category.
    transition_stay: ... to the same sub-category.
    transition_cross: ... to the sub-category's fixed complement in another
      top category; the rest goes to a popularity-weighted random one.
    mean_length: mean sequence length (3 + floor(lognormal)).
    length_sigma: lognormal sigma of the length; larger is heavier-tailed.
    max_length: lengths are capped here.
    mean_gap_days: mean time between purchases (exponential).
  """
  num_users: int = 20000
  num_items: int = 2000
  seed: int = 0
  num_categories: int = 48
  num_top_categories: int = 6
  brands_per_top: int = 8
  item_zipf: float = 1.0
  category_zipf: float = 0.7
  brand_zipf: float = 1.0
  category_concentration: float = 0.1
  brand_concentration: float = 0.1
  brand_loyalty: float = 0.7
  preference_weight: float = 0.25
  transition_next: float = 0.6
  transition_stay: float = 0.1
  transition_cross: float = 0.1
  mean_length: float = 10.0
  length_sigma: float = 1.0
  max_length: int = 200
  mean_gap_days: float = 7.0

  def __post_init__(self):
    def need(ok, what):
      if not ok:
        raise ValueError(f"synthetic generator: {what}")
    need(self.num_users >= 1, f"num_users={self.num_users}; expected >= 1")
    need(self.num_top_categories >= 1,
         f"num_top_categories={self.num_top_categories}; expected >= 1")
    need(self.num_categories >= self.num_top_categories,
         f"num_categories={self.num_categories}; expected >= "
         f"num_top_categories={self.num_top_categories}")
    need(self.num_items >= 2 * self.num_categories,
         f"num_items={self.num_items}; expected >= 2 * num_categories="
         f"{2 * self.num_categories} (no-repeat needs 2 items per category)")
    need(self.brands_per_top >= 1,
         f"brands_per_top={self.brands_per_top}; expected >= 1")
    for name in ("category_concentration", "brand_concentration",
                 "mean_gap_days"):
      need(getattr(self, name) > 0, f"{name}={getattr(self, name)}; "
           "expected > 0")
    for name in ("brand_loyalty", "preference_weight", "transition_next",
                 "transition_stay", "transition_cross"):
      need(0 <= getattr(self, name) <= 1,
           f"{name}={getattr(self, name)}; expected in [0, 1]")
    need(self.transition_next + self.transition_stay + self.transition_cross
         <= 1, "transition_next + transition_stay + transition_cross must be "
         "<= 1")
    need(3 < self.mean_length <= self.max_length,
         f"mean_length={self.mean_length}; expected in (3, max_length="
         f"{self.max_length}]")


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float):
  """Weights rank^-exponent over a random permutation of ranks 1..n."""
  return (rng.permutation(n) + 1.0) ** -exponent


class Catalog:
  """Item tables, the category process and the per-category item sampler.

  Items are 0-based here (vocabulary index - 1). Items are sorted by
  (leaf, brand) so each (leaf, brand) group is a contiguous range of a global
  cumulative popularity array: an item draw is a brand draw (O(brands per
  top)) then one binary search.
  """

  def __init__(self, config: SyntheticConfig):
    self.config = c = config
    rng = np.random.default_rng([c.seed, 1])
    n_top, n_leaf = c.num_top_categories, c.num_categories
    per_top = [n_leaf // n_top + (t < n_leaf % n_top) for t in range(n_top)]
    self.tops = text.build_taxonomy(
        n_top, per_top, random.Random(f"taxonomy:{c.seed}"))
    self.leaves = [dict(leaf, top=t) for t, top in enumerate(self.tops)
                   for leaf in top["leaves"]]
    self.leaf_top = np.array([l["top"] for l in self.leaves])
    first = np.cumsum([0] + per_top)
    # Routine chain: next leaf of the same top category, cyclically.
    self.leaf_next = np.array(
        [first[t] + (s - first[t] + 1) % per_top[t]
         for s, t in enumerate(self.leaf_top)])
    # A fixed complement in another top category (any other leaf if one top).
    self.leaf_partner = np.empty(n_leaf, dtype=np.int64)
    for s in range(n_leaf):
      if n_top > 1:
        others = np.flatnonzero(self.leaf_top != self.leaf_top[s])
      else:
        others = np.delete(np.arange(n_leaf), s)
      self.leaf_partner[s] = others[rng.integers(len(others))] if len(
          others) else s
    self.leaf_base = _zipf_weights(rng, n_leaf, c.category_zipf)
    self.leaf_base /= self.leaf_base.sum()
    self.leaf_base_cum = np.cumsum(self.leaf_base)

    n_brand_top = c.brands_per_top
    self.num_brands = n_brand_top * n_top  # brand b belongs to top b // n_bt
    self.brand_names = text.brand_names(
        self.num_brands, random.Random(f"brands:{c.seed}"))
    brand_base = np.concatenate([_zipf_weights(rng, n_brand_top, c.brand_zipf)
                                 for _ in range(n_top)])
    self.brand_base = brand_base / brand_base.sum()

    # Items: >= 2 per leaf, the rest uniform; brands by brand popularity.
    n = c.num_items
    leaf = np.concatenate([np.arange(n_leaf), np.arange(n_leaf),
                           rng.integers(n_leaf, size=n - 2 * n_leaf)])
    self.item_leaf = rng.permutation(leaf)
    self.item_brand = np.empty(n, dtype=np.int64)
    item_top = self.leaf_top[self.item_leaf]
    for t in range(n_top):
      idx = np.flatnonzero(item_top == t)
      p = brand_base[t * n_brand_top:(t + 1) * n_brand_top]
      self.item_brand[idx] = t * n_brand_top + rng.choice(
          n_brand_top, size=len(idx), p=p / p.sum())
    self.item_pop = _zipf_weights(rng, n, c.item_zipf)
    leaf_price = np.exp(rng.normal(np.log(20.0), 0.6, size=n_leaf))
    self.item_price = np.round(
        leaf_price[self.item_leaf] * np.exp(rng.normal(0, 0.3, size=n)), 2)

    key = self.item_leaf * self.num_brands + self.item_brand
    self._order = np.lexsort((-self.item_pop, key))
    sorted_key = key[self._order]
    self._cum = np.concatenate([[0.0], np.cumsum(self.item_pop[self._order])])
    groups = (np.arange(n_leaf)[:, None] * self.num_brands
              + (self.leaf_top * n_brand_top)[:, None]
              + np.arange(n_brand_top)[None, :])          # [C, brands/top]
    self._start = np.searchsorted(sorted_key, groups, side="left")
    self._end = np.searchsorted(sorted_key, groups, side="right")
    self._mass = self._cum[self._end] - self._cum[self._start]
    self.leaf_start, self.leaf_end = self._start[:, 0], self._end[:, -1]

  @property
  def num_items(self) -> int:
    return self.config.num_items

  def transition_row(self, leaf: int) -> np.ndarray:
    """P(next leaf | leaf) of the transition process (no user preference)."""
    c = self.config
    row = (1 - c.transition_next - c.transition_stay - c.transition_cross) \
        * self.leaf_base
    row[self.leaf_next[leaf]] += c.transition_next
    row[leaf] += c.transition_stay
    row[self.leaf_partner[leaf]] += c.transition_cross
    return row

  def draw_item(self, leaf: int, brand_weights: np.ndarray, r1: float,
                r2: float) -> int:
    """Item of `leaf` with probability ∝ popularity x brand_weights[brand].

    Args:
      leaf: sub-category index.
      brand_weights: [brands_per_top] weights of the brands of leaf's top.
      r1, r2: uniforms in [0, 1) choosing the brand and the item.

    Returns:
      0-based item index.
    """
    w = np.cumsum(self._mass[leaf] * brand_weights)
    j = int(np.searchsorted(w, r1 * w[-1], side="right"))
    if j >= len(w) or self._mass[leaf, j] <= 0:  # r1 * total rounded up
      j = int(np.flatnonzero(self._mass[leaf] > 0)[-1])
    lo = self._cum[self._start[leaf, j]]
    pos = int(np.searchsorted(self._cum, lo + r2 * self._mass[leaf, j],
                              side="right")) - 1
    pos = min(max(pos, self._start[leaf, j]), self._end[leaf, j] - 1)
    return int(self._order[pos])

  def item_title(self, i: int) -> str:
    return self.item_meta(i).title

  def item_meta(self, i: int) -> prepared.ItemMeta:
    """Metadata of 0-based item i, generated on demand (deterministic)."""
    leaf = self.leaves[self.item_leaf[i]]
    top = self.tops[leaf["top"]]
    brand = self.brand_names[self.item_brand[i]]
    rng = random.Random(self.config.seed * 1_000_003 + i)
    title, description = text.item_title_and_description(rng, top, leaf, brand)
    return prepared.ItemMeta(
        item_id=str(i + 1), title=title, brand=brand, description=description,
        categories=[top["name"], leaf["mid"], leaf["name"]],
        price=float(self.item_price[i]))

  def items_mapping(self) -> Mapping[str, prepared.ItemMeta]:
    return _LazyItems(self)


class _LazyItems(collections.abc.Mapping):
  """Raw id -> ItemMeta built on access, so no item texts are held."""

  def __init__(self, catalog: Catalog):
    self._catalog = catalog

  def __getitem__(self, raw_id: str) -> prepared.ItemMeta:
    i = int(raw_id) - 1 if str(raw_id).isdigit() else -1
    if not 0 <= i < self._catalog.num_items:
      raise KeyError(raw_id)
    return self._catalog.item_meta(i)

  def __iter__(self):
    return (str(i + 1) for i in range(self._catalog.num_items))

  def __len__(self):
    return self._catalog.num_items


@dataclasses.dataclass
class SyntheticUser:
  """One simulated user with the latent truth behind the record.

  Attributes:
    record: what is written (raw item ids are vocabulary indices as strings).
    items: [L] 0-based items.
    leaves: [L] sub-category of each item.
    causes: [L] why each sub-category was chosen (one of _CAUSES; the first
      is always "preference").
    category_preference: [C] the user's true sub-category preference.
    brand_affinity: [num_brands] the user's true brand affinity.
  """
  record: prepared.UserRecord
  items: np.ndarray
  leaves: np.ndarray
  causes: List[str]
  category_preference: np.ndarray
  brand_affinity: np.ndarray


def _sparse_dirichlet(rng: np.random.Generator, alpha: np.ndarray):
  p = np.nan_to_num(rng.dirichlet(alpha))
  if p.sum() <= 0:  # every gamma draw underflowed: put all mass on one
    p = np.zeros_like(alpha)
    p[rng.choice(len(alpha), p=alpha / alpha.sum())] = 1.0
  return p / p.sum()


def simulate_user(catalog: Catalog, u: int) -> SyntheticUser:
  """Simulates user u (0-based) from its own random stream."""
  c = catalog.config
  rng = np.random.default_rng([c.seed, 2, u])
  n_leaf = c.num_categories
  pref = _sparse_dirichlet(
      rng, c.category_concentration * n_leaf * catalog.leaf_base)
  aff = _sparse_dirichlet(
      rng, c.brand_concentration * catalog.num_brands * catalog.brand_base)
  pref_cum = np.cumsum(pref)
  brand_w = (c.brand_loyalty * aff + (1 - c.brand_loyalty)
             / catalog.num_brands).reshape(c.num_top_categories, -1)
  # 3 + floor(lognormal) has mean ~ mean_length (floor costs ~0.5).
  mu = np.log(c.mean_length - 3 + 0.5) - c.length_sigma ** 2 / 2
  length = int(min(c.max_length,
                   3 + np.floor(rng.lognormal(mu, c.length_sigma))))

  r = rng.random((length, 4))
  t_next = c.transition_next
  t_stay = t_next + c.transition_stay
  t_cross = t_stay + c.transition_cross
  items, leaves, causes = [], [], []
  prev_item, leaf = -1, -1
  for k in range(length):
    x = r[k, 0]
    if k == 0 or x < c.preference_weight:
      cause = "preference"
      leaf = int(np.searchsorted(pref_cum, r[k, 1] * pref_cum[-1], "right"))
      leaf = min(leaf, n_leaf - 1)
    else:
      x = (x - c.preference_weight) / (1 - c.preference_weight)
      if x < t_next:
        cause, leaf = "routine", int(catalog.leaf_next[leaf])
      elif x < t_stay:
        cause = "same"
      elif x < t_cross:
        cause, leaf = "complement", int(catalog.leaf_partner[leaf])
      else:
        cause = "browse"
        leaf = min(n_leaf - 1, int(np.searchsorted(
            catalog.leaf_base_cum, r[k, 1] * catalog.leaf_base_cum[-1],
            "right")))
    bw = brand_w[catalog.leaf_top[leaf]]
    item = catalog.draw_item(leaf, bw, r[k, 2], r[k, 3])
    tries = 0
    while item == prev_item and tries < 20:
      item = catalog.draw_item(leaf, bw, *rng.random(2))
      tries += 1
    if item == prev_item:  # a leaf dominated by one item: take a neighbour
      lo, hi = catalog.leaf_start[leaf], catalog.leaf_end[leaf]
      pos = lo + rng.integers(hi - lo - 1)
      item = int(catalog._order[pos])  # pylint: disable=protected-access
      if item == prev_item:
        item = int(catalog._order[hi - 1])  # pylint: disable=protected-access
    items.append(item)
    leaves.append(leaf)
    causes.append(cause)
    prev_item = item

  gaps = 3600 + rng.exponential(c.mean_gap_days * 86_400, size=length)
  start = _EPOCH_START + int(rng.integers(_FIVE_YEARS))
  timestamps = (start + np.cumsum(gaps.astype(np.int64))).tolist()

  text_rng = random.Random(int(rng.integers(2 ** 62)))
  critiques = [""] + [
      text.critique(text_rng, catalog.leaves[leaves[k]]["name"])
      if leaves[k] != leaves[k - 1] else "" for k in range(1, length)]
  record = prepared.UserRecord(
      user_id=str(u + 1), item_ids=[str(i + 1) for i in items],
      timestamps=timestamps, critiques=critiques,
      narratives=_narratives(catalog, items, leaves, causes, pref, aff))
  return SyntheticUser(record, np.array(items), np.array(leaves), causes,
                       pref, aff)


def _narratives(catalog, items, leaves, causes, pref, aff) -> Dict[str, str]:
  """User summary, last purchase reason and endorsement from the truth."""
  def top_k(p, k):
    order = np.argpartition(-p, k)[:k]  # O(C), not a full sort per user
    order = order[np.argsort(-p[order], kind="stable")]
    return [int(j) for j in order if p[j] >= 0.1] or [int(order[0])]
  fav_leaves, fav_brands = top_k(pref, 3), top_k(aff, 2)
  summary = text.user_summary(
      [catalog.leaves[s]["name"] for s in fav_leaves],
      [catalog.tops[catalog.leaves[s]["top"]]["name"] for s in fav_leaves],
      [catalog.brand_names[b] for b in fav_brands])
  last, leaf = items[-1], leaves[-1]
  brand = int(catalog.item_brand[last])
  reason = text.purchase_reason(
      causes[-1], catalog.leaves[leaf]["name"],
      catalog.leaves[leaves[-2]]["head"], catalog.brand_names[brand],
      loyal=brand in fav_brands)
  endorsement = text.endorsement(catalog.item_title(last),
                                 catalog.leaves[leaf]["name"],
                                 catalog.brand_names[brand])
  return {"user_summary": summary, "purchase_reason": reason,
          "endorsement": endorsement}


def iter_users(catalog: Catalog) -> Iterator[SyntheticUser]:
  """Simulates users 0..num_users-1 one at a time."""
  for u in range(catalog.config.num_users):
    yield simulate_user(catalog, u)


def generate(output_dir: str, *, num_users: int = 20000, num_items: int = 2000,
             seed: int = 0, num_shards: int = 1,
             text_vocab_size: Optional[int] = 2000, **options) -> dict:
  """Generates a synthetic prepared dataset into `output_dir`.

  Args:
    output_dir: directory to write (see prepared.py for its contents).
    num_users, num_items, seed: sizes and seed; same seed, same bytes.
    num_shards: TFRecord shards of sequences.
    text_vocab_size: SentencePiece vocabulary trained on item texts (None to
      skip).
    **options: any other SyntheticConfig field, e.g. num_categories=12.

  Returns:
    The stats dict written to stats.json (with a "generator" entry).
  """
  fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise TypeError(f"generate(): unknown option(s) {unknown}; expected some "
                    f"of {sorted(fields - {'num_users', 'num_items', 'seed'})}")
  config = SyntheticConfig(num_users=num_users, num_items=num_items, seed=seed,
                           **options)
  catalog = Catalog(config)
  generator = dict(dataclasses.asdict(config), name="recsys_jax.synthetic")
  generator["categories"] = [
      " > ".join([catalog.tops[l["top"]]["name"], l["mid"], l["name"]])
      for l in catalog.leaves]
  return prepared.write_prepared(
      output_dir, (su.record for su in iter_users(catalog)),
      catalog.items_mapping(),
      vocab=[str(i + 1) for i in range(num_items)],
      source={"format": "synthetic", "seed": seed},
      num_shards=num_shards, text_vocab_size=text_vocab_size,
      extra_stats={"generator": generator})


def next_item_baselines(sequences: Iterable[np.ndarray], num_items: int,
                        k: int = 10) -> Dict[str, float]:
  """HR@k / NDCG@k of popularity and first-order Markov at the last item.

  Both count on train prefixes (every sequence minus its last item) and rank
  all items 1..num_items (nothing excluded). Markov scores the transition
  counts from the second-to-last item, ties broken by popularity; popularity
  ties by item index.

  Args:
    sequences: per-user vocabulary indices (1..num_items), time order.
    num_items: N.
    k: cut-off.

  Returns:
    {"users", "popularity_hr", "popularity_ndcg", "markov_hr", "markov_ndcg"}.
  """
  seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= 2]
  prefixes = [s[:-1] for s in seqs]
  pop = np.bincount(np.concatenate(prefixes), minlength=num_items + 1)
  pop = pop.astype(np.float64)
  pop[0] = -1.0
  src = np.concatenate([p[:-1] for p in prefixes])
  dst = np.concatenate([p[1:] for p in prefixes])
  by_src = np.argsort(src, kind="stable")
  src, dst = src[by_src], dst[by_src]
  ids = np.arange(num_items + 1)

  def rank(scores, target):
    # Strict order: higher score first, then lower item index.
    t = scores[target]
    return int(np.sum(scores > t) + np.sum((scores == t) & (ids < target)))

  out = {"popularity_hr": 0.0, "popularity_ndcg": 0.0, "markov_hr": 0.0,
         "markov_ndcg": 0.0}
  for s in seqs:
    prev, target = s[-2], s[-1]
    lo, hi = np.searchsorted(src, [prev, prev + 1])
    counts = np.bincount(dst[lo:hi], minlength=num_items + 1)
    markov = counts * (pop.max() + 2.0) + pop
    for name, scores in (("popularity", pop), ("markov", markov)):
      r = rank(scores, target)
      if r < k:
        out[name + "_hr"] += 1.0
        out[name + "_ndcg"] += 1.0 / np.log2(r + 2)
  out = {key: float(v / len(seqs)) for key, v in out.items()}
  out["users"] = len(seqs)
  return out


_CLI_INTS = ("num_users", "num_items", "num_categories", "num_top_categories",
             "brands_per_top", "seed", "num_shards", "text_vocab_size")


def main(argv: Optional[List[str]] = None):
  """Generates a dataset and prints its size, time, peak RSS and baselines."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
  for name in _CLI_INTS:
    parser.add_argument("--" + name, type=int)
  parser.add_argument("--baselines", action="store_true",
                      help="print popularity / Markov HR@10 and NDCG@10")
  args = parser.parse_args(argv)
  kwargs = dict(PRESETS[args.preset])
  for name in _CLI_INTS:
    if getattr(args, name) is not None:
      kwargs[name] = getattr(args, name)
  if kwargs.get("text_vocab_size") == 0:
    kwargs["text_vocab_size"] = None
  start = time.time()
  stats = generate(args.output_dir, **kwargs)
  seconds = time.time() - start
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"users={stats['users']} items={stats['items']} "
        f"interactions={stats['interactions']} "
        f"length={stats['sequence_length']}")
  print(f"generate: {seconds:.1f} s, peak RSS {rss_mib:.0f} MiB")
  if args.baselines:
    data = prepared.PreparedDataset(args.output_dir)
    seqs = [f[prepared.ITEM_IDS] for f in data.iter_sequences()]
    print(next_item_baselines(seqs, stats["items"]))


if __name__ == "__main__":
  main(sys.argv[1:])
