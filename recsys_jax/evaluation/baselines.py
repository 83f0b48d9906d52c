"""Non-neural baselines scored per user: EASE and a first-order Markov chain.

Both are fitted on the TRAIN split the models see (leave-one-out: each
user's items but the last two, cold items removed under the cold-item
protocol; `read_train_sequences`) and score an evaluation row from its
history (`item_ids`, the same input the model gets: the last L - 1 items),
returning `[B, N]` scores that `evaluator.Evaluator` ranks exactly like a
model's (same protocol, history exclusion, pessimistic ties, buckets).

* EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): with the binary
  user x item matrix X of the train split, P = (X^T X + l2 I)^-1 and
  B = I - P diag(1 / diag(P)), i.e. B_ij = -P_ij / P_jj off the diagonal
  and 0 on it; a user's scores are x_u B (x_u: the multi-hot history).
  The Gram matrix and its inverse are dense N x N float32 (4 N^2 bytes,
  ~N^3 flops for the Cholesky inverse), so `EvalConfig.ease_max_items`
  bounds N; items never trained on get all-zero weights.
* Markov: C_ij = number of consecutive pairs (i, j) in the train sequences;
  a user whose last history item is i scores item j as C_ij plus a
  popularity tie-break in [0, 1) (`popularity_tie_break`), which orders
  items of equal count by training popularity without ever overriding a
  count; a user whose last item has no outgoing pair (or who has no
  history) is therefore ranked by popularity.
"""

import functools
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import sparse
from scipy.linalg import lapack

BASELINES = ("popularity", "ease", "markov")


# -- the train split ----------------------------------------------------------


@functools.lru_cache(maxsize=4)
def read_train_sequences(data_dir: str, cold_item_fraction: float = 0.0,
                         cold_item_seed: int = 0
                         ) -> Tuple[np.ndarray, ...]:
  """Each user's train sequence (items[:-2], cold items removed), int64.

  The same split as `sequence_data.train_item_counts` (the popularity
  counts) and the train task; users left empty are dropped. Cached: do not
  modify the arrays.
  """
  # pylint: disable=g-import-not-at-top
  from recsys_jax.data import prepared
  from recsys_jax.input_pipeline import cold_items as cold_items_lib
  ds = prepared.PreparedDataset(data_dir)
  cold = np.zeros(0, np.int64)
  if cold_item_fraction > 0:
    cold = cold_items_lib.cold_items(ds.num_items, cold_item_fraction,
                                     cold_item_seed)
  out = []
  for user in ds.iter_sequences():
    ids = np.asarray(user[prepared.ITEM_IDS][:-2], np.int64)
    if cold.size:
      ids = ids[~np.isin(ids, cold)]
    if ids.size:
      out.append(ids)
  return tuple(out)


def train_sequences_of(data) -> Tuple[Optional[Sequence[np.ndarray]], str]:
  """(train sequences, '') of a run's data object, or (None, why not).

  A data object may offer `train_sequences()`; otherwise they are read from
  its `data_dir` with its cold-item settings (a `MixtureData` answers with
  its evaluation entry's). The sequences must give the same item counts as
  `data.train_item_counts()` (the popularity baseline's): a data object
  whose train split is not items[:-2] is refused rather than fitted on the
  wrong interactions.
  """
  getter = getattr(data, "train_sequences", None)
  if callable(getter):
    return list(getter()), ""
  try:
    source = data.eval_data  # MixtureData: its evaluation entry
  except (AttributeError, ValueError):
    source = data
  data_dir = getattr(source, "data_dir", None)
  if not data_dir:
    return None, (f"the data object ({type(data).__name__}) has neither "
                  "train_sequences() nor a data_dir to read them from")
  try:
    seqs = read_train_sequences(
        str(data_dir), float(getattr(source, "cold_item_fraction", 0.0)),
        int(getattr(source, "cold_item_seed", 0)))
  except Exception as e:  # pylint: disable=broad-except
    return None, (f"could not read the train sequences of {data_dir}: "
                  f"{type(e).__name__}: {e}")
  return seqs, ""


def item_counts_of(sequences: Sequence[np.ndarray], num_items: int
                   ) -> np.ndarray:
  """[N] occurrences of items 1..N in `sequences`."""
  flat = _concat(sequences)
  return np.bincount(flat, minlength=num_items + 1)[1:num_items + 1]


def check_counts(sequences: Sequence[np.ndarray], item_counts: np.ndarray
                 ) -> str:
  """'' when `sequences` count like `item_counts`, else why not."""
  n = len(item_counts)
  flat = _concat(sequences)
  if flat.size and (flat.min() < 1 or flat.max() > n):
    return (f"the train sequences hold item ids outside 1..{n} (the "
            "catalogue of data.train_item_counts())")
  ours = item_counts_of(sequences, n)
  differ = int((ours != np.asarray(item_counts)).sum())
  if differ:
    return (f"the train sequences count {differ} of {n} items differently "
            "from data.train_item_counts(); the baselines would be fitted on "
            "other interactions than the popularity baseline")
  return ""


def _concat(sequences: Sequence[np.ndarray]) -> np.ndarray:
  if not len(sequences):
    return np.zeros(0, np.int64)
  return np.concatenate([np.asarray(s, np.int64) for s in sequences])


# -- history features ---------------------------------------------------------


def history_matrix(item_ids: np.ndarray, num_items: int) -> sparse.csr_matrix:
  """[B, N] binary float32 CSR of each row's items in 1..N (padding 0,
  [MASK] N + 1 and repeats ignored)."""
  ids = np.asarray(item_ids, np.int64)
  rows, cols = np.nonzero((ids >= 1) & (ids <= num_items))
  m = sparse.csr_matrix(
      (np.ones(rows.size, np.float32), (rows, ids[rows, cols] - 1)),
      shape=(ids.shape[0], num_items))
  m.sum_duplicates()
  m.data[:] = 1.0
  return m


def last_items(item_ids: np.ndarray, num_items: int) -> np.ndarray:
  """[B] the last id in 1..N of each row (the item before the [MASK] in an
  evaluation row), 0 for a row without one."""
  ids = np.asarray(item_ids, np.int64)
  ok = (ids >= 1) & (ids <= num_items)
  if ids.shape[1] == 0:
    return np.zeros(ids.shape[0], np.int64)
  pos = ids.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
  last = ids[np.arange(ids.shape[0]), pos]
  return np.where(ok.any(axis=1), last, 0)


def popularity_tie_break(item_counts: np.ndarray) -> np.ndarray:
  """[N] log1p(count) / (log1p(max count) + 1): increasing in the count,
  in [0, 1 - 1 / (log1p(max) + 1)], so adding it to integer counts orders
  their ties by popularity and never reorders different counts (the gap
  to 1 stays far above float32 rounding)."""
  c = np.log1p(np.maximum(np.asarray(item_counts, np.float64), 0.0))
  return c / (c.max(initial=0.0) + 1.0)


# -- EASE ---------------------------------------------------------------------


def interaction_matrix(sequences: Sequence[np.ndarray], num_items: int
                       ) -> sparse.csr_matrix:
  """[U, N] binary float32 CSR: X_ui = 1 if user u has item i (any count)."""
  lengths = np.array([len(s) for s in sequences], np.int64)
  cols = _concat(sequences) - 1
  rows = np.repeat(np.arange(len(sequences)), lengths)
  x = sparse.csr_matrix((np.ones(cols.size, np.float32), (rows, cols)),
                        shape=(len(sequences), num_items))
  x.sum_duplicates()
  x.data[:] = 1.0
  return x


def ease_memory_bytes(num_items: int) -> int:
  """The dense float32 N x N matrix EASE holds (Gram, then inverse, then
  weights, in place)."""
  return 4 * int(num_items) ** 2


def _symmetrize_from_lower(a: np.ndarray, block: int = 1024) -> None:
  """Copies the lower triangle onto the upper, in place, by row blocks."""
  n = a.shape[0]
  for r0 in range(0, n, block):
    r1 = min(n, r0 + block)
    a[r0:r1, r1:] = a[r1:, r0:r1].T
    diag = a[r0:r1, r0:r1]
    upper = np.triu_indices(r1 - r0, 1)
    diag[upper] = diag.T[upper]


def spd_inverse_(a: np.ndarray) -> np.ndarray:
  """Inverse of a symmetric positive definite matrix by Cholesky (LAPACK
  potrf + potri: N^3 flops, half of an LU inverse), overwriting `a` when it
  is C- or F-contiguous float32/float64; returns the (symmetric) inverse."""
  # A C-contiguous symmetric matrix is its own F-contiguous transpose, so
  # LAPACK works in a's memory.
  f = a.T if a.flags.c_contiguous else a
  potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (f,))
  c, info = potrf(f, lower=True, overwrite_a=True, clean=False)
  if info != 0:
    raise np.linalg.LinAlgError(
        f"EASE: X^T X + l2 I is not positive definite (Cholesky info "
        f"{info}); use a larger EvalConfig.ease_l2")
  inv, info = potri(c, lower=True, overwrite_c=True)
  if info != 0:
    raise np.linalg.LinAlgError(f"EASE: Cholesky inverse failed (info {info})")
  _symmetrize_from_lower(inv)
  return inv


def ease_weights(x: Any, l2: float) -> np.ndarray:
  """EASE's item-item weights B [N, N] float32 (zero diagonal).

  Args:
    x: [U, N] user x item matrix (dense or scipy sparse), binary for EASE.
    l2: the L2 penalty lambda > 0.

  Returns:
    B = I - P diag(1 / diag(P)), P = (X^T X + l2 I)^-1: B_ij = -P_ij / P_jj,
    B_jj = 0. Computed in float32 (the Gram matrix's integer entries are
    exact below 2^24; the inverse's relative error is ~1e-7 times the
    condition number, at most (largest eigenvalue of X^T X + l2) / l2).
  """
  if not l2 > 0:
    raise ValueError(f"EASE l2={l2!r}: expected > 0")
  if sparse.issparse(x):
    g = (x.T @ x).astype(np.float32).toarray()
  else:
    x = np.asarray(x, np.float32)
    g = x.T @ x
  g = np.ascontiguousarray(g, np.float32)
  g[np.diag_indices_from(g)] += np.float32(l2)
  p = spd_inverse_(g)
  if not p.flags.c_contiguous:
    # P is symmetric: its transpose is the same matrix, in C order (what
    # sparse @ dense scoring reads without a copy).
    p = p.T
  d = np.diag(p).copy()
  p /= -d[None, :]
  np.fill_diagonal(p, 0.0)
  return p


class EASE:
  """EASE fitted on train sequences; `score_history(item_ids) -> [B, N]`."""

  name = "ease"

  def __init__(self, sequences: Sequence[np.ndarray], num_items: int,
               l2: float):
    t0 = time.perf_counter()
    self.num_items, self.l2 = int(num_items), float(l2)
    self.num_users = len(sequences)
    self.weights = ease_weights(interaction_matrix(sequences, num_items), l2)
    self.fit_seconds = time.perf_counter() - t0

  def score_history(self, item_ids: np.ndarray) -> np.ndarray:
    """[B, N] float32: x_u B for each row's multi-hot history."""
    return np.asarray(history_matrix(item_ids, self.num_items) @ self.weights,
                      np.float32)

  def describe(self) -> Dict[str, Any]:
    return {"l2": self.l2, "num_items": self.num_items,
            "train_users": self.num_users, "dtype": "float32",
            "fit_seconds": round(self.fit_seconds, 3)}


# -- Markov chain -------------------------------------------------------------


def transition_counts(sequences: Sequence[np.ndarray], num_items: int
                      ) -> sparse.csr_matrix:
  """[N, N] float32 CSR: entry (i - 1, j - 1) counts the pairs (i, j) of
  consecutive items in the sequences."""
  src = [np.asarray(s[:-1], np.int64) for s in sequences if len(s) > 1]
  dst = [np.asarray(s[1:], np.int64) for s in sequences if len(s) > 1]
  rows, cols = _concat(src) - 1, _concat(dst) - 1
  # Duplicate (row, col) entries are summed into counts.
  return sparse.csr_matrix(
      (np.ones(rows.size, np.float32), (rows, cols)),
      shape=(num_items, num_items))


class MarkovChain:
  """First-order item transitions; `score_history(item_ids) -> [B, N]`."""

  name = "markov"

  def __init__(self, sequences: Sequence[np.ndarray], num_items: int,
               item_counts: np.ndarray):
    t0 = time.perf_counter()
    self.num_items = int(num_items)
    self.counts = transition_counts(sequences, num_items)
    self.tie_break = popularity_tie_break(item_counts).astype(np.float32)
    self.fit_seconds = time.perf_counter() - t0

  def score_history(self, item_ids: np.ndarray) -> np.ndarray:
    """[B, N] float32: count(last item -> j) + popularity tie-break."""
    last = last_items(item_ids, self.num_items)
    rows = self.counts[np.maximum(last, 1) - 1].toarray()
    rows[last == 0] = 0.0
    return rows + self.tie_break[None, :]

  def describe(self) -> Dict[str, Any]:
    return {"transitions": int(self.counts.sum()),
            "distinct_pairs": int(self.counts.nnz),
            "tie_break": "log1p(train count) / (log1p(max count) + 1)",
            "fit_seconds": round(self.fit_seconds, 3)}


# -- fitting what a config asks for ------------------------------------------


class Skipped:
  """A baseline that could not be fitted, and why (recorded in results)."""

  def __init__(self, reason: str):
    self.reason = reason


def fit(names: Sequence[str], data, item_counts: np.ndarray, *,
        ease_l2: float, ease_max_items: int,
        log=print) -> Dict[str, Any]:
  """{name: fitted baseline or Skipped} for 'ease' / 'markov' in `names`.

  A baseline that cannot be fitted (the data offers no train sequences, or
  EASE's catalogue exceeds `ease_max_items`) is Skipped with the reason,
  logged, so that the model's evaluation still completes.
  """
  wanted = [n for n in names if n in ("ease", "markov")]
  if not wanted:
    return {}
  num_items = len(item_counts)
  seqs, why = train_sequences_of(data)
  if seqs is not None:
    why = check_counts(seqs, item_counts)
  out: Dict[str, Any] = {}
  for name in wanted:
    if why:
      out[name] = Skipped(why)
    elif name == "ease" and num_items > ease_max_items:
      out[name] = Skipped(
          f"N={num_items} items > EvalConfig.ease_max_items="
          f"{ease_max_items}: EASE needs a dense N x N float32 matrix "
          f"({ease_memory_bytes(num_items) / 2**30:.1f} GiB) and ~N^3 "
          "flops; raise ease_max_items if the host allows (docs/"
          "EVALUATION.md)")
    elif name == "ease":
      out[name] = EASE(seqs, num_items, ease_l2)
    else:
      out[name] = MarkovChain(seqs, num_items, item_counts)
    fitted = out[name]
    if isinstance(fitted, Skipped):
      log(f"WARNING: baseline {name} skipped: {fitted.reason}")
    else:
      log(f"Baseline {name}: fitted on {len(seqs)} train sequences, "
          f"{num_items} items in {fitted.fit_seconds:.2f} s")
  return out


def names_in_order(names: Sequence[str]) -> List[str]:
  """`names` checked against BASELINES (no repeats), in the given order."""
  if isinstance(names, str):
    raise ValueError(f"EvalConfig.baselines={names!r}: expected a tuple of "
                     f"names from {BASELINES}, e.g. ('popularity', 'ease')")
  out = [str(n) for n in names]
  unknown = [n for n in out if n not in BASELINES]
  if unknown or len(set(out)) != len(out):
    raise ValueError(f"EvalConfig.baselines={tuple(names)!r}: expected "
                     f"distinct names from {BASELINES}")
  return out
