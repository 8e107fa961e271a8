"""Tensor-by-tensor readers for PyTorch checkpoints: `.safetensors` and torch `.bin` pickles.

Nothing here imports torch (only the fallback for the legacy, pre-zip `.bin` format does).
A reader lists every tensor's key, shape and dtype from headers alone, and reads one tensor
at a time into a fresh numpy buffer, so peak host memory stays near the largest tensor:

- safetensors: the 8-byte header length, the JSON header, then raw little-endian bytes.
- torch zip `.bin` (torch >= 1.6): `<archive>/data.pkl` holds the structure; each storage is
  an uncompressed zip record `<archive>/data/<key>`. The pickle is read by a restricted
  unpickler that only knows the handful of globals a state dict needs (no code can run);
  storages become lazy references that are read when a tensor is asked for.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read; the message names the file and what to do."""


# --- dtypes ---------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# torch storage class names (as pickled: `torch.<Name>`) -> numpy dtype.
TORCH_STORAGES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
TORCH_STORAGE_NAMES = {v: k for k, v in TORCH_STORAGES.items()}


def dtype_name(dt) -> str:
    """A short dtype name (float32, bfloat16, ...) for reports."""
    return np.dtype(dt).name


def _read_exact(f, offset: int, nbytes: int, path) -> np.ndarray:
    """nbytes from offset into a fresh uint8 buffer (readinto: no intermediate bytes object)."""
    buf = np.empty(nbytes, np.uint8)
    f.seek(offset)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = f.readinto(view[got : got + (1 << 30)])
        if not n:
            raise CheckpointReadError(
                f"{path}: file ends early (truncated download?) at byte "
                f"{offset + got} of a tensor that needs {nbytes} bytes"
            )
        got += n
    return buf


# --- one tensor ---------------------------------------------------------------------------


@dataclasses.dataclass
class TensorInfo:
    """One tensor of a checkpoint: key, shape, dtype, the file it lives in, and a reader."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: str
    _read: Callable[[], np.ndarray] = dataclasses.field(repr=False, default=None)
    # (start, stop) -> rows start:stop of dim 0, reading only those bytes (contiguous tensors).
    _read_rows: Callable[[int, int], np.ndarray] | None = dataclasses.field(repr=False, default=None)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The tensor as a numpy array in its stored dtype (a fresh buffer)."""
        return self._read()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop (of dim 0); reads only those bytes when the layout allows."""
        if self._read_rows is not None:
            return self._read_rows(start, stop)
        return np.ascontiguousarray(self._read()[start:stop])


# --- safetensors --------------------------------------------------------------------------


def safetensors_infos(path) -> list[TensorInfo]:
    """TensorInfos of a .safetensors file, from its header alone."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointReadError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise CheckpointReadError(
                f"{path}: header length {n} is implausible; not a "
                "safetensors file or a Git LFS pointer (run `git lfs pull`)"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointReadError(
                f"{path}: unreadable safetensors header ({e}); is it a Git LFS pointer or a partial download?"
            ) from None
    base = 8 + n
    size = os.path.getsize(path)
    out = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointReadError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}")
        dt = SAFETENSORS_DTYPES[meta["dtype"]]
        shape = tuple(int(s) for s in meta["shape"])
        begin, end = meta["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize or base + end > size:
            raise CheckpointReadError(
                f"{path}: tensor {key} has inconsistent offsets "
                f"{begin}..{end} for shape {shape} {dt.name} (truncated file?)"
            )

        def read(begin=begin, end=end, dt=dt, shape=shape):
            with open(path, "rb") as f:
                return _read_exact(f, base + begin, end - begin, path).view(dt).reshape(shape)

        def read_rows(start, stop, begin=begin, dt=dt, shape=shape):
            row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
            stop = min(stop, shape[0])
            with open(path, "rb") as f:
                raw = _read_exact(f, base + begin + start * row, (stop - start) * row, path)
            return raw.view(dt).reshape((stop - start,) + shape[1:])

        out.append(TensorInfo(key, shape, dt, path, read, read_rows if shape else None))
    return out


# --- torch zip pickles --------------------------------------------------------------------


class _Storage:
    """A lazy torch storage: a zip record holding `numel` items of `dtype`."""

    def __init__(self, reader: _ZipRecords, key: str, dtype: np.dtype, numel: int):
        self.reader, self.key, self.dtype, self.numel = reader, key, dtype, numel


@dataclasses.dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def read(self) -> np.ndarray:
        dt = self.storage.dtype
        if any(s == 0 for s in self.shape):
            return np.zeros(self.shape, dt)
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        raw = self.storage.reader.read(self.storage.key, self.offset * dt.itemsize, span * dt.itemsize)
        flat = raw.view(dt)
        if self.storage.reader.big_endian:
            flat = flat.byteswap()
        contiguous = tuple(int(np.prod(self.shape[i + 1 :], dtype=np.int64)) for i in range(len(self.shape)))
        if tuple(self.stride) == contiguous or len(self.shape) == 0:
            return flat[: max(1, int(np.prod(self.shape, dtype=np.int64)))].reshape(self.shape)
        view = np.lib.stride_tricks.as_strided(
            flat, self.shape, tuple(s * dt.itemsize for s in self.stride), writeable=False
        )
        return np.ascontiguousarray(view)

    @property
    def contiguous(self) -> bool:
        want = tuple(int(np.prod(self.shape[i + 1 :], dtype=np.int64)) for i in range(len(self.shape)))
        return len(self.shape) > 0 and all(s == w for n, s, w in zip(self.shape, self.stride, want) if n != 1)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        dt = self.storage.dtype
        stop = min(stop, self.shape[0])
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        raw = self.storage.reader.read(
            self.storage.key, (self.offset + start * row) * dt.itemsize, (stop - start) * row * dt.itemsize
        )
        flat = raw.view(dt)
        if self.storage.reader.big_endian:
            flat = flat.byteswap()
        return flat.reshape((stop - start,) + self.shape[1:])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called without a storage")
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = TORCH_STORAGES[name]


# The only globals a torch state-dict pickle needs. Anything else (os.system, builtins.eval,
# numpy reconstructors, arbitrary classes) is refused before it can be called.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in TORCH_STORAGES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict with lazy storages; refuses every other global."""

    def __init__(self, file, records: _ZipRecords):
        super().__init__(file)
        self.records = records

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.records.path}: refusing to load global {module}.{name}: a weights file "
                "only needs tensors and OrderedDict. The file may be malicious, or it is not a "
                "plain state dict (e.g. a whole pickled model or training_args.bin); re-save it "
                "with `torch.save(model.state_dict(), ...)` or as safetensors."
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"{self.records.path}: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        return self.records.storage(str(key), stype.dtype, int(numel))


class _ZipRecords:
    """Offsets of the uncompressed records of a torch zip checkpoint; reads byte ranges."""

    def __init__(self, path: str):
        self.path = path
        self._storages: dict[str, _Storage] = {}
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            pkl = [i for i in infos if i.filename.endswith("data.pkl")]
            if len(pkl) != 1:
                raise CheckpointReadError(f"{path}: a zip but not a torch checkpoint (no single data.pkl record)")
            self.prefix = pkl[0].filename[: -len("data.pkl")]
            self.pickle_bytes = zf.read(pkl[0])
            names = {i.filename: i for i in infos}
            bo = names.get(self.prefix + "byteorder")
            self.big_endian = bo is not None and zf.read(bo).strip() == b"big"
        self.records = {}
        with open(path, "rb") as f:
            for info in infos:
                if not info.filename.startswith(self.prefix + "data/"):
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointReadError(
                        f"{path}: record {info.filename} is compressed; torch "
                        "never writes that. Re-save the checkpoint with torch.save"
                    )
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise CheckpointReadError(f"{path}: bad zip local header for {info.filename}")
                n, m = struct.unpack("<HH", local[26:30])
                key = info.filename[len(self.prefix + "data/") :]
                self.records[key] = (info.header_offset + 30 + n + m, info.file_size)

    def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
        if key not in self.records:
            raise CheckpointReadError(f"{self.path}: storage record data/{key} is missing")
        st = self._storages.get(key)
        if st is None:
            st = self._storages[key] = _Storage(self, key, dtype, numel)
        return st

    def read(self, key: str, start: int, nbytes: int) -> np.ndarray:
        offset, size = self.records[key]
        if start + nbytes > size:
            raise CheckpointReadError(f"{self.path}: tensor reads past the end of record data/{key}")
        with open(self.path, "rb") as f:
            return _read_exact(f, offset + start, nbytes, self.path)


def _state_dict_items(obj, path: str):
    """The flat (key, tensor) items of an unpickled checkpoint object."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for k, v in obj.items():
        if not isinstance(v, _LazyTensor):
            raise CheckpointReadError(
                f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; only flat state dicts are supported"
            )
        yield str(k), v


def torch_zip_infos(path) -> list[TensorInfo]:
    """TensorInfos of a torch zip `.bin`/`.pt` file without importing torch."""
    path = str(path)
    records = _ZipRecords(path)
    obj = RestrictedUnpickler(io.BytesIO(records.pickle_bytes), records).load()
    return [
        TensorInfo(k, t.shape, t.storage.dtype, path, t.read, t.read_rows if t.contiguous else None)
        for k, t in _state_dict_items(obj, path)
    ]


def torch_legacy_infos(path) -> list[TensorInfo]:
    """TensorInfos of a legacy (pre-zip) torch file: loaded whole with torch's weights_only."""
    try:
        import torch
    except ImportError:
        raise CheckpointReadError(
            f"{path}: a legacy (non-zip) torch file; reading it needs torch installed, or re-save it as safetensors"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointReadError(f"{path}: torch.load(weights_only=True) refused it: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    out = []
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointReadError(f"{path}: entry {k!r} is not a tensor")
        v = v.detach().contiguous()
        if v.dtype == torch.bfloat16:
            arr = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            arr = v.numpy()
        out.append(TensorInfo(str(k), tuple(arr.shape), arr.dtype, path, lambda a=arr: a.copy()))
    return out


def torch_infos(path) -> list[TensorInfo]:
    """TensorInfos of a torch `.bin`/`.pt` file (zip format lazily; legacy via torch)."""
    if zipfile.is_zipfile(path):
        return torch_zip_infos(path)
    return torch_legacy_infos(path)


def file_infos(path) -> list[TensorInfo]:
    """TensorInfos of one weights file, by its extension."""
    p = str(path)
    if p.endswith(".safetensors"):
        return safetensors_infos(p)
    if p.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return torch_infos(p)
    raise CheckpointReadError(f"{p}: unknown weights file type (expected .safetensors or .bin)")


# --- directories --------------------------------------------------------------------------

# Files in a training output that are pickles but never weights.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state")


def weight_files(src) -> list[Path]:
    """The weight files of a checkpoint file or directory (index-driven when sharded)."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise CheckpointReadError(f"{src}: no such file or directory")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointReadError(f"{index}: not a valid index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (src / f).exists()]
            if missing:
                raise CheckpointReadError(
                    f"{index} lists shard(s) that are not there: {', '.join(missing)}; download every shard"
                )
            return [src / f for f in files]
    st = sorted(src.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(p for p in src.glob("*.bin") if p.name not in NOT_WEIGHTS)
    model_bins = [p for p in bins if p.name.startswith("pytorch_model")]
    if model_bins:
        return model_bins
    if bins:
        return bins
    raise CheckpointReadError(
        f"{src}: no weights found (*.safetensors, pytorch_model*.bin, mm_projector.bin or an index)"
    )


def read_index(src) -> dict[str, str] | None:
    """The weight_map of a sharded checkpoint directory, or None."""
    src = Path(src)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if src.is_dir() and (src / index_name).exists():
            return json.loads((src / index_name).read_text())["weight_map"]
    return None


def checkpoint_infos(src) -> list[TensorInfo]:
    """TensorInfos of every tensor of a checkpoint file or directory, from headers only.

    Checks a sharded checkpoint's index against the shards: a key the index lists that is
    not in its shard is an error naming both.
    """
    files = weight_files(src)
    infos: list[TensorInfo] = []
    seen: dict[str, str] = {}
    for f in files:
        for info in file_infos(f):
            if info.key in seen:
                raise CheckpointReadError(f"tensor {info.key} is in both {seen[info.key]} and {f}")
            seen[info.key] = str(f)
            infos.append(info)
    index = read_index(src)
    if index:
        lost = [k for k, f in index.items() if seen.get(k) is None or Path(seen[k]).name != f]
        if lost:
            raise CheckpointReadError(
                f"{src}: the index lists {len(lost)} tensor(s) not found in "
                f"their shard, e.g. {lost[0]} (expected in {index[lost[0]]})"
            )
    return infos
