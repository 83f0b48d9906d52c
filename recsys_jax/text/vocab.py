"""Text vocabularies for the item-text encoders: WordPiece (BERT) and SentencePiece (T5).

seqio 0.0.20's `BertWordPieceVocabulary` wraps tensorflow_text and its
`encode` returns a padded `[words, pieces]` array rather than a flat id list,
and its normalisation differs from HF on control characters and special
tokens; so WordPiece here is a pure-Python re-implementation of HF
`BertTokenizer` (BasicTokenizer + greedy longest-match-first WordPiece),
wrapped as a `seqio.Vocabulary`.
"""

import hashlib
import json
import os
import re
import unicodedata
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

VOCAB_TXT = "vocab.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPM_NAMES = ("spiece.model", "spm.model", "sentencepiece.model")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def file_sha256(path: str) -> str:
  """Hex sha256 of a file's bytes (streamed)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _is_whitespace(ch: str) -> bool:
  if ch in (" ", "\t", "\n", "\r"):
    return True
  return unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  if ch in ("\t", "\n", "\r"):
    return False
  return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # All non-letter/number ASCII counts as punctuation (e.g. '$', '`', '^').
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or
          0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F or
          0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or
          0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


# ASCII fast paths (most item text): controls dropped, \t\n\r -> space;
# every printable non-alphanumeric ASCII character is punctuation.
_ASCII_CLEAN = {c: None for c in list(range(0, 32)) + [127]}
_ASCII_CLEAN.update({ord("\t"): " ", ord("\n"): " ", ord("\r"): " "})
_ASCII_PUNCT_SPLIT = re.compile(r"([!-/:-@\[-`{-~])")


def _clean_char(ch: str) -> str:
  """What BERT's text cleaning and CJK spacing turn one character into."""
  cp = ord(ch)
  if cp == 0 or cp == 0xFFFD or _is_control(ch):
    return ""
  if _is_whitespace(ch):
    return " "
  if _is_cjk(cp):
    return f" {ch} "
  return ch


class WordPieceTokenizer:
  """HF `BertTokenizer` text -> word pieces, without special tokens.

  Attributes:
    vocab: token -> id (line number in vocab.txt).
    lower_case: lowercase and strip accents (uncased models).
  """

  def __init__(self, vocab_file: str, *, lower_case: bool = True,
               unk_token: str = "[UNK]", max_input_chars_per_word: int = 100):
    self.vocab_file = vocab_file
    self.lower_case = lower_case
    self.unk_token = unk_token
    self.max_input_chars_per_word = max_input_chars_per_word
    self.vocab = {}
    with open(vocab_file, "r", encoding="utf-8") as f:
      for i, line in enumerate(f):
        token = line.rstrip("\n")
        # First occurrence wins, as in HF's load_vocab for id lookups.
        self.vocab.setdefault(token, i)
        last = i
    self.size = last + 1 if self.vocab else 0
    if unk_token not in self.vocab:
      raise ValueError(f"{vocab_file}: no {unk_token!r} line; expected a BERT "
                       "WordPiece vocab.txt (one token per line)")
    self.inv_vocab = {i: t for t, i in self.vocab.items()}
    self.special = tuple(t for t in SPECIAL_TOKENS if t in self.vocab)
    # Words repeat a lot across item texts; memoising WordPiece per word
    # roughly halves tokenisation time on catalogue-sized inputs.
    self._cache = {}
    self._char_cache = {}

  def _clean(self, text: str) -> str:
    if text.isascii():
      return text.translate(_ASCII_CLEAN)
    out = []
    for ch in text:
      rep = self._char_cache.get(ch)
      if rep is None:
        rep = self._char_cache[ch] = _clean_char(ch)
      out.append(rep)
    return "".join(out)

  def _basic(self, text: str) -> List[str]:
    text = self._clean(text)
    if not text.isascii():
      text = unicodedata.normalize("NFC", text)
    words = []
    for word in text.split():
      if word.isascii():
        if self.lower_case:
          word = word.lower()
        if word.isalnum():
          words.append(word)
        else:
          words.extend(p for p in _ASCII_PUNCT_SPLIT.split(word) if p)
        continue
      if self.lower_case:
        word = word.lower()
        word = "".join(c for c in unicodedata.normalize("NFD", word)
                       if unicodedata.category(c) != "Mn")
      current = []
      for ch in word:
        if _is_punctuation(ch):
          if current:
            words.append("".join(current))
            current = []
          words.append(ch)
        else:
          current.append(ch)
      if current:
        words.append("".join(current))
    return words

  def _wordpiece(self, word: str) -> List[str]:
    pieces = self._cache.get(word)
    if pieces is None:
      pieces = self._wordpiece_uncached(word)
      if len(self._cache) < 1_000_000:
        self._cache[word] = pieces
    return pieces

  def _wordpiece_uncached(self, word: str) -> List[str]:
    if len(word) > self.max_input_chars_per_word:
      return [self.unk_token]
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      piece = None
      while start < end:
        sub = word[start:end]
        if start > 0:
          sub = "##" + sub
        if sub in self.vocab:
          piece = sub
          break
        end -= 1
      if piece is None:
        return [self.unk_token]
      pieces.append(piece)
      start = end
    return pieces

  def _split_special(self, text: str) -> List[Tuple[str, bool]]:
    """Splits out literal special tokens ([MASK], ...) as HF does."""
    parts = [(text, False)]
    for tok in self.special:
      new = []
      for chunk, is_special in parts:
        if is_special or tok not in chunk:
          new.append((chunk, is_special))
          continue
        pieces = chunk.split(tok)
        for j, piece in enumerate(pieces):
          if j:
            new.append((tok, True))
          if piece:
            new.append((piece, False))
      parts = new
    return parts

  def tokenize(self, text: str) -> List[str]:
    """Text -> word-piece strings (no [CLS]/[SEP])."""
    out = []
    for chunk, is_special in self._split_special(text):
      if is_special:
        out.append(chunk)
        continue
      for word in self._basic(chunk):
        out.extend(self._wordpiece(word))
    return out

  def encode(self, text: str) -> List[int]:
    return [self.vocab[t] for t in self.tokenize(text)]

  def decode(self, ids: Iterable[int]) -> str:
    tokens = [self.inv_vocab.get(int(i), self.unk_token) for i in ids]
    return " ".join(tokens).replace(" ##", "").strip()


class WordPieceVocabulary(seqio.Vocabulary):
  """A BERT vocab.txt as a seqio vocabulary (HF BertTokenizer-compatible).

  `encode` gives word pieces without special tokens; `bos_id` is [CLS] and
  `eos_id` is [SEP]; `encode_batch` adds them for the encoder.
  """

  def __init__(self, vocab_file: str, *, lower_case: bool = True):
    self._tok = WordPieceTokenizer(vocab_file, lower_case=lower_case)
    self.vocab_file = vocab_file
    super().__init__(extra_ids=0)

  @property
  def tokenizer(self) -> WordPieceTokenizer:
    return self._tok

  @property
  def lower_case(self) -> bool:
    return self._tok.lower_case

  @property
  def pad_id(self) -> int:
    return self._tok.vocab.get("[PAD]", 0)

  @property
  def bos_id(self) -> Optional[int]:
    return self._tok.vocab.get("[CLS]")

  @property
  def eos_id(self) -> Optional[int]:
    return self._tok.vocab.get("[SEP]")

  @property
  def unk_id(self) -> Optional[int]:
    return self._tok.vocab[self._tok.unk_token]

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.size

  def _encode(self, s: str) -> Sequence[int]:
    return self._tok.encode(s)

  def _decode(self, ids) -> str:
    specials = {self.pad_id, self.bos_id, self.eos_id}
    return self._tok.decode(i for i in ids if int(i) not in specials)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar tf.string -> 1-D int32 ids (runs the Python tokenizer)."""
    def enc(x):
      return np.asarray(self._tok.encode(x.numpy().decode("utf-8")), np.int32)
    out = tf.py_function(enc, [s], tf.int32)
    out.set_shape([None])
    return out

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def dec(x):
      return self._decode(x.numpy().tolist()).encode("utf-8")
    out = tf.py_function(dec, [ids], tf.string)
    out.set_shape([])
    return out

  def __eq__(self, other):
    return (isinstance(other, WordPieceVocabulary) and
            self._tok.vocab == other.tokenizer.vocab and
            self.lower_case == other.lower_case)

  def __hash__(self):
    return hash((self.vocab_file, self.lower_case))


def _lower_case_from_config(directory: str, default: bool = True) -> bool:
  path = os.path.join(directory, TOKENIZER_CONFIG)
  if not os.path.exists(path):
    return default
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
  value = cfg.get("do_lower_case", default)
  if not isinstance(value, bool):
    raise ValueError(f"{path}: key 'do_lower_case' is {value!r}; expected "
                     "true or false")
  return value


def resolve_vocab_path(path: str) -> str:
  """A vocabulary file: `path` itself or the known file inside a directory."""
  if os.path.isdir(path):
    for name in (VOCAB_TXT,) + SPM_NAMES:
      candidate = os.path.join(path, name)
      if os.path.exists(candidate):
        return candidate
    raise FileNotFoundError(
        f"{path}: no vocabulary file; expected one of "
        f"{[VOCAB_TXT, *SPM_NAMES]} in this directory")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: vocabulary file not found")
  return path


def load_text_vocab(path: str, *, lower_case: Optional[bool] = None
                    ) -> seqio.Vocabulary:
  """A seqio vocabulary for a SentencePiece `.model` or a WordPiece vocab.txt.

  Args:
    path: the file, or a directory holding vocab.txt / spiece.model /
      spm.model.
    lower_case: WordPiece only; defaults to `do_lower_case` of a
      tokenizer_config.json next to the file, else True (uncased).
  """
  path = resolve_vocab_path(path)
  if path.endswith(".model"):
    return seqio.SentencePieceVocabulary(path)
  if path.endswith(".txt"):
    if lower_case is None:
      lower_case = _lower_case_from_config(os.path.dirname(path))
    return WordPieceVocabulary(path, lower_case=lower_case)
  raise ValueError(f"{path}: unknown vocabulary type; expected a SentencePiece "
                   "'.model' or a WordPiece '.txt' (one token per line)")


def vocab_fingerprint(vocab: seqio.Vocabulary) -> dict:
  """What identifies the tokenisation: file hash plus options."""
  if isinstance(vocab, WordPieceVocabulary):
    return {"type": "wordpiece", "sha256": file_sha256(vocab.vocab_file),
            "lower_case": vocab.lower_case}
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    return {"type": "sentencepiece",
            "sha256": file_sha256(vocab.sentencepiece_model_file),
            "extra_ids": vocab.extra_ids}
  raise TypeError(f"no fingerprint for {type(vocab).__name__}")


def trim_to_bucket(ids: np.ndarray, mask: np.ndarray, *, smallest: int = 16
                   ) -> Tuple[np.ndarray, np.ndarray]:
  """`encode_batch`'s arrays cut to the longest row's length rounded up to a
  power of two (>= `smallest`, <= their width): one compilation per bucket,
  and short texts (titles: ~16 pieces) no longer pay for a 128-wide pad.
  The cut positions are padding of every row, so a masked encoder's outputs
  at the kept positions (and its pooled vectors) do not change."""
  width, longest = smallest, int(mask.sum(axis=1).max(initial=1))
  while width < longest:
    width *= 2
  width = min(width, ids.shape[1])
  return ids[:, :width], mask[:, :width]


def encode_batch(vocab: seqio.Vocabulary, texts: Sequence[str], max_len: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Encoder inputs for `texts`: ids `[N, max_len]` int32 and mask bool.

  WordPiece: `[CLS] pieces[:max_len-2] [SEP]` (HF truncation). SentencePiece
  (T5): `pieces[:max_len-1] EOS` (seqio's trim-then-append-EOS). Padded with
  `vocab.pad_id`.
  """
  if max_len < 2:
    raise ValueError(f"max_len={max_len}; expected at least 2")
  ids = np.full((len(texts), max_len), vocab.pad_id, np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  wordpiece = isinstance(vocab, WordPieceVocabulary)
  for i, text in enumerate(texts):
    pieces = list(vocab.encode(text))
    if wordpiece:
      row = [vocab.bos_id] + pieces[:max_len - 2] + [vocab.eos_id]
    else:
      row = pieces[:max_len - 1] + [vocab.eos_id]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return ids, mask
