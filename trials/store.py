"""FeatureStore: content-addressed, memory-mapped Arrow IPC files of frozen U-Net features.

One key = one (checkpoint, model config and class label, dataset split + file list, preprocessing,
numeric path, t, noise seed, block, spatial cap[, pool]). A key is stored as one or more *parts*
(byte-bounded image ranges): `<root>/<dataset>/<split>/t<T>_b<B>_<hash>.part-<i>-of-<n>.arrow`.

A part is *streamed*: `PartWriter` appends one record batch per image batch to a temporary file, so
a writer holds one batch, not one part, whatever the dataset's size; the file is renamed into place
only when complete. Every record batch carries a checksum of its feature bytes in its custom
metadata, so a half-written or corrupted part is never served: readers validate, callers recompute.
A part that verified once is remembered on this node (a marker keyed by path, size and mtime), so
trial starts do not re-hash whole files.

Local paths are memory-mapped (zero-copy: a trial's anonymous memory does not grow with the
dataset); any other `pyarrow.fs` URI (s3://, gs://) is read record batch by record batch on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

CHECKSUM = b"diffsweep.checksum"
FORMAT = 2  # record-batch checksums (bumped from footer checksums); part of every key's digest


def _checksum(features: np.ndarray) -> bytes:
    """blake2b of the feature bytes, hashed straight from the buffer (no copy of the array)."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(features)).cast("B"), digest_size=16).hexdigest().encode()


class CorruptFeatureFile(RuntimeError):
    """A stored part that fails Arrow validation or its checksum; it must be recomputed."""


@dataclass(frozen=True)
class FeatureKey:
    """Everything a stored feature depends on. `digest` is its content address."""

    checkpoint_sha256: str
    model_config: str  # JSON of the U-Net flags
    dataset: str
    split: str
    files_digest: str  # digest of the (image id, label) list of the split
    preprocessing: str  # JSON: image size, channels, resize rule
    t: int
    noise_seed: int
    block: int
    max_spatial: int
    class_label: str = ""  # class-conditional models: the fixed label id, or "mean"
    numeric: str = "cpu-fp32"  # the numeric path that computed it ("cpu-fp32", or "cuda-bf16" on a GPU)
    pool: int = 0  # 0: the stored map; p > 0: its p×p adaptive-average-pooled cache (float32)
    noise_draws: int = 1  # the map is the mean over this many seeded ε draws (space.noise_draws)

    @property
    def digest(self) -> str:
        fields = asdict(self)
        if fields["noise_draws"] == 1:  # left out: keys from before noise ensembles stay valid
            del fields["noise_draws"]
        blob = json.dumps({**fields, "format": FORMAT}, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=10).hexdigest()

    @property
    def stem(self) -> str:
        pooled = f"_p{self.pool}" if self.pool else ""
        draws = f"_k{self.noise_draws}" if self.noise_draws != 1 else ""
        return f"{self.dataset}/{self.split}/t{self.t}_b{self.block}{draws}{pooled}_{self.digest}"

    def pooled(self, pool: int) -> "FeatureKey":
        return FeatureKey(**{**asdict(self), "pool": int(pool)})


def files_digest(image_ids: list[str], labels: list[int]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for image_id, label in zip(image_ids, labels):
        h.update(f"{image_id}\t{label}\n".encode())
    return h.hexdigest()


class LazyBatch:
    """One record batch of a remote part, read when a row of it is first wanted (then dropped)."""

    def __init__(self, reader: ipc.RecordBatchFileReader, index: int, rows: int, shape: tuple[int, ...], dtype):
        self.reader, self.index, self.shape, self.dtype = reader, index, (rows, *shape), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return self.reader.get_batch(self.index).column("features").to_numpy_ndarray()[rows]


@dataclass
class FeatureArray:
    """Rows of one key across its record batches, gathered on demand (memory-mapped when local)."""

    parts: list  # each (n_i, C, H, W): an ndarray view on the memory map, or a LazyBatch (remote)
    labels: np.ndarray
    image_ids: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    _offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def dtype(self):
        return self.parts[0].dtype

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Copy just the requested rows (a batch) out of the mapped (or remote) record batches."""
        indices = np.asarray(indices)
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][indices])
        part = np.searchsorted(self._offsets, indices, side="right") - 1
        out = np.empty((len(indices), *self.shape[1:]), dtype=self.dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][indices[sel] - self._offsets[p]]
        return out

    def iter_rows(self, rows: int = 4096):
        """(start, rows of features) in order, at most `rows` (or one record batch) at a time."""
        start = 0
        for p in self.parts:
            for lo in range(0, len(p), rows):
                chunk = np.asarray(p[lo:lo + rows])
                yield start, chunk
                start += len(chunk)


def _verified_marker(path: str, info: pafs.FileInfo) -> str:
    folder = os.environ.get("DIFFSWEEP_VERIFIED_DIR") or os.path.join(tempfile.gettempdir(), "diffsweep-verified")
    name = hashlib.blake2b(f"{path}\t{info.size}\t{info.mtime_ns}".encode(), digest_size=16).hexdigest()
    return os.path.join(folder, name)


class PartWriter:
    """Stream one part: `write(features, labels, ids)` per image batch, renamed into place on close.

    Leaving the `with` block by an exception deletes the temporary file: nothing half-written is
    ever visible under the final name."""

    def __init__(self, store: "FeatureStore", key: FeatureKey, part: int, num_parts: int, shape: tuple[int, ...],
                 provenance: dict[str, Any] | None = None, dtype=np.float16):
        self.store, self.final, self.dtype = store, store.part_path(key, part, num_parts), np.dtype(dtype)
        self.tmp = f"{self.final}.{uuid.uuid4().hex}.tmp"
        self.rows = 0
        meta = {"diffsweep.key": json.dumps(asdict(key)),
                **{f"diffsweep.{k}": json.dumps(v) for k, v in (provenance or {}).items()}}
        value_type = pa.from_numpy_dtype(self.dtype)
        self.schema = pa.schema([("features", pa.fixed_shape_tensor(value_type, list(shape))),
                                 ("label", pa.int32()), ("image_id", pa.string())], metadata=meta)
        store.fs.create_dir(self.final.rsplit("/", 1)[0], recursive=True)
        self.sink = store.fs.open_output_stream(self.tmp)
        self.writer = ipc.new_file(self.sink, self.schema)

    def write(self, features: np.ndarray, labels, image_ids: list[str]) -> None:
        features = np.ascontiguousarray(features, dtype=self.dtype)
        batch = pa.record_batch([pa.FixedShapeTensorArray.from_numpy_ndarray(features),
                                 pa.array(np.asarray(labels, dtype=np.int32)),
                                 pa.array(list(image_ids), type=pa.string())], schema=self.schema)
        self.writer.write_batch(batch, custom_metadata={CHECKSUM: _checksum(features)})
        self.rows += len(features)

    def close(self) -> str:
        self.writer.close()
        self.sink.close()
        self.store.fs.move(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        try:
            self.writer.close()
            self.sink.close()
        finally:
            try:
                self.store.fs.delete_file(self.tmp)
            except (FileNotFoundError, OSError):
                pass

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FeatureStore:
    def __init__(self, root: str):
        self.root = str(root)
        if "://" in self.root:
            self.fs, self.base = pafs.FileSystem.from_uri(self.root)
            self.local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, self.base, self.local = pafs.LocalFileSystem(), os.path.abspath(self.root), True

    # -- paths ---------------------------------------------------------------------------------
    def part_path(self, key: FeatureKey, part: int, num_parts: int) -> str:
        return f"{self.base}/{key.stem}.part-{part:05d}-of-{num_parts:05d}.arrow"

    def _part_paths(self, key: FeatureKey) -> list[str]:
        folder, name = f"{self.base}/{key.stem}".rsplit("/", 1)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(folder))
        except (FileNotFoundError, OSError):
            return []
        paths = sorted(i.path for i in infos if i.base_name.startswith(name + ".part-")
                       and i.base_name.endswith(".arrow"))
        if not paths:
            return []
        num_parts = int(paths[0].rsplit("-of-", 1)[1].split(".")[0])
        expected = [self.part_path(key, i, num_parts) for i in range(num_parts)]
        return expected if set(expected) <= set(paths) else []

    def has(self, key: FeatureKey) -> bool:
        return bool(self._part_paths(key))

    def nbytes(self, key: FeatureKey) -> int:
        """Bytes on disk of a stored key (0 when absent)."""
        return sum(i.size for i in self.fs.get_file_info(self._part_paths(key)))

    # -- writing -------------------------------------------------------------------------------
    def part_writer(self, key: FeatureKey, part: int, num_parts: int, shape: tuple[int, ...],
                    provenance: dict[str, Any] | None = None, dtype=np.float16) -> PartWriter:
        return PartWriter(self, key, part, num_parts, tuple(shape), provenance, dtype)

    def write_part(self, key: FeatureKey, features: np.ndarray, labels: np.ndarray, image_ids: list[str],
                   part: int = 0, num_parts: int = 1, provenance: dict[str, Any] | None = None) -> str:
        """Write one whole part (one record batch) atomically: temporary name, then rename."""
        with self.part_writer(key, part, num_parts, features.shape[1:], provenance) as w:
            w.write(features, labels, image_ids)
        return w.final

    def write(self, key: FeatureKey, features: np.ndarray, labels: np.ndarray, image_ids: list[str],
              provenance: dict[str, Any] | None = None) -> str:
        return self.write_part(key, features, labels, image_ids, 0, 1, provenance)

    # -- reading -------------------------------------------------------------------------------
    def _read_part(self, path: str, verify: bool) -> tuple[list, np.ndarray, list[str], dict[str, str]]:
        marker = None
        try:
            if verify:  # a part verified once on this node is not re-hashed at every trial start
                info = self.fs.get_file_info(path)
                marker = _verified_marker(path, info)
                verify = not os.path.exists(marker)
            source = pa.memory_map(path) if self.local else self.fs.open_input_file(path)
            reader = ipc.open_file(source)
            tensor_type = reader.schema.field("features").type
            shape, dtype = tuple(tensor_type.shape), tensor_type.value_type.to_pandas_dtype()
            chunks, labels, ids = [], [], []
            for i in range(reader.num_record_batches):
                batch, meta = reader.get_batch_with_custom_metadata(i)
                if verify:
                    batch.validate(full=True)
                features = batch.column("features").to_numpy_ndarray()
                if verify and (meta or {}).get(CHECKSUM) != _checksum(features):
                    raise CorruptFeatureFile(f"feature file {path}: checksum mismatch in record batch {i}")
                # local: a zero-copy view on the map; remote: dropped now, re-read on demand
                chunks.append(features if self.local else LazyBatch(reader, i, len(features), shape, dtype))
                labels.append(batch.column("label").to_numpy())
                ids.extend(batch.column("image_id").to_pylist())
            metadata = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
        except CorruptFeatureFile:
            raise
        except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError, ValueError) as e:
            raise CorruptFeatureFile(f"feature file {path}: unreadable ({str(e).splitlines()[0][:120]})") from None
        if marker:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "w").close()
        empty = np.zeros((0, *shape), dtype)
        return chunks or [empty], np.concatenate(labels) if labels else np.zeros(0, np.int32), ids, metadata

    def read(self, key: FeatureKey, verify: bool = True) -> FeatureArray:
        """All parts of `key`; raises KeyError if absent, CorruptFeatureFile if damaged."""
        paths = self._part_paths(key)
        if not paths:
            raise KeyError(key.stem)
        chunks, labels, ids, meta = [], [], [], {}
        for path in paths:
            c, lab, i, meta = self._read_part(path, verify)
            chunks.extend(c)
            labels.append(lab)
            ids.extend(i)
        chunks = [c for c in chunks if len(c)] or chunks[:1]
        return FeatureArray(chunks, np.concatenate(labels), ids, meta)

    def delete(self, key: FeatureKey) -> None:
        for path in self._part_paths(key) or []:
            self.fs.delete_file(path)
        folder, name = f"{self.base}/{key.stem}".rsplit("/", 1)
        try:  # stray parts of an interrupted sharded write
            for info in self.fs.get_file_info(pafs.FileSelector(folder)):
                if info.base_name.startswith(name + ".part-"):
                    self.fs.delete_file(info.path)
        except (FileNotFoundError, OSError):
            pass
