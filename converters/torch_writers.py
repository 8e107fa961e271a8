"""Write PyTorch checkpoint files tensor by tensor without torch: safetensors, and torch's
zip `.bin` format (the pickle is emitted opcode by opcode: an OrderedDict of
`torch._utils._rebuild_tensor_v2` calls on persistent storages, exactly what torch.save
writes for a state dict, loadable with `torch.load(weights_only=True)`).

Both writers take the full list of (key, shape, dtype) up front and a function that
produces one tensor at a time, either whole or as an iterable of row blocks (consecutive
slices along dim 0), so at most one tensor, or one block of a big one, is in memory.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from converters.readers import SAFETENSORS_NAMES, TORCH_STORAGE_NAMES

Entry = tuple  # (key, shape, np.dtype)


def _blocks(produced, key, shape, dt):
    """Contiguous byte views of a produced tensor (whole or row blocks), checked against the plan."""
    blocks = [produced] if isinstance(produced, np.ndarray) else produced
    rows = 0
    for x in blocks:
        whole = tuple(x.shape) == tuple(shape)
        if x.dtype != dt or not (whole or (len(shape) and tuple(x.shape[1:]) == tuple(shape[1:]))):
            raise ValueError(f"{key}: produced {x.shape} {x.dtype}, planned {tuple(shape)} {dt}")
        rows += x.shape[0] if len(shape) else 1
        yield memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8))
    if rows != (shape[0] if len(shape) else 1):
        raise ValueError(f"{key}: produced {rows} rows, planned {tuple(shape)}")


def write_safetensors(
    path, entries: Sequence[Entry], produce: Callable[[str], np.ndarray], metadata: dict | None = None
) -> int:
    """Write a .safetensors file from planned entries, one tensor at a time; returns bytes."""
    header = {}
    offset = 0
    for key, shape, dt in entries:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[key] = {
            "dtype": SAFETENSORS_NAMES[np.dtype(dt)],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dt in entries:
            for b in _blocks(produce(key), key, shape, np.dtype(dt)):
                f.write(b)
    return offset


# --- torch zip pickle ---------------------------------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _tuple(items: Sequence[int]) -> bytes:
    return b"(" + b"".join(_int(int(i)) for i in items) + b"t"


def state_dict_pickle(entries: Sequence[Entry]) -> bytes:
    """The data.pkl of a torch zip checkpoint holding `entries` (storage i = entry i)."""
    out = bytearray(b"\x80\x02")
    out += _global("collections", "OrderedDict") + b")R"
    out += b"("
    for i, (key, shape, dt) in enumerate(entries):
        shape = tuple(int(s) for s in shape)
        numel = int(np.prod(shape, dtype=np.int64))
        strides = tuple(int(np.prod(shape[j + 1 :], dtype=np.int64)) for j in range(len(shape)))
        out += _str(key)
        out += _global("torch._utils", "_rebuild_tensor_v2")
        out += b"("
        out += (
            b"("
            + _str("storage")
            + _global("torch", TORCH_STORAGE_NAMES[np.dtype(dt)])
            + _str(str(i))
            + _str("cpu")
            + _int(numel)
            + b"tQ"
        )
        out += _int(0) + _tuple(shape) + _tuple(strides) + b"\x89"
        out += _global("collections", "OrderedDict") + b")R"
        out += b"tR"
    out += b"u."
    return bytes(out)


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int, align: int = 64):
    """(ZipInfo, zip64) for a stored record whose data starts at a multiple of `align` (as
    torch aligns storages); zipfile appends a 20-byte zip64 field for big records."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    start = zf.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = -(start + 4) % align
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info, zip64


def _record(zf, name, blocks, size):
    info, zip64 = _aligned_info(zf, name, size)
    with zf.open(info, "w", force_zip64=zip64) as f:
        for b in blocks:
            f.write(b)


def write_torch_bin(path, entries: Sequence[Entry], produce: Callable[[str], np.ndarray]) -> int:
    """Write a torch zip `.bin` state dict (torch.save layout) one tensor at a time; bytes."""
    archive = Path(path).stem.replace(".", "_") or "archive"
    total = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        pkl = state_dict_pickle(entries)
        _record(zf, f"{archive}/data.pkl", [pkl], len(pkl))
        _record(zf, f"{archive}/byteorder", [b"little"], 6)
        for i, (key, shape, dt) in enumerate(entries):
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            _record(zf, f"{archive}/data/{i}", _blocks(produce(key), key, shape, np.dtype(dt)), n)
            total += n
        _record(zf, f"{archive}/version", [b"3\n"], 2)
    return total


def parse_size(s) -> int:
    """'5GB' / '500MB' / 1234 -> bytes."""
    if isinstance(s, int):
        return s
    s = str(s).strip().upper()
    for unit, mult in (
        ("GIB", 2**30),
        ("MIB", 2**20),
        ("KIB", 2**10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
        ("B", 1),
    ):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def shard_entries(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Split entries into consecutive shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def write_sharded(
    dst, entries: Sequence[Entry], produce, *, kind: str = "safetensors", max_shard_size="5GB"
) -> list[str]:
    """Write (sharded, with the HF index above max_shard_size) weights; returns file names."""
    dst = Path(dst)
    shards = shard_entries(entries, parse_size(max_shard_size))
    n = len(shards)
    if kind == "safetensors":
        single, pattern, index = (
            "model.safetensors",
            "model-{:05d}-of-{:05d}.safetensors",
            "model.safetensors.index.json",
        )
    elif kind == "bin":
        single, pattern, index = (
            "pytorch_model.bin",
            "pytorch_model-{:05d}-of-{:05d}.bin",
            "pytorch_model.bin.index.json",
        )
    else:
        raise ValueError(kind)
    names = [single] if n == 1 else [pattern.format(i + 1, n) for i in range(n)]
    total = 0
    weight_map = {}
    for name, shard in zip(names, shards):
        if kind == "safetensors":
            total += write_safetensors(dst / name, shard, produce)
        else:
            total += write_torch_bin(dst / name, shard, produce)
        weight_map.update({e[0]: name for e in shard})
    if n > 1:
        (dst / index).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    return names
