"""The segment cache on disk: K/V pages in safetensors files plus a JSON index.

Host side (numpy and files; the pages move to and from the device through the two small programs
in sparsex_jax/programs/copy.py, passed in as a `PageIO`). Layout of a cache directory:

    DIR/index.json                    format, version, fingerprint, one record per segment
    DIR/segments/<key>.safetensors    "k", "v" [L, K, n_pages, S, H] (the pool's own page layout),
                                      "tokens", "positions" int32 [n]; metadata names the
                                      fingerprint and key so a file carries its own identity

<key> is the segment-cache key (blake2b-128 of the int32 token ids), so a file is found from the
tokens alone. The index records, per segment, its token count, the position its first token was
computed at and whether it was computed alone (from position 0) or in context, the file's size and
its sha256.

Safety rules (a cache must never give wrong tokens):
- The cache is tied to a fingerprint of the model (config, weights: every tensor's shape, dtype and
  evenly spaced sample of values), the dtype and the page size. Opening a cache with another
  fingerprint is a CacheError naming index.json and the fields that differ.
- Every file is checked when it is read: size against the index (truncation), sha256 (corruption),
  its own metadata against the fingerprint, its tokens against its key, its shapes against the
  pool. Any mismatch is a CacheError naming the file; nothing of it reaches the pool.
- Writes are atomic: a temp file in the same directory, fsync, rename. The index is rewritten
  under an exclusive lock (fcntl) after re-reading it, so two processes adding to one cache do not
  drop each other's entries. A crash leaves at worst an unindexed file or a temp file; temp files
  are removed at the next open (under the lock, so never one a live save is writing).
- Every path comes from a key checked to be one we write (32 hex digits) and is checked to lie
  inside the cache dir (no symlink out): an edited index cannot make --verify read, or --repair
  delete, a file elsewhere.
- The sha256 of a file lives in the index, beside the data: it catches accidents, not an attacker
  who can write the dir. With a key (`--cache-key`, $SPARSEX_CACHE_KEY) the index carries an
  HMAC-SHA256 over its content, so the index, and through its sha256s every file, is
  authenticated: a cache changed without the key is refused (docs/SECURITY.md).
- A segment file that fails its checks when a job needs it is dropped from this process's view
  with a warning and its segment computed afresh (strict=True: a CacheError instead).

A cache larger than the pool is loaded on demand: `load_segments` brings in the segments a batch
needs just before it runs; they enter the in-memory segment cache as its most recent entries and
leave it by its ordinary LRU eviction (they stay on disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
import warnings
from typing import Iterable, Protocol

import numpy as np

from sparsex_jax.kv.allocator import PoolExhausted
from sparsex_jax.kv.prefix_cache import as_token_array
from sparsex_jax.kv.segment_cache import segment_key

FORMAT = "sparsex-segment-cache"
VERSION = 1
INDEX = "index.json"
SEGMENTS = "segments"
_SAMPLES_PER_TENSOR = 4096
TEMP_PREFIX = ".tmp-"  # an interrupted atomic write leaves such a file behind
KEY_ENV = "SPARSEX_CACHE_KEY"  # the default HMAC key of the index (bytes of its UTF-8 text)
# The keys we write: segment_key()'s 32 hex digits. Nothing else may name a file.
_KEY = re.compile(r"[0-9a-f]{32}")
# Every index record's fields and their types: a record missing one is the index's error, named
# when the index is read, never a KeyError later.
_RECORD = {"n_tokens": int, "n_pages": int, "first_position": int, "computed": str, "bytes": int,
           "sha256": str}
# numpy has no bfloat16 that safetensors.numpy reads back: such pages are stored as their uint16
# bit patterns and the metadata names the real dtype.
_BIT_VIEWS = {"bfloat16": np.uint16, "float16": np.uint16}


class CacheError(ValueError):
  """A cache directory or file that cannot be used (named in the message)."""


class PageIO(Protocol):
  """Moves whole pool pages between the device and the host (the engine implements it)."""

  def read_pages(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

  def write_pages(self, pages: np.ndarray, k: np.ndarray, v: np.ndarray) -> None: ...


# ------------------------------------------------------------------------------------------------
# Fingerprint
# ------------------------------------------------------------------------------------------------

def fingerprint(cfg, params, page_size: int) -> dict:
  """What a cache is tied to: the model config, its weights, the dtype and the page size.

  Weights are fingerprinted from every tensor's path, shape, dtype and up to 4,096 evenly spaced
  values (exact bytes, so a CPU and a GPU process agree): any other checkpoint or fine-tune
  differs there, and it costs milliseconds where hashing 16 GB of an 8B model would take a minute.
  """
  import jax
  h = hashlib.blake2b(digest_size=16)
  leaves = sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                  key=lambda kv: jax.tree_util.keystr(kv[0]))
  for path, leaf in leaves:
    flat = leaf.reshape(-1)
    n = flat.shape[0]
    idx = np.linspace(0, n - 1, min(n, _SAMPLES_PER_TENSOR)).astype(np.int64)
    sample = np.asarray(flat[idx])
    h.update(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{sample.dtype}".encode())
    h.update(np.ascontiguousarray(sample).view(np.uint8).tobytes())
  config = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
  parts = {"model": cfg.name, "dtype": cfg.dtype, "page_size": int(page_size),
           "config": hashlib.blake2b(config.encode(), digest_size=16).hexdigest(),
           "weights": h.hexdigest(),
           "kv_shape": [cfg.n_layers, cfg.n_kv_heads, int(page_size), cfg.head_dim]}
  parts["digest"] = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(),
                                    digest_size=16).hexdigest()
  return parts


def _differences(want: dict, got: dict) -> str:
  names = {"model": "model", "dtype": "dtype", "page_size": "page size", "config": "model config",
           "weights": "model weights", "kv_shape": "KV shape"}
  diff = [f"{label} {got.get(k)!r} (this engine: {want.get(k)!r})" for k, label in names.items()
          if want.get(k) != got.get(k)]
  return "; ".join(diff) or "fingerprint digest"


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------

def _atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the new one, never a part."""
  folder = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def segment_file(path: str, key: str) -> str:
  """The file of segment `key` in cache dir `path`, checked: `key` must be one we write (32 hex
  digits, so no separator, "..", or absolute path) and the file must not be a symlink leading
  out of the dir. A CacheError otherwise: an index is data, never a path to follow."""
  if not isinstance(key, str) or not _KEY.fullmatch(key):
    raise CacheError(f"{os.path.join(path, INDEX)}: segment key {key!r} is not a segment-cache "
                     f"key (32 hex digits): the index was edited")
  folder = os.path.join(path, SEGMENTS)
  file = os.path.join(folder, f"{key}.safetensors")
  if os.path.islink(file) or os.path.islink(folder) or os.path.commonpath(
      [os.path.realpath(file), os.path.realpath(path)]) != os.path.realpath(path):
    raise CacheError(f"{file}: a symlink (or a path out of the cache dir); segment files must be "
                     f"plain files inside {path}")
  return file


def cache_key_from_env(key: str | bytes | None = None) -> bytes | None:
  """The HMAC key of the index: `key` if given, else $SPARSEX_CACHE_KEY, else None."""
  if key is None:
    key = os.environ.get(KEY_ENV) or None
  if isinstance(key, str):
    key = key.encode("utf-8")
  return key or None


def _mac(doc: dict, key: bytes) -> str:
  """HMAC-SHA256 of an index document without its "hmac" field (canonical JSON)."""
  body = json.dumps({k: v for k, v in doc.items() if k != "hmac"}, sort_keys=True,
                    separators=(",", ":")).encode()
  return hmac.new(key, body, hashlib.sha256).hexdigest()


def _index_bytes(doc: dict, key: bytes | None) -> bytes:
  doc = {k: v for k, v in doc.items() if k != "hmac"}
  if key is not None:
    doc["hmac"] = _mac(doc, key)
  return (json.dumps(doc, indent=1) + "\n").encode()


def temp_files(path: str) -> list[str]:
  """Temp files an interrupted save left in a cache dir."""
  out = []
  for folder in (path, os.path.join(path, SEGMENTS)):
    with contextlib.suppress(OSError):
      out.extend(os.path.join(folder, n) for n in sorted(os.listdir(folder))
                 if n.startswith(TEMP_PREFIX))
  return out


@dataclasses.dataclass(frozen=True)
class DiskSegment:
  """A segment read back from disk, verified."""

  key: str
  token_ids: np.ndarray  # int32 [n]
  positions: np.ndarray  # int32 [n]
  k: np.ndarray  # [L, K, n_pages, S, H] in the pool's dtype
  v: np.ndarray


class SegmentDiskCache:
  """One cache directory, tied to one fingerprint. Opening checks the index and every file's size;
  reading a segment checks the rest (see the module docstring)."""

  def __init__(self, path: str | os.PathLike, fp: dict, *, create: bool = True,
               key: str | bytes | None = None, strict: bool = False):
    """key: the index's HMAC key (None: $SPARSEX_CACHE_KEY, else none). strict: a bad segment
    file is a CacheError; by default it is dropped from this process's view with a warning and
    its segment computed afresh."""
    self.path = os.fspath(path)
    self.fingerprint = fp
    self.key = cache_key_from_env(key)
    self.strict = bool(strict)
    self.index_path = os.path.join(self.path, INDEX)
    self.dir = os.path.join(self.path, SEGMENTS)
    self.loaded = 0  # segments read from disk into the pool by this process
    self.saved = 0  # segments written by this process
    self.bad: dict[str, str] = {}  # key -> why: bad files left out of this view (not strict)
    # Segments this process must not write (the batch runner's: a segment only one request of
    # the job has, so that no request ever reuses what only it contributed; docs/BATCH.md).
    self.keep_off_disk: set[str] = set()
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise CacheError(f"{self.path}: not a directory")
    try:
      if not os.path.exists(self.index_path):
        if not create:
          raise CacheError(f"{self.index_path}: no segment cache here (run `sparsex cache warm`)")
        os.makedirs(self.dir, exist_ok=True)
      with self._locked():
        if not os.path.exists(self.index_path):
          self._write_index({})
        for tmp in temp_files(self.path):  # an interrupted save's; no save runs: we hold the lock
          os.unlink(tmp)
    except OSError as e:
      raise CacheError(f"{e.filename or self.path}: cannot create or write the cache dir "
                       f"({e.strerror})") from None
    self.entries = self._read_index()
    for key_, rec in list(self.entries.items()):  # cheap: a truncated or missing file shows now
      try:
        self._check_size(key_, rec)
      except CacheError as e:
        self._drop(key_, e)

  # ---- index ----

  def _file(self, key: str) -> str:
    return segment_file(self.path, key)

  def _read_index(self) -> dict[str, dict]:
    return read_index(self.index_path, self.fingerprint, self.key)

  def _write_index(self, entries: dict) -> None:
    doc = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
           "segments": dict(sorted(entries.items()))}
    _atomic_write(self.index_path, _index_bytes(doc, self.key))

  def _drop(self, key: str, error: CacheError) -> None:
    """A bad file: a CacheError when strict, else left out of this process's view (the segment
    is computed afresh, and not saved again over the file) with a warning."""
    if self.strict:
      raise error
    self.entries.pop(key, None)
    self.bad[key] = str(error)
    warnings.warn(f"{error}; computing that segment afresh (`sparsex cache info {self.path} "
                  f"--repair` drops the file)", stacklevel=3)

  def _locked(self):
    return _lock_dir(self.path)

  def _check_size(self, key: str, rec: dict) -> None:
    path = self._file(key)
    try:
      size = os.path.getsize(path)
    except OSError:
      raise CacheError(f"{path}: listed in {self.index_path} but missing; delete its entry "
                       f"(`sparsex cache info {self.path} --repair`) or the whole cache") from None
    if size != rec["bytes"]:
      raise CacheError(f"{path}: truncated or rewritten ({size} bytes, the index says "
                       f"{rec['bytes']}); `sparsex cache info {self.path} --repair` drops it")

  def __contains__(self, key: str) -> bool:
    return key in self.entries

  def __len__(self) -> int:
    return len(self.entries)

  # ---- segments ----

  def save(self, segments: Iterable[tuple]) -> int:
    """Writes (token_ids, positions, k, v[, namespace]) segments not on disk yet; returns how
    many. A segment's file is named by its key, salted by its namespace (the name itself is
    stored nowhere).

    All under the directory's lock, after re-reading the index: a segment another process saved
    meanwhile is not written again, and a file never changes under an index entry that describes
    another version of it (two processes may compute one segment in different contexts).
    """
    from safetensors.numpy import save as st_save
    dtype = self.fingerprint["dtype"]
    store = (lambda a: a.view(_BIT_VIEWS[dtype])) if dtype in _BIT_VIEWS else (lambda a: a)
    with self._locked():
      entries = self._read_index()
      new = {}
      for tokens, positions, k, v, *namespace in segments:
        tokens = as_token_array(tokens)
        key = segment_key(tokens, *namespace)
        if key in entries or key in new or key in self.keep_off_disk or key in self.bad:
          continue
        data = st_save({"k": np.ascontiguousarray(store(k)), "v": np.ascontiguousarray(store(v)),
                        "tokens": tokens, "positions": np.asarray(positions, np.int32)},
                       metadata={"format": FORMAT, "version": str(VERSION), "key": key,
                                 "fingerprint": self.fingerprint["digest"], "dtype": dtype})
        _atomic_write(self._file(key), data)
        first = int(positions[0])
        new[key] = {"n_tokens": int(tokens.size), "n_pages": int(k.shape[2]),
                    "first_position": first, "computed": "alone" if first == 0 else "in_context",
                    "bytes": len(data), "sha256": _sha256(data),
                    "created": round(time.time(), 3)}
      if new:
        entries.update(new)
        self._write_index(entries)
      self.entries = {k: r for k, r in entries.items() if k not in self.bad}
    self.saved += len(new)
    return len(new)

  def read(self, key: str, namespace: str = "") -> DiskSegment:
    """Reads and verifies one segment (its tokens must hash to `key` under `namespace`); a
    CacheError names the file on any mismatch."""
    from safetensors.numpy import load as st_load
    rec = self.entries.get(key)
    if rec is None:
      raise KeyError(f"segment {key} is not in {self.index_path}")
    path = self._file(key)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise CacheError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) != rec["bytes"]:
      raise CacheError(f"{path}: truncated ({len(data)} bytes, the index says {rec['bytes']})")
    if _sha256(data) != rec["sha256"]:
      raise CacheError(f"{path}: corrupted (sha256 differs from the index)")
    try:
      tensors = st_load(data)
      meta = _metadata(data)
    except Exception as e:  # pylint: disable=broad-except
      raise CacheError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("fingerprint") != self.fingerprint["digest"] or meta.get("key") != key:
      raise CacheError(f"{path}: written for another model or segment (its metadata does not "
                       f"match the index)")
    tokens = tensors.get("tokens")
    if tokens is None or segment_key(tokens, namespace) != key or tokens.size != rec["n_tokens"]:
      raise CacheError(f"{path}: its tokens do not match its key")
    dtype = self.fingerprint["dtype"]
    k, v = tensors["k"], tensors["v"]
    if dtype in _BIT_VIEWS:
      import ml_dtypes  # ships with jax
      real = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
      k, v = k.view(real), v.view(real)
    n_layers, n_kv, page_size, head_dim = self.fingerprint["kv_shape"]
    want = (n_layers, n_kv, -(-tokens.size // page_size), page_size, head_dim)
    if k.shape != want or v.shape != want or str(k.dtype) != dtype:
      raise CacheError(f"{path}: K/V of shape {k.shape} {k.dtype}, expected {want} {dtype}")
    positions = tensors["positions"].astype(np.int32)
    if positions.shape != tokens.shape:
      raise CacheError(f"{path}: {positions.size} positions for {tokens.size} tokens")
    return DiskSegment(key, tokens.astype(np.int32), positions, k, v)

  def verify(self, namespaces: Iterable[str] = ("",)) -> list[str]:
    """Reads every segment; returns one message per bad file (empty: all good). A segment of a
    namespace not listed fails its tokens-key check (the namespace is stored nowhere)."""
    bad = []
    for key in list(self.entries):
      errors = []
      for namespace in namespaces:
        try:
          self.read(key, namespace)
          break
        except CacheError as e:
          errors.append(str(e))
      else:
        bad.append(errors[0])
    return bad

  def info(self) -> dict:
    recs = self.entries.values()
    return {"path": self.path, "fingerprint": self.fingerprint, "segments": len(self.entries),
            "tokens": sum(r["n_tokens"] for r in recs),
            "bytes": sum(r["bytes"] for r in recs),
            "computed_alone": sum(1 for r in recs if r["computed"] == "alone")}


def _metadata(data: bytes) -> dict:
  """The __metadata__ of a safetensors file's header (8-byte length, then JSON)."""
  n = int.from_bytes(data[:8], "little")
  return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


def _read_doc(index_path: str) -> dict:
  try:
    with open(index_path, "rb") as f:
      doc = json.loads(f.read())
  except OSError as e:
    raise CacheError(f"{index_path}: cannot read ({e.strerror})") from None
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise CacheError(f"{index_path}: not valid JSON ({e}): truncated or corrupted") from None
  return doc


def read_index(index_path: str, fp: dict | None = None, key: bytes | None = None
               ) -> dict[str, dict]:
  """The segment records of an index, checked for format, version, (given `fp`) fingerprint,
  (given `key`) its HMAC, and every record: its key one we write, its fields present and typed.
  """
  doc = _read_doc(index_path)
  if not isinstance(doc, dict) or doc.get("format") != FORMAT:
    raise CacheError(f"{index_path}: not a sparsex segment cache index")
  if doc.get("version") != VERSION:
    raise CacheError(f"{index_path}: format version {doc.get('version')}, this sparsex reads "
                     f"version {VERSION}")
  if key is not None:
    mac = doc.get("hmac")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(doc, key)):
      raise CacheError(f"{index_path}: " + ("not authenticated (no HMAC): made without a cache "
                       "key" if mac is None else "HMAC mismatch: changed without the cache key, "
                       "or another key") + "; refusing to use it (another --cache-dir, or the "
                       "right --cache-key)")
  got = doc.get("fingerprint") or {}
  if not isinstance(got, dict):
    raise CacheError(f"{index_path}: no fingerprint")
  if fp is not None and got.get("digest") != fp["digest"]:
    raise CacheError(f"{index_path}: this cache was made for another model or setting: "
                     f"{_differences(fp, got)}. Use another --cache-dir, or the model, dtype "
                     f"and page size it was made with")
  segments = doc.get("segments")
  if not isinstance(segments, dict):
    raise CacheError(f"{index_path}: no segment table")
  for k, rec in segments.items():
    _check_record(index_path, k, rec)
  return segments


def _check_record(index_path: str, key, rec) -> None:
  if not isinstance(key, str) or not _KEY.fullmatch(key):
    raise CacheError(f"{index_path}: segment key {key!r} is not a segment-cache key (32 hex "
                     f"digits): the index was edited; `sparsex cache info DIR --repair` drops it")
  if not isinstance(rec, dict):
    raise CacheError(f"{index_path}: the record of segment {key} is not an object")
  for name, kind in _RECORD.items():
    if not isinstance(rec.get(name), kind) or isinstance(rec.get(name), bool):
      raise CacheError(f"{index_path}: the record of segment {key} has no valid {name!r}; "
                       f"`sparsex cache info DIR --repair` drops it")


def read_info(path: str | os.PathLike, key: str | bytes | None = None) -> dict:
  """What a cache directory holds, without a model (for `sparsex cache info`)."""
  index_path = os.path.join(os.fspath(path), INDEX)
  key = cache_key_from_env(key)
  segments = read_index(index_path, key=key)
  doc = _read_doc(index_path)
  fp = doc["fingerprint"]
  auth = ("verified with the key" if key is not None else
          "present, not checked (no key)" if "hmac" in doc else "none")
  return {"path": os.fspath(path), "fingerprint": fp, "hmac": auth, "segments": len(segments),
          "tokens": sum(r["n_tokens"] for r in segments.values()),
          "bytes": sum(r["bytes"] for r in segments.values()),
          "computed_alone": sum(1 for r in segments.values() if r["computed"] == "alone"),
          "files": segments}


def check_files(path: str | os.PathLike, key: str | bytes | None = None) -> list[str]:
  """One message per indexed file that is missing, truncated or corrupted (size and sha256; no
  model needed: a file's other checks run when it is loaded), and per temp file an interrupted
  save left."""
  path = os.fspath(path)
  segments = read_index(os.path.join(path, INDEX), key=cache_key_from_env(key))
  bad = [f"{tmp}: temp file of an interrupted save (removed at the next open or --repair)"
         for tmp in temp_files(path)]
  for k, rec in segments.items():
    try:
      file = segment_file(path, k)
    except CacheError as e:
      bad.append(str(e))
      continue
    try:
      with open(file, "rb") as f:
        data = f.read()
    except OSError:
      bad.append(f"{file}: missing")
      continue
    if len(data) != rec["bytes"]:
      bad.append(f"{file}: truncated ({len(data)} bytes, the index says {rec['bytes']})")
    elif _sha256(data) != rec["sha256"]:
      bad.append(f"{file}: corrupted (sha256 differs from the index)")
  return bad


def repair(path: str | os.PathLike, key: str | bytes | None = None) -> list[str]:
  """Drops the index entries whose files are missing, truncated, corrupted or not ours to name
  (a key that is not one we write, a symlink), removes temp files of interrupted saves; returns
  messages. Only files named by a valid key, inside the dir, are ever deleted. An index that is
  not valid JSON is set aside as index.json.bad-TIME and an empty one written (its files are then
  unindexed and ignored). With a key, the repaired index is authenticated with it.

  Checks size and sha256 only (no model needed); the file's other checks run when it is loaded.
  """
  path = os.fspath(path)
  index_path = os.path.join(path, INDEX)
  key = cache_key_from_env(key)
  messages = []
  with _lock_dir(path):
    for tmp in temp_files(path):
      with contextlib.suppress(OSError):
        os.unlink(tmp)
        messages.append(f"{tmp}: removed (temp file of an interrupted save)")
    try:
      doc = _read_doc(index_path)
    except CacheError as e:
      if not os.path.exists(index_path):
        raise
      # Without its fingerprint the files cannot be trusted for any model: set the index aside
      # (for a post-mortem), delete the segment files (only those named as ours), start empty.
      aside = f"{index_path}.bad-{int(time.time())}"
      os.replace(index_path, aside)
      messages.append(f"{e}; moved aside to {aside}; the cache starts empty at its next use")
      with contextlib.suppress(OSError):
        for name in os.listdir(os.path.join(path, SEGMENTS)):
          if name.endswith(".safetensors"):
            with contextlib.suppress(CacheError, OSError):
              os.unlink(segment_file(path, name.removesuffix(".safetensors")))
      return messages
    if not isinstance(doc, dict) or not isinstance(doc.get("segments"), dict):
      raise CacheError(f"{index_path}: not a sparsex segment cache index")
    segments = doc["segments"]
    for k, rec in list(segments.items()):
      try:
        _check_record(index_path, k, rec)
        file = segment_file(path, k)
      except CacheError as e:  # never follow it: drop the entry, touch no file
        messages.append(f"{e} -> dropped from the index")
        del segments[k]
        continue
      try:
        with open(file, "rb") as f:
          data = f.read()
        ok = len(data) == rec["bytes"] and _sha256(data) == rec["sha256"]
      except OSError:
        ok = False
      if not ok:
        messages.append(f"{file}: dropped from the index (missing, truncated or corrupted)")
        del segments[k]
        with contextlib.suppress(OSError):
          os.unlink(file)
    if messages or (key is not None and doc.get("hmac") != _mac(doc, key)):
      doc["segments"] = segments
      _atomic_write(index_path, _index_bytes(doc, key))
  return messages


@contextlib.contextmanager
def _lock_dir(path: str):
  """The cache dir's exclusive lock (the one saves take)."""
  import fcntl
  with open(os.path.join(path, ".lock"), "a+b") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------
# Between the disk and the in-memory segment cache
# ------------------------------------------------------------------------------------------------

def load_segments(disk: SegmentDiskCache, store, io: PageIO,
                  keys: Iterable[str | tuple[str, str]]) -> int:
  """Brings the listed segments (keys, or (key, namespace) pairs) from disk into the pool and the
  segment cache (those on disk and not in memory); returns how many. Best effort under pool pressure: a segment that finds no
  pages stays on disk (the request then computes it, as on a miss)."""
  n = 0
  for item in dict.fromkeys(keys):
    key, namespace = (item, "") if isinstance(item, str) else item
    if key in store.segment_cache or key not in disk:
      continue
    if store.host_tier is not None and key in store.host_tier:
      continue  # the host tier serves it (only the layers a request reads)
    try:
      seg = disk.read(key, namespace)  # verified before anything reaches the pool
    except CacheError as e:
      disk._drop(key, e)  # raises when strict; else computed afresh, as on a miss
      continue
    try:
      pages = store.allocator.allocate(seg.k.shape[2])
    except PoolExhausted:
      continue
    try:
      io.write_pages(pages, seg.k, seg.v)
      store.segment_cache.insert(seg.token_ids, pages, seg.positions, namespace)
    finally:
      store.allocator.decref(pages)  # the segment cache holds its own reference
    disk.loaded += 1
    n += 1
  return n


def save_segments(disk: SegmentDiskCache, store, io: PageIO) -> int:
  """Writes every in-memory segment that is not on disk yet; returns how many."""
  todo = [store.segment_cache.get(k) for k in store.segment_cache.keys()
          if k not in disk and k not in disk.keep_off_disk and k not in disk.bad]
  if not todo:  # the common case after every batch: no lock, no index read
    return 0

  def read():
    for entry in todo:
      k, v = io.read_pages(entry.pages)
      yield entry.token_ids, entry.positions, k, v, entry.namespace

  return disk.save(read())


class DiskLink:
  """An engine's tie to a SegmentDiskCache: loads the segments a batch needs into its store and
  pool, and saves what it added (best effort: a full disk warns, it never fails the requests)."""

  def __init__(self, cache: SegmentDiskCache, store, io: PageIO, autosave: bool = True):
    self.cache, self.store, self.io, self.autosave_enabled = cache, store, io, bool(autosave)
    self.load_s = 0.0  # host time spent loading segments into the pool (the request waits on it)

  def load_for(self, prompts) -> int:
    """Loads the cacheable segments of `prompts` that are on disk but not in memory."""
    keys = [(segment_key(ids, p.namespace), p.namespace)
            for p in prompts for _, _, ids, cacheable in p.spans if cacheable]
    t0 = time.perf_counter()
    n = load_segments(self.cache, self.store, self.io, keys)
    if n:  # a synchronous read, verify and write before the request's prefill: all exposed
      self.load_s += time.perf_counter() - t0
    return n

  def save(self) -> int:
    return save_segments(self.cache, self.store, self.io)

  def keep(self, token_ids, positions, k, v, namespace: str = "") -> bool:
    """The host tier's overflow: writes one segment (when this link saves); True if it is on disk
    now. A failed write warns and counts as dropped, never fails the request that evicted it."""
    key = segment_key(token_ids, namespace)
    if key in self.cache:
      return True
    if not self.autosave_enabled:
      return False
    try:
      self.cache.save([(token_ids, positions, k, v, namespace)])
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"segment {key[:12]} not saved to {self.cache.path}: {e}", stacklevel=3)
      return False
    return key in self.cache

  def autosave(self) -> None:
    if not self.autosave_enabled:
      return
    try:
      self.save()
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"segment cache not saved to {self.cache.path}: {e}", stacklevel=3)
