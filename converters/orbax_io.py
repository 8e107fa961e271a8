"""Write and read Orbax PyTree checkpoints one tensor (one layer) at a time.

Why not `orbax.checkpoint` save: it takes whole arrays, and a stacked parameter of the 13B
model ([40, 5120, 13824] float32 = 11 GB) would have to be assembled in memory from layers
that are spread over several source shards. Instead each parameter is created up front as a
zarr (v2) array through TensorStore, in the non-OCDBT layout that Orbax itself writes with
`use_ocdbt=False` (`<dir>/<a.b.c>/.zarray` + chunk files, plus `_METADATA`), and every
converted tensor is written into its slice as soon as it is read. Peak memory is one source
tensor and its converted copy. Orbax restores the result like any of its own checkpoints
(with target shardings: each process reads only the chunks of its shards); the tests
restore it with Orbax to keep this honest.

Chunks: one layer of a stacked parameter at most, halved along the largest even dimension
until a chunk is at most CHUNK_BYTES, so a sharded restore reads little beyond its shards.
The converter also reads big source tensors in row blocks that cover whole chunks (see
to_jax.convert_tensor), so even the 32000 x 5120 embedding never sits in memory at once.
No compression (weights hardly compress; zstd would cost minutes on 26 GB).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

CHUNK_BYTES = 64 << 20
ITEM_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"


def _ts():
    import tensorstore as ts

    return ts


def _context():
    ts = _ts()
    # No cache: written chunks go straight to disk and are not kept in memory.
    return ts.Context(
        {
            "cache_pool": {"total_bytes_limit": 0},
            "data_copy_concurrency": {"limit": 4},
            "file_io_concurrency": {"limit": 8},
        }
    )


def zarr_dtype(dt) -> str:
    """The zarr v2 dtype string of a numpy dtype (bfloat16 as TensorStore spells it)."""
    dt = np.dtype(dt)
    if dt.name == "bfloat16":
        return "bfloat16"
    return dt.str


def chunk_shape(shape, itemsize: int, stacked: bool, limit: int | None = None) -> list[int]:
    """Chunk shape: one layer of a stacked array, halved along even dims down to `limit` bytes."""
    limit = CHUNK_BYTES if limit is None else limit
    chunk = list(shape)
    first = 0
    if stacked and chunk:
        chunk[0] = 1
        first = 1
    while int(np.prod(chunk, dtype=np.int64)) * itemsize > limit:
        dims = [i for i in range(first, len(chunk)) if chunk[i] % 2 == 0]
        if not dims:
            break
        i = max(dims, key=lambda d: chunk[d])
        chunk[i] //= 2
    return chunk


def orbax_name(path: str) -> str:
    """Orbax's on-disk name of a 'a/b/c' parameter path ('a.b.c')."""
    return path.replace("/", ".")


class ParamWriter:
    """Creates the arrays of an Orbax PyTree checkpoint and fills them slice by slice."""

    def __init__(self, directory):
        self.dir = Path(directory).absolute()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ctx = _context()
        self.arrays: dict[str, object] = {}
        self.meta: dict[str, tuple] = {}
        self.pending = None
        self.bytes_written = 0
        self.started = time.time_ns()

    def create(self, path: str, shape, dtype, *, stacked: bool = False):
        """Create the zarr array of parameter `path` ('llm/layers/q_proj')."""
        ts = _ts()
        dt = np.dtype(dtype)
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(self.dir / orbax_name(path))},
            "metadata": {
                "shape": list(shape),
                "chunks": chunk_shape(shape, dt.itemsize, stacked),
                "dtype": zarr_dtype(dt),
                "compressor": None,
                "order": "C",
                "dimension_separator": ".",
                "fill_value": None,
                "filters": None,
            },
        }
        self.arrays[path] = ts.open(spec, create=True, delete_existing=True, context=self.ctx).result()
        self.meta[path] = (tuple(shape), dt, tuple(spec["metadata"]["chunks"]), stacked)

    def slot_chunks(self, path: str) -> tuple[int, ...]:
        """The chunk shape of one slot (one layer of a stacked parameter, else the whole)."""
        _, _, chunks, stacked = self.meta[path]
        return chunks[1:] if stacked else chunks

    def write(self, path: str, value: np.ndarray, layer: int | None = None, *, axis: int | None = None, start: int = 0):
        """Write a whole parameter or one layer of a stacked one, or (axis, start) the block
        value occupies along `axis` of that slot; cast to the array's dtype."""
        shape, dt, _, _ = self.meta[path]
        value = np.ascontiguousarray(value, dtype=dt)
        want = list(shape[1:] if layer is not None else shape)
        if axis is not None:
            want[axis] = value.shape[axis]
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"{path}: writing shape {value.shape} into a slot of {tuple(want)}")
        arr = self.arrays[path]
        target = arr[layer] if layer is not None else arr
        if axis is not None:
            index = [slice(None)] * len(want)
            index[axis] = slice(start, start + value.shape[axis])
            target = target[tuple(index)]
        self.flush()
        # One write in flight: the next tensor is read while this one goes to disk.
        self.pending = (target.write(value), value)
        self.bytes_written += value.nbytes

    def flush(self):
        """Wait for the write in flight."""
        if self.pending is not None:
            self.pending[0].result()
            self.pending = None

    def close(self, custom_metadata: dict | None = None):
        """Finish: wait for writes, then write Orbax's _METADATA and _CHECKPOINT_METADATA."""
        self.flush()
        tree = {}
        for path in self.meta:
            keys = path.split("/")
            tree[str(tuple(keys))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in keys],  # 2 = dict key
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
            }
        meta = {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": custom_metadata,
        }
        (self.dir / "_METADATA").write_text(json.dumps(meta))
        (self.dir / "_CHECKPOINT_METADATA").write_text(
            json.dumps(
                {
                    "item_handlers": ITEM_HANDLER,
                    "metrics": {},
                    "performance_metrics": {},
                    "init_timestamp_nsecs": self.started,
                    "commit_timestamp_nsecs": time.time_ns(),
                    "custom_metadata": {},
                }
            )
        )
        self.arrays.clear()


class ParamReader:
    """Reads the arrays of an Orbax PyTree checkpoint (any layout Orbax writes: plain zarr,
    zarr3, OCDBT) one parameter or one layer at a time, through TensorStore."""

    def __init__(self, item_dir, prefix=(), suffix=()):
        self.dir = Path(item_dir).absolute()
        meta = json.loads((self.dir / "_METADATA").read_text())
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.ctx = _context()
        self.names = {}  # 'llm/layers/q_proj' -> orbax name
        for entry in meta["tree_metadata"].values():
            keys = tuple(str(k["key"]) for k in entry["key_metadata"])
            if keys[: len(prefix)] != tuple(prefix):
                continue
            inner = keys[len(prefix) : len(keys) - len(suffix)]
            if suffix and keys[len(keys) - len(suffix) :] != tuple(suffix):
                continue
            self.names["/".join(inner)] = ".".join(keys)
        self._open: dict[str, object] = {}

    def array(self, path: str):
        """The TensorStore array of parameter `path` (opened once)."""
        if path not in self._open:
            ts = _ts()
            name = self.names[path]
            if self.use_ocdbt:
                kv = {"driver": "ocdbt", "base": f"file://{self.dir}/", "path": name}
            else:
                kv = {"driver": "file", "path": str(self.dir / name)}
            spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv}
            self._open[path] = ts.open(spec, open=True, context=self.ctx).result()
        return self._open[path]

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self.array(path).shape)

    def dtype(self, path: str) -> np.dtype:
        return np.dtype(self.array(path).dtype.numpy_dtype)

    def read(self, path: str, layer: int | None = None) -> np.ndarray:
        """One parameter, or one layer of a stacked parameter, as numpy."""
        arr = self.array(path)
        if layer is not None:
            arr = arr[layer]
        return np.asarray(arr.read().result())
