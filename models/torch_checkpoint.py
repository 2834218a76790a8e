"""Read a legacy (pre-1.6, non-zip) ``torch.save`` file of tensors into NumPy arrays, without PyTorch.

PyTorch is not installed here (and must not be), yet pretrained weights ship as ``.pth`` files. A plain
``pickle.load`` would also run whatever code the file names; this unpickler admits only the few globals a
state_dict needs (``torch._utils._rebuild_tensor_v2``, the ``torch.*Storage`` classes and
``collections.OrderedDict``) and refuses anything else by name, so a malicious file cannot run code.

Legacy layout: five pickles in a row (magic number, protocol version, sys info, the object, the list of
storage keys), then for each storage key in that order an 8-byte little-endian element count and the raw
little-endian data.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import PneumoniaError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "BFloat16Storage": "bfloat16",  # resolved through ml_dtypes (a Keras dependency) on use
}


class CheckpointError(PneumoniaError, ValueError):
    """A file that is not a legacy torch.save of tensors, or that names a global outside the allow-list."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        code = _STORAGE_DTYPES[self.name]
        if code == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(code)


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the object pickle; its data follows the pickles. ``view`` = (offset, size) or None."""

    key: str
    type: _StorageType
    numel: int
    view: tuple[int, int] | None


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise CheckpointError(
            f"refusing global {module}.{name}: only torch._utils._rebuild_tensor_v2, torch.*Storage and "
            "collections.OrderedDict are allowed in a checkpoint of tensors"
        )

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel, view_metadata); view_metadata = (view_key, offset, size)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"storage {key!r} has type {storage_type!r}, not a torch.*Storage")
        return _StorageRef(str(key), storage_type, int(numel), None if view is None else (int(view[1]), int(view[2])))


def _load_pickle(stream: io.BytesIO):
    return _RestrictedUnpickler(stream).load()


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy ``torch.save(state_dict)`` file as contiguous arrays, keyed as in the file."""
    data = Path(path).read_bytes()
    if data[:2] == b"PK":
        raise CheckpointError(f"{path} is a zip-format (torch >= 1.6) checkpoint; only the legacy format is read here")
    stream = io.BytesIO(data)
    try:
        if _load_pickle(stream) != MAGIC_NUMBER:
            raise CheckpointError(f"{path} is not a legacy torch.save file (wrong magic number)")
        if (version := _load_pickle(stream)) != PROTOCOL_VERSION:
            raise CheckpointError(f"{path}: unsupported torch.save protocol version {version}")
        sys_info = _load_pickle(stream)
        if not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path} was written on a big-endian machine")
        obj = _load_pickle(stream)
        keys = _load_pickle(stream)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or garbled pickles
        raise CheckpointError(f"{path} is not a readable legacy torch.save file: {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _TensorRef) for k, v in obj.items()):
        raise CheckpointError(f"{path} does not hold a flat state_dict of tensors")

    types = {ref.storage.key: ref.storage.type for ref in obj.values()}
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in types:
            raise CheckpointError(f"{path}: storage {key!r} is listed but used by no tensor")
        dtype = types[key].dtype
        count = np.frombuffer(stream.read(8), "<i8")
        if count.size != 1:
            raise CheckpointError(f"{path} ends before storage {key!r}")
        raw = stream.read(int(count[0]) * dtype.itemsize)
        if len(raw) != int(count[0]) * dtype.itemsize:
            raise CheckpointError(f"{path} ends inside storage {key!r}")
        storages[key] = np.frombuffer(raw, dtype)
    if stream.read(1):
        raise CheckpointError(f"{path} has trailing bytes after its storages")

    tensors = {}
    for name, ref in obj.items():
        if ref.storage.key not in storages:
            raise CheckpointError(f"{path}: tensor {name!r} uses storage {ref.storage.key!r}, which is not in the file")
        flat = storages[ref.storage.key]
        if ref.storage.view is not None:
            start, size = ref.storage.view
            flat = flat[start : start + size]
        extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
        if min(ref.shape, default=1) > 0 and extent > flat.size:
            raise CheckpointError(f"{path}: tensor {name!r} reaches past the end of its storage")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[ref.offset :], ref.shape, [s * itemsize for s in ref.stride])
        tensors[name] = np.array(view, order="C")  # a C-contiguous, writable copy
    return tensors
