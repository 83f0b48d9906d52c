"""Raw-format readers: each turns one source into `UserRecord`s and `ItemMeta`.

Every reader returns `(users, items, source)`:
  users   iterable of `prepared.UserRecord`, each sequence time-ordered and
          carrying `source=(path, line)`;
  items   raw item id -> `prepared.ItemMeta`, or None without metadata;
  source  description of the inputs for stats.json. A reader that removes
          records by design (Amazon's k-core) puts the counts under
          source["extra_stats"]; `prepare` moves them to stats.json's top level.
Problems are reported to a `bad_input.BadInputPolicy` (error or counted skip).
"""

from recsys_jax.data.readers.amazon import kcore_filter
from recsys_jax.data.readers.amazon import read_amazon
from recsys_jax.data.readers.item_metadata import read_item_metadata
from recsys_jax.data.readers.movielens import read_movielens
from recsys_jax.data.readers.regen import read_regen
from recsys_jax.data.readers.sequence_file import read_sequence_file

__all__ = ["kcore_filter", "read_amazon", "read_item_metadata",
           "read_movielens", "read_regen", "read_sequence_file"]
