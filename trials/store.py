"""FeatureStore: content-addressed, memory-mapped Arrow IPC files of frozen U-Net features.

One key = one (checkpoint, model config, dataset split + file list, preprocessing, t, noise seed,
block, spatial cap). A key is stored as one or more *parts* (one per shard of image ranges):
`<root>/<dataset>/<split>/t<T>_b<B>_<hash>.part-<i>-of-<n>.arrow`. Each part is written to a temporary
name and renamed, and carries a checksum of its feature bytes in the IPC footer, so a half-written or
corrupted part is never served: readers validate and callers recompute.

Local paths are memory-mapped (zero-copy: a trial's RSS does not grow with the dataset); any other
`pyarrow.fs` URI (s3://, gs://, a mounted NFS path) is read through that filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

CHECKSUM = b"diffsweep.checksum"


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

    @property
    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=10).hexdigest()

    @property
    def stem(self) -> str:
        return f"{self.dataset}/{self.split}/t{self.t}_b{self.block}_{self.digest}"


def files_digest(image_ids: list[str], labels: list[int]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for image_id, label in zip(image_ids, labels):
        h.update(f"{image_id}\t{label}\n".encode())
    return h.hexdigest()


@dataclass
class FeatureArray:
    """Rows of one key across its parts, gathered on demand from memory-mapped buffers."""

    parts: list[np.ndarray]  # each (n_i, C, H, W) float16, usually memory-mapped
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

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Copy just the requested rows (a batch) out of the mapped parts."""
        indices = np.asarray(indices)
        if len(self.parts) == 1:
            return self.parts[0][indices]
        part = np.searchsorted(self._offsets, indices, side="right") - 1
        out = np.empty((len(indices), *self.parts[0].shape[1:]), dtype=self.parts[0].dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][indices[sel] - self._offsets[p]]
        return out


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

    # -- writing -------------------------------------------------------------------------------
    def write_part(self, key: FeatureKey, features: np.ndarray, labels: np.ndarray, image_ids: list[str],
                   part: int = 0, num_parts: int = 1, provenance: dict[str, Any] | None = None) -> str:
        """Write one part atomically: temporary name, then rename."""
        features = np.ascontiguousarray(features, dtype=np.float16)
        table = pa.table({
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(features),
            "label": pa.array(np.asarray(labels, dtype=np.int32)),
            "image_id": pa.array(list(image_ids), type=pa.string()),
        })
        meta = {"diffsweep.key": json.dumps(asdict(key)), **{f"diffsweep.{k}": json.dumps(v)
                                                              for k, v in (provenance or {}).items()}}
        table = table.replace_schema_metadata(meta)
        final = self.part_path(key, part, num_parts)
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        footer = {CHECKSUM: _checksum(features)}
        with self.fs.open_output_stream(tmp) as sink:
            with ipc.new_file(sink, table.schema, metadata=footer) as writer:
                writer.write_table(table)
        self.fs.move(tmp, final)
        return final

    def write(self, key: FeatureKey, features: np.ndarray, labels: np.ndarray, image_ids: list[str],
              provenance: dict[str, Any] | None = None) -> str:
        return self.write_part(key, features, labels, image_ids, 0, 1, provenance)

    # -- reading -------------------------------------------------------------------------------
    def _read_part(self, path: str, verify: bool) -> tuple[np.ndarray, pa.Table]:
        try:
            source = pa.memory_map(path) if self.local else self.fs.open_input_file(path)
            reader = ipc.open_file(source)
            table = reader.read_all()
            table.validate(full=verify)
            column = table.column("features")
            # one chunk (the usual case) is read in place; combine_chunks would copy it out of the map
            chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            features = chunk.to_numpy_ndarray()
            if verify:
                want = (reader.metadata or {}).get(CHECKSUM)
                got = _checksum(features)
                if want != got:
                    raise CorruptFeatureFile(f"feature file {path}: checksum mismatch")
        except CorruptFeatureFile:
            raise
        except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError, ValueError) as e:
            raise CorruptFeatureFile(f"feature file {path}: unreadable ({str(e).splitlines()[0][:120]})") from None
        return features, table

    def read(self, key: FeatureKey, verify: bool = True) -> FeatureArray:
        """All parts of `key`; raises KeyError if absent, CorruptFeatureFile if damaged."""
        paths = self._part_paths(key)
        if not paths:
            raise KeyError(key.stem)
        parts, labels, ids, meta = [], [], [], {}
        for path in paths:
            features, table = self._read_part(path, verify)
            parts.append(features)
            labels.append(table.column("label").to_numpy())
            ids.extend(table.column("image_id").to_pylist())
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        return FeatureArray(parts, np.concatenate(labels), ids, meta)

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
