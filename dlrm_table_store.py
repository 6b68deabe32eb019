"""The table store: a model's quantized embedding tables written once to a file, then
memory-mapped read-only by every process that serves that model.

One entry = one safetensors file in the store directory, holding the host buffer of every
fbgemm table-batched embedding (TBE) of a sharded model, in the order TorchRec creates them::

    <store>/<label>-<key[:16]>.safetensors
        header (JSON, safetensors' own format)  __metadata__: format, key, key_json, layouts, crc32
        tbe0   uint8[bytes of TBE 0]   the TBE's ``weights_host``, byte for byte: per table
        tbe1   ...                     rows x (scale/bias + codes), tables 128 B aligned

Why safetensors: a header of JSON and raw bytes, nothing that runs code on load; the library
maps the file (``safe_open``: MAP_PRIVATE, zero copy) and its simple layout lets an entry be
written in place (no second 12 GB copy), the header last.

Why it helps: a worker's tables become file-backed pages of the OS page cache instead of
anonymous memory, so N workers (and a restarted one) share one copy, a new worker maps
instead of rebuilding, and tables larger than RAM page in on use.

The contract (SPEC §7):
- ``key``: sha256 of a JSON description of everything that decides the bytes (the caller,
  ``dlrm_factory.store_key``, says what: tables, dtype, init or checkpoint digest, plan,
  versions). Same key, same bytes: the file is named after the key and its header repeats it.
- Published atomically: written as ``.<name>.tmp.<pid>``, flushed, its header (with a CRC-32
  of every 64 MiB block) written last, fsynced, then renamed. A build that dies (kill -9, disk
  full: space is reserved up front with ``posix_fallocate``) leaves only a temp file, which
  the next build removes.
- Built once: builders hold an exclusive ``flock`` on ``.<name>.lock``; a process that finds
  the lock taken waits, then maps what the other built.
- Checked before use: the header must parse (safetensors checks that the offsets cover the
  file exactly: a truncated file fails), name the expected key, format and tensors, and the
  blocks must match their CRC-32: all of them for entries up to ``FULL_VERIFY_MAX_BYTES``,
  else the first and last block of every tensor and ``SAMPLED_BLOCKS`` more (reading 12 GB
  at every start would cost more than the start itself, and defeat tables larger than RAM).
  ``python dlrm_table_store.py verify DIR`` checks every block of every entry. A bad entry is
  removed and rebuilt where the store is writable; in a read-only store it is an error that
  names the file.

Placing mapped buffers into TorchRec's TBEs needs one patch, in one place:
``tbe_weights_from`` replaces fbgemm's ``IntNBitTableBatchedEmbeddingBagsCodegen._apply_split``
(the step that allocates ``torch.zeros`` of the tables) while TorchRec shards, so the TBEs
take the given buffers (or meta tensors, to learn the layout) and nothing is allocated.
"""

import contextlib
import ctypes
import fcntl
import glob
import hashlib
import json
import logging
import mmap
import os
import random
import resource
import struct
import sys
import tempfile
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
    nbit_construct_split_state,
    rounded_row_size_in_bytes,
    unpadded_row_size_in_bytes,
)
from safetensors import safe_open

logger = logging.getLogger(__name__)

FORMAT = "dlrm-table-store/1"  # bump when the layout or what the bytes mean changes
BLOCK_BYTES = 64 << 20  # CRC-32 granularity
# Entries up to this size are checked block by block on open; larger ones: the first and last
# block of each tensor and SAMPLED_BLOCKS more, then every block in the background while they
# serve (``verify_in_background``). Both can be set from the environment (tests make a small
# entry count as large).
FULL_VERIFY_MAX_BYTES = int(os.environ.get("DLRM_STORE_FULL_VERIFY_MAX_BYTES", 1 << 30))
SAMPLED_BLOCKS = int(os.environ.get("DLRM_STORE_SAMPLED_BLOCKS", 8))
DATA_ALIGNMENT = 4096  # the header is padded so the tables start on a page
CRC_PLACEHOLDER = "00000000"  # same width as a CRC-32 in hex: the header's size is fixed early
VERIFY_THREADS = 2
_PATCH_LOCK = threading.Lock()  # one tbe_weights_from at a time (it patches a class)

# One table shard inside a TBE's host buffer.
Shard = Tuple[str, int, torch.Tensor, Optional[torch.Tensor]]  # name, first row, rows, scale/bias


class Entry(NamedTuple):
    """A mapped store entry: ``tensors[k]`` is the host buffer of the k-th TBE (read-only
    mapping, copy-on-write), ``layouts[k]`` describes its tables; ``built``: this process
    wrote the entry (False: it was there); ``maps[k]``: in an ordered entry, the k-th TBE's
    id -> row map (int32, its tables one after the other), else None."""

    path: str
    tensors: List[torch.Tensor]
    layouts: List[Dict[str, Any]]
    built: bool
    maps: Tuple[Optional[torch.Tensor], ...] = ()


class StoreError(ValueError):
    """A store problem the user must act on (read-only store without a valid entry, no
    space); the message names the path and what to do."""


# ---------------------------------------------------------------------------------------
# Layout: where each table's rows sit in a TBE's host buffer (fbgemm's CPU layout).
# ---------------------------------------------------------------------------------------


def tbe_layout(tbe: IntNBitTableBatchedEmbeddingBagsCodegen, row_offsets: List[int]) -> Dict[str, Any]:
    """The host layout of ``tbe``'s tables, as fbgemm lays out a CPU TBE (rows unpadded,
    tables aligned to 128 B) whatever the TBE's device: the entry's layout on every device.
    ``row_offsets``: each table shard's first row in its whole table."""
    if tbe.reverse_qparam:
        raise NotImplementedError("TBEs with scale/bias after the row (reverse_qparam) are not supported")
    host_specs = [(name, rows, dim, ty, EmbeddingLocation.HOST) for name, rows, dim, ty, _ in tbe.embedding_specs]
    split = nbit_construct_split_state(
        host_specs,
        cacheable=True,
        row_alignment=1,
        scale_bias_size_in_bytes=tbe.scale_bias_size_in_bytes,
        cacheline_alignment=True,
    )
    tables = []
    for (name, rows, dim, ty, _), offset, row_offset in zip(tbe.embedding_specs, split.offsets, row_offsets):
        quantized = ty in (SparseType.INT8, SparseType.INT4, SparseType.INT2)
        tables.append(
            {
                "name": name,
                "row_offset": row_offset,
                "rows": rows,
                "dim": dim,
                "dtype": ty.value,
                "row_bytes": unpadded_row_size_in_bytes(dim, ty, tbe.scale_bias_size_in_bytes),
                "scale_bias_bytes": tbe.scale_bias_size_in_bytes if quantized else 0,
                "offset": offset,
            }
        )
    return {"bytes": split.host_size, "tables": tables}


def table_shards(buffer: torch.Tensor, layout: Dict[str, Any]) -> List[Shard]:
    """Views of each table of a host buffer: (name, first row, rows [R, values], scale/bias
    [R, 4] or None) - the same views fbgemm's ``split_embedding_weights`` gives of a CPU TBE."""
    shards = []
    for t in layout["tables"]:
        rows = buffer[t["offset"] : t["offset"] + t["rows"] * t["row_bytes"]].view(t["rows"], t["row_bytes"])
        sb = t["scale_bias_bytes"]
        shards.append((t["name"], t["row_offset"], rows[:, sb:], rows[:, :sb]) if sb else (t["name"], t["row_offset"], rows, None))
    return shards


@contextlib.contextmanager
def tbe_weights_from(
    weights: Union[List[torch.Tensor], str],
) -> Iterator[List[IntNBitTableBatchedEmbeddingBagsCodegen]]:
    """While TorchRec shards inside this block, the TBEs it creates take their weights from
    ``weights``: a list (the k-th TBE takes ``weights[k]`` as its host weights instead of
    allocating ``torch.zeros``), ``"meta"`` (meta tensors: no memory, to learn the layout),
    or ``"own"`` (fbgemm allocates as usual). Yields the TBEs created, in creation order.

    A given buffer must be exactly the TBE's host size: fbgemm's own offsets then address it
    as they would its own zeros. The replacement applies to TBEs created by this thread only;
    two threads sharding through it take turns."""
    created: List[IntNBitTableBatchedEmbeddingBagsCodegen] = []
    original = IntNBitTableBatchedEmbeddingBagsCodegen._apply_split
    owner = threading.get_ident()

    def apply_split(tbe: Any, dev_size: int, host_size: int, uvm_size: int, placements: List[int],
                    offsets: List[int], enforce_hbm: bool) -> None:  # fmt: skip
        if threading.get_ident() != owner:  # another thread's TBE: fbgemm's own allocation
            return original(tbe, dev_size, host_size, uvm_size, placements, offsets, enforce_hbm)
        created.append(tbe)
        if weights == "own":
            return original(tbe, dev_size, host_size, uvm_size, placements, offsets, enforce_hbm)
        tbe.weight_initialized = True
        tbe.weights_physical_placements = placements
        tbe.weights_physical_offsets = offsets
        tbe.host_size, tbe.dev_size, tbe.uvm_size = host_size, dev_size, uvm_size
        tbe.initialize_logical_weights_placements_and_offsets()
        if weights == "meta":
            meta = torch.device("meta")
            tbe.weights_dev = torch.empty(dev_size, dtype=torch.uint8, device=meta)
            tbe.weights_host = torch.empty(host_size, dtype=torch.uint8, device=meta)
            tbe.weights_uvm = torch.empty(uvm_size, dtype=torch.uint8, device=meta)
            return None
        k = len(created) - 1
        given = weights[k].numel() if k < len(weights) else None
        if dev_size or uvm_size or given != host_size:
            raise StoreError(
                f"table store: TorchRec's TBE {k} wants {host_size} host bytes (device {dev_size}, "
                f"uvm {uvm_size}); the entry gives {given} (it holds {len(weights)} TBEs)"
            )
        tbe.weights_host = weights[k]
        return None

    with _PATCH_LOCK:
        IntNBitTableBatchedEmbeddingBagsCodegen._apply_split = apply_split
        try:
            yield created
        finally:
            IntNBitTableBatchedEmbeddingBagsCodegen._apply_split = original
    if not isinstance(weights, str) and len(created) != len(weights):
        raise StoreError(f"table store: TorchRec created {len(created)} TBEs; the entry holds {len(weights)}")


def copy_into_tbes(entry: Entry, tbes: List[IntNBitTableBatchedEmbeddingBagsCodegen], chunk_rows: int = 1 << 18) -> None:
    """Copy an entry's tables into TBEs that hold their own weights (CUDA shards: rows padded
    to 16 B on the device), table by table, ``chunk_rows`` rows at a time.

    The entry is read once, front to back (open it with ``access="sequential"``): the next
    chunk is asked for ahead (``MADV_WILLNEED``: the kernel reads it while this one is copied)
    and each copied chunk is dropped from this process (``MADV_DONTNEED``), so a cold entry
    is read in large requests and the mapping holds about two chunks at a time, none after. TBEs on
    ``meta`` (an entry built without a GPU model, ``dlrm_factory.build_store_entry``) get
    nothing: the entry is not read."""
    if len(tbes) != len(entry.tensors):
        raise StoreError(f"table store: {len(tbes)} TBEs to fill; {entry.path} holds {len(entry.tensors)}")
    for tbe, buffer, layout in zip(tbes, entry.tensors, entry.layouts):
        names = [spec[0] for spec in tbe.embedding_specs]
        if names != [table["name"] for table in layout["tables"]]:
            raise StoreError(f"table store: the TBE holds tables {names}; {entry.path} has "
                             f"{[table['name'] for table in layout['tables']]} there")  # fmt: skip
        targets = tbe.split_embedding_weights(split_scale_shifts=False)  # [R, padded row] each
        for (target, _), table in zip(targets, layout["tables"]):
            width = table["row_bytes"]
            source = buffer[table["offset"] : table["offset"] + table["rows"] * width].view(table["rows"], width)
            if target.shape[0] != table["rows"] or target.shape[1] < width:
                raise StoreError(f"table store: table {table['name']} is {tuple(target.shape)} in the TBE; "
                                 f"{entry.path} has {table['rows']} x {width}")  # fmt: skip
            if target.is_meta:
                continue
            advise(source[:chunk_rows], MADV_WILLNEED)
            for start in range(0, table["rows"], chunk_rows):
                advise(source[start + chunk_rows : start + 2 * chunk_rows], MADV_WILLNEED)
                target[start : start + chunk_rows, :width].copy_(source[start : start + chunk_rows])
                advise(source[start : start + chunk_rows], MADV_DONTNEED)
        advise(buffer, MADV_DONTNEED)  # and what the kernel mapped around the faults (fault-around)


# ---------------------------------------------------------------------------------------
# Files: naming, integrity, opening, building.
# ---------------------------------------------------------------------------------------


def key_digest(key: Dict[str, Any]) -> str:
    """sha256 of the key's canonical JSON."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def entry_path(store_dir: str, label: str, digest: str) -> str:
    return os.path.join(store_dir, f"{label}-{digest[:16]}.safetensors")


# safetensors dtype of an entry's tensors -> (torch dtype, bytes per element)
TENSOR_DTYPES = {"U8": (torch.uint8, 1), "I32": (torch.int32, 4)}


def entry_tensors(layouts: List[Dict[str, Any]]) -> List[Tuple[str, str, int]]:
    """(name, safetensors dtype, bytes) of each tensor of an entry, in file order: every
    TBE's host buffer ``tbe<k>``; then, in an ordered entry, zeros up to the next page
    (``pad``) and every TBE's id -> row map ``map<k>`` (int32; its layout says ``map_rows``)."""
    tensors = [(f"tbe{k}", "U8", layout["bytes"]) for k, layout in enumerate(layouts)]
    maps = [(f"map{k}", "I32", 4 * layout["map_rows"]) for k, layout in enumerate(layouts) if layout.get("map_rows")]
    pad = -sum(size for _, _, size in tensors) % DATA_ALIGNMENT
    return tensors + ([("pad", "U8", pad)] if maps and pad else []) + maps


def _blocks(length: int) -> List[Tuple[int, int]]:
    return [(start, min(length, start + BLOCK_BYTES)) for start in range(0, length, BLOCK_BYTES)] or [(0, 0)]


def _crc(data: Any) -> str:
    """CRC-32 of a bytes-like object (bytes, a numpy array), as 8 hex digits."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _checked_blocks(crcs: Dict[str, List[str]], full: bool) -> List[Tuple[str, int]]:
    """(tensor, block index) pairs to check: all, or first/last of each and a random sample."""
    every = [(name, i) for name in sorted(crcs) for i in range(len(crcs[name]))]
    if full:
        return every
    ends = {(name, 0) for name in crcs} | {(name, len(crcs[name]) - 1) for name in crcs}
    rest = [block for block in every if block not in ends]
    return sorted(ends) + random.Random().sample(rest, min(SAMPLED_BLOCKS, len(rest)))


def verify_blocks(path: str, offsets: Dict[str, Tuple[int, int]], crcs: Dict[str, List[str]], full: bool) -> Optional[str]:
    """None if the checked blocks of the file match their CRC-32s, else what differs.
    ``offsets``: each tensor's (first byte, end) in the file. Read with ``pread``, not
    through the mapping: sequential reads get the kernel's readahead, and the mapping is
    left to the lookups' random access (``MADV_RANDOM``). A sample (not ``full``: an entry
    larger than RAM, maybe) is read around the page cache (``_read_uncached``): its random
    blocks would take the place of the pages the lookups need."""
    checks = _checked_blocks(crcs, full)
    fd, direct = (os.open(path, os.O_RDONLY), False) if full else _open_uncached(path)

    def check(block: Tuple[str, int]) -> Optional[str]:
        name, i = block
        first, end = offsets[name]
        start, stop = _blocks(end - first)[i]
        if direct:
            with mmap.mmap(-1, stop - start + 2 * IO_ALIGNMENT) as buffer:
                data = _read_uncached(fd, direct, buffer, first + start, stop - start)
                size, found = len(data), _crc(data)
                del data  # a view of the buffer
        else:
            data = os.pread(fd, stop - start, first + start)
            size, found = len(data), _crc(data)
        if size != stop - start or found != crcs[name][i]:
            return f"{name} bytes [{start}, {stop}): CRC-32 {found}, header says {crcs[name][i]}"
        return None

    try:
        with ThreadPoolExecutor(VERIFY_THREADS) as pool:  # pread and zlib release the GIL
            return next((bad for bad in pool.map(check, checks) if bad), None)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4
# How a mapped entry will be read (open_entry's ``access``): lookups on the CPU, or one copy
# to the GPUs.
ACCESS_ADVICE = {"random": MADV_RANDOM, "sequential": MADV_SEQUENTIAL}


def advise_random_access(tensor: torch.Tensor) -> None:
    """Tell the kernel a mapped table is read at random (``madvise(MADV_RANDOM)``): a page
    fault then reads that page only, instead of 128 KiB around it (31 pages a lookup does
    not need, each evicting one it may need, when the tables do not fit in RAM)."""
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if tensor.numel() and _libc.madvise(start, end - start, MADV_RANDOM) != 0:
        logger.warning("table store: madvise(MADV_RANDOM) failed: %s", os.strerror(ctypes.get_errno()))


def advise(tensor: torch.Tensor, advice: int) -> None:
    """``madvise(advice)`` over the pages of a mapped tensor (a contiguous byte range; the
    first page rounded down): ``MADV_SEQUENTIAL`` (read ahead, drop pages behind first),
    ``MADV_WILLNEED`` (start reading them now), ``MADV_DONTNEED`` (unmap them from this
    process; the file's pages stay in the page cache for others), ``MADV_RANDOM``."""
    if not tensor.numel():
        return
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if _libc.madvise(start, end - start, advice) != 0:
        logger.warning("table store: madvise(%d) failed: %s", advice, os.strerror(ctypes.get_errno()))


def open_entry(path: str, digest: str, full: Optional[bool] = None, access: str = "random") -> Entry:
    """Map the entry at ``path`` and check it (header, key, blocks); raises ``ValueError``
    saying what is wrong. ``full``: check every block (default: up to FULL_VERIFY_MAX_BYTES).
    ``access``: how the mapping will be read - ``"random"`` (CPU lookups: ``MADV_RANDOM``, no
    readahead) or ``"sequential"`` (one copy to the GPUs, ``copy_into_tbes``: readahead)."""
    if access not in ACCESS_ADVICE:
        raise ValueError(f"table store: access {access!r}; expected one of {sorted(ACCESS_ADVICE)}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
            if metadata.get("key") != digest:
                raise ValueError(f"key {metadata.get('key')!r}, expected {digest!r} (another config's entry)")
            layouts = json.loads(metadata["layouts"])
            crcs = json.loads(metadata["crc32"])
            expected = entry_tensors(layouts)
            names = [name for name, _, _ in expected]
            if sorted(f.keys()) != sorted(names) or sorted(crcs) != sorted(names):
                raise ValueError(f"tensors {sorted(f.keys())}, expected {names}")
            tensors = {name: f.get_tensor(name) for name in names}
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors: truncated, bad header, bad offsets
        raise ValueError(f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    for name, dtype, size in expected:
        torch_dtype, width = TENSOR_DTYPES[dtype]
        if tensors[name].dtype != torch_dtype or tensors[name].numel() * width != size:
            raise ValueError(f"{name} holds {tensors[name].numel()} {tensors[name].dtype}, its layout says {size} bytes")
    offsets = tensor_file_offsets(path, names)
    total = sum(size for _, _, size in expected)
    full = total <= FULL_VERIFY_MAX_BYTES if full is None else full
    bad = verify_blocks(path, offsets, crcs, full)
    if bad:
        raise ValueError(f"corrupted: {bad}")
    for tensor in tensors.values():
        advise_random_access(tensor) if access == "random" else advise(tensor, ACCESS_ADVICE[access])
    maps = tuple(tensors.get(f"map{k}") for k in range(len(layouts)))
    return Entry(path, [tensors[f"tbe{k}"] for k in range(len(layouts))], layouts, built=False, maps=maps)


def tensor_file_offsets(path: str, names: List[str]) -> Dict[str, Tuple[int, int]]:
    """Where each tensor's bytes are in the file: {name: (first byte, end)}, from the
    safetensors header (its offsets count from the end of the header)."""
    header_size, header = read_header(path)
    return {name: (8 + header_size + header[name]["data_offsets"][0], 8 + header_size + header[name]["data_offsets"][1])
            for name in names}  # fmt: skip


def read_header(path: str) -> Tuple[int, Dict[str, Any]]:
    """(size, JSON) of a safetensors file's header, read without readahead (the kernel would
    read megabytes of tables behind it into the page cache)."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        header_size = struct.unpack("<Q", f.read(8))[0]
        return header_size, json.loads(f.read(header_size))


def _header(digest: str, key: Dict[str, Any], layouts: List[Dict[str, Any]], crcs: Dict[str, List[str]]) -> bytes:
    """safetensors header: 8-byte little-endian length, then JSON padded with spaces so the
    data starts on a DATA_ALIGNMENT boundary (both allowed by the format)."""
    tensors: Dict[str, Any] = {}
    start = 0
    for name, dtype, size in entry_tensors(layouts):
        tensors[name] = {"dtype": dtype, "shape": [size // TENSOR_DTYPES[dtype][1]], "data_offsets": [start, start + size]}
        start += size
    metadata = {"format": FORMAT, "key": digest, "key_json": canonical_json(key),
                "layouts": canonical_json(layouts), "crc32": canonical_json(crcs)}  # fmt: skip
    text = json.dumps({"__metadata__": metadata, **tensors}, separators=(",", ":")).encode()
    padded = -(-(8 + len(text)) // DATA_ALIGNMENT) * DATA_ALIGNMENT - 8
    return struct.pack("<Q", padded) + text.ljust(padded, b" ")


def write_entry(path: str, digest: str, key: Dict[str, Any], layouts: List[Dict[str, Any]],
                fill: Callable[[List[torch.Tensor], List[Dict[str, Any]]], None]) -> None:  # fmt: skip
    """Write an entry to ``path`` (a temp name: the caller renames it): reserve the space,
    let ``fill(buffers, layouts)`` write each TBE's host buffer in place (``buffers``: the
    TBEs' buffers, then an ordered entry's maps, all as bytes: ``entry_tensors``), flush,
    CRC the blocks, write the header last, fsync."""
    tensors = entry_tensors(layouts)
    placeholder = {name: [CRC_PLACEHOLDER] * len(_blocks(size)) for name, _, size in tensors}
    header_bytes = len(_header(digest, key, layouts, placeholder))
    total = header_bytes + sum(size for _, _, size in tensors)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as e:
            free = os.statvfs(os.path.dirname(path))
            raise StoreError(
                f"table store: cannot reserve {total / 1e9:.2f} GB for {path} ({os.strerror(e.errno)}; "
                f"{free.f_bavail * free.f_frsize / 1e9:.2f} GB free): free some space or point table_store elsewhere"
            ) from e
        with mmap.mmap(fd, total) as mapped:
            data = torch.frombuffer(mapped, dtype=torch.uint8)
            buffers, start = [], header_bytes
            for _, _, size in tensors:
                buffers.append(data[start : start + size])
                start += size
            fill([b for (name, _, _), b in zip(tensors, buffers) if name != "pad"], layouts)
            mapped.flush()
            with ThreadPoolExecutor(VERIFY_THREADS) as pool:
                crcs = {
                    name: list(pool.map(lambda block, b=buffer: _crc(b[block[0] : block[1]].numpy()), _blocks(buffer.numel())))
                    for (name, _, _), buffer in zip(tensors, buffers)
                }
            del data, buffers  # no view may outlive the mapping
            header = _header(digest, key, layouts, crcs)
            if len(header) != header_bytes:
                raise RuntimeError("table store: header size changed while writing")
            mapped[:header_bytes] = header
            mapped.flush()
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(lock_path: str, what: str) -> Iterator[None]:
    """An exclusive flock on ``lock_path`` (released at exit, or when the process dies)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("table store: another process is building %s; waiting for it", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _writable(store_dir: str) -> bool:
    try:
        os.makedirs(store_dir, exist_ok=True)
    except OSError:
        return False
    return os.access(store_dir, os.W_OK | os.X_OK)


def open_or_build(
    store_dir: str,
    label: str,
    key: Dict[str, Any],
    layouts: Callable[[], List[Dict[str, Any]]],
    fill: Callable[[List[torch.Tensor], List[Dict[str, Any]]], None],
    access: str = "random",
) -> Entry:
    """The store's entry for ``key``, mapped: opened if it is there and sound, else built
    (once, under the lock; ``layouts()`` says what to allocate, ``fill`` writes the tables)
    and published atomically. A read-only store without a sound entry raises StoreError.
    ``access``: how the mapping will be read (``open_entry``)."""
    store_dir = os.path.abspath(store_dir)
    digest = key_digest(key)
    path = entry_path(store_dir, label, digest)
    name = os.path.basename(path)
    problem = "missing"
    if os.path.exists(path):
        try:
            return _open_unless_condemned(path, digest, access)
        except ValueError as e:
            problem = str(e)
    if not _writable(store_dir):
        raise StoreError(
            f"table store {store_dir} is read-only and its entry {path} is {problem}: build it where the "
            f"store is writable (./create_dlrm_mar.sh --table-store DIR ... with this config), or make it writable"
        )
    if problem != "missing":
        logger.warning("table store: %s is %s; rebuilding it", path, problem)
    with _exclusive(os.path.join(store_dir, f".{name}.lock"), path):
        if os.path.exists(path):  # built by another process while this one waited, or bad
            try:
                return _open_unless_condemned(path, digest, access)
            except ValueError as e:
                logger.warning("table store: removing %s (%s)", path, e)
                os.unlink(path)
        for stale in glob.glob(os.path.join(store_dir, f".{glob.escape(name)}.tmp.*")):
            logger.warning("table store: removing %s, left by a build that did not finish", stale)
            os.unlink(stale)
        temp = os.path.join(store_dir, f".{name}.tmp.{os.getpid()}")
        started = time.perf_counter()
        try:
            write_entry(temp, digest, key, layouts(), fill)
            os.rename(temp, path)  # atomic: the entry appears complete or not at all
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_dir(store_dir)
        entry = open_entry(path, digest, access=access)  # the checks every later open makes (its CRCs were just computed)
        logger.info("table store: built %s (%.2f GB) in %.1f s", path, os.path.getsize(path) / 1e9, time.perf_counter() - started)
        return entry._replace(built=True)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STORE_ENV = "DLRM_TABLE_STORE"


def default_store_dir() -> Optional[str]:
    """Where serving keeps its entries when the config names no ``table_store``:
    ``$DLRM_TABLE_STORE`` ("off": no store), else ``$XDG_CACHE_HOME/dlrm/table_store``
    (``~/.cache/dlrm/table_store``)."""
    chosen = os.environ.get(STORE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "none") else os.path.abspath(os.path.expanduser(chosen))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "dlrm", "table_store")


def check_served_path(configured: Any) -> None:
    """A served config's ``table_store`` must be absolute: a worker runs in the unpacked .mar's
    temporary folder, which is gone at its next start. Raises ValueError naming the key."""
    if isinstance(configured, str) and not os.path.isabs(os.path.expanduser(configured)):
        raise ValueError(
            f"model config: 'table_store' is {configured!r}; expected an absolute path when served "
            "(a worker runs in the unpacked .mar's temporary folder), or null and DLRM_TABLE_STORE"
        )


def served_store_dir(configured: Any) -> Optional[str]:
    """The table store a serving worker uses: ``$DLRM_TABLE_STORE`` if set (the deployment's
    say: a KServe volume; ``off``: none), else the config's ``table_store`` (absolute:
    ``check_served_path``), else ``default_store_dir()``."""
    if STORE_ENV in os.environ or configured is None:
        return default_store_dir()
    check_served_path(configured)
    return os.path.expanduser(configured)


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, e.g. a checkpoint's identity in a key. A ``<path>.sha256``
    next to it (``sha256sum``'s format: create_dlrm_mar.sh writes one into the .mar) is
    trusted instead of reading a 45 GB checkpoint at every start."""
    return _recorded_sha256(path) or _bytes_sha256(path)


def directory_sha256(path: str) -> str:
    """sha256 identifying a directory's files, e.g. a DCP checkpoint's in a key: of one line
    per file, in sorted order, ``<path relative to the directory> <size> <sha256 of its
    bytes>``, so that a changed, added, removed or renamed file changes it. A ``<path>.sha256``
    next to the directory (create_dlrm_mar.sh writes one into the .mar) is trusted instead of
    reading every rank's file at every start."""
    path = path.rstrip(os.sep)
    recorded = _recorded_sha256(path)
    if recorded:
        return recorded
    files = sorted(
        os.path.relpath(os.path.join(root, name), path)
        for root, _, names in os.walk(path)
        for name in names
    )
    listing = "".join(f"{name} {os.path.getsize(os.path.join(path, name))} {_bytes_sha256(os.path.join(path, name))}\n" for name in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _recorded_sha256(path: str) -> Optional[str]:
    """The digest of ``<path>.sha256`` (``sha256sum``'s format), if there is one."""
    sidecar = f"{path}.sha256"
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            recorded = f.read().split()
        if recorded and len(recorded[0]) == 64:
            return recorded[0].lower()
    return None


def _bytes_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_store(store_dir: str) -> int:
    """Check every block of every entry in ``store_dir``; print one line each; the number of
    bad entries."""
    bad = 0
    for path in sorted(glob.glob(os.path.join(store_dir, "*.safetensors"))):
        try:
            with safe_open(path, framework="pt") as f:
                digest = (f.metadata() or {}).get("key", "")
            open_entry(path, digest, full=True)
            print(f"ok       {path}")
        except ValueError as e:
            bad += 1
            print(f"BAD      {path}: {e}")
    return bad


# ---------------------------------------------------------------------------------------
# Ordered entries: the id -> row maps, applied by fbgemm's TBEs themselves.
# ---------------------------------------------------------------------------------------


def apply_row_order(entry: Entry, tbes: List[IntNBitTableBatchedEmbeddingBagsCodegen]) -> None:
    """Give each TBE of an ordered entry its id -> row map: fbgemm's own index remapping
    (``index_remappings_array``: ``pruned_array_lookup`` turns ids into rows before the
    lookup, after checking them against the tables' id ranges). On the CPU the map is the
    entry's mapped pages (no copy); on CUDA it is copied to the TBE's device. Maps of a CPU
    entry are read ahead in the background (``MADV_WILLNEED``: one sequential read instead
    of a fault per 4 KiB of map at first use)."""
    for tbe, layout, mapping in zip(tbes, entry.layouts, entry.maps or [None] * len(tbes)):
        if mapping is None:
            continue
        tables = layout["tables"]
        if tbe.indices_dtype != torch.int32 or [t["name"] for t in tables] != [spec[0] for spec in tbe.embedding_specs]:
            raise StoreError(f"table store: {entry.path}: its maps do not fit this TBE (tables {[spec[0] for spec in tbe.embedding_specs]}, "
                             f"indices {tbe.indices_dtype})")  # fmt: skip
        device = tbe.current_device
        offsets = [t["map_offset"] for t in tables] + [layout["map_rows"]]
        tbe.index_remappings_array = mapping.to(device)
        tbe.index_remappings_array_offsets = torch.tensor(offsets, dtype=torch.int64, device=device)
        tbe.original_rows_per_table = torch.tensor([tables[t]["rows"] for t in tbe.feature_table_map], dtype=torch.int64, device=device)
        if mapping.device.type == "cpu" and device.type == "cpu":
            threading.Thread(target=advise, args=(mapping, MADV_WILLNEED), name="dlrm-map-readahead", daemon=True).start()


# ---------------------------------------------------------------------------------------
# A pinned hot tier: the hottest rows of an ordered entry locked in memory.
# ---------------------------------------------------------------------------------------

# Bytes of an ordered entry each serving process keeps locked in memory (``mlock``: the page
# cache cannot evict them): its maps, then its hottest rows; "0": none. A host's setting, not a model's:
# leave the rest of RAM to the kernel's page cache (and the workers' own memory).
PIN_BYTES = int(float(os.environ.get("DLRM_STORE_PIN_MB", 0)) * 1e6)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def map_bytes(entry: Entry) -> int:
    """Bytes of an ordered entry's id -> row maps (0 for an unordered one)."""
    return sum(4 * layout.get("map_rows", 0) for layout in entry.layouts)


def pin_leading_rows(entry: Entry, rows: Dict[str, int]) -> Optional[mmap.mmap]:
    """Lock an ordered entry's maps and the first ``rows[table]`` rows of each of its tables
    in memory. The maps first: hashed ids look up every page of them, so an LRU keeps them
    anyway; pinned, they cannot be evicted by a burst of cold rows. The file's
    pages, read in large sequential reads (``POSIX_FADV_WILLNEED``: the lookups' mapping reads
    a page at a time) and ``mlock``ed through a read-only shared mapping of the file (the page
    cache's pages themselves: N workers pin one copy). The mapping, kept alive by the caller
    (unmapping unlocks), or None when nothing was asked or the kernel refused (``ulimit -l``,
    a memory limit): then the rows stay in the page cache's LRU, as without pinning."""
    offsets = tensor_file_offsets(entry.path, [name for name, _, _ in entry_tensors(entry.layouts)])
    ranges = [(offsets[f"tbe{k}"][0] + t["offset"], min(rows.get(t["name"], 0), t["rows"]) * t["row_bytes"])
              for k, layout in enumerate(entry.layouts) for t in layout["tables"]]  # fmt: skip
    ranges += [(first, end - first) for name, (first, end) in offsets.items() if name.startswith("map")]
    ranges = [(first, length) for first, length in ranges if length > 0]
    if not ranges:
        return None
    started = time.perf_counter()
    with open(entry.path, "rb") as f:
        for first, length in ranges:
            os.posix_fadvise(f.fileno(), first, length, os.POSIX_FADV_WILLNEED)
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    base = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    page = mmap.PAGESIZE
    for first, length in ranges:
        start = first // page * page
        if _libc.mlock(base + start, first + length - start) != 0:
            error = os.strerror(ctypes.get_errno())
            mapped.close()
            logger.warning("table store: could not pin %.2f GB of %s's hottest rows (mlock: %s; raise `ulimit -l`, "
                           "or lower DLRM_STORE_PIN_MB); they stay in the page cache unpinned",
                           sum(n for _, n in ranges) / 1e9, entry.path, error)  # fmt: skip
            return None
    logger.info("table store: pinned the maps and hottest rows of %s, %.2f GB in %d ranges, in %.1f s", entry.path,
                sum(n for _, n in ranges) / 1e9, len(ranges), time.perf_counter() - started)  # fmt: skip
    return mapped


# ---------------------------------------------------------------------------------------
# Overlapped reads: a batch's missing pages read concurrently, before its lookup.
# ---------------------------------------------------------------------------------------

# Read a batch's missing pages ahead of its lookup ("0": off).
PREFETCH = os.environ.get("DLRM_STORE_PREFETCH", "1") != "0"
PREFETCH_ON, PREFETCH_OFF = 0.5, 0.05  # disk reads a batch (running mean) that turn it on, off
RESIDENCY_REFRESH_SECONDS = 1.0  # how often the page-residency map is read again while on


def _major_faults() -> int:
    """Major page faults (pages read from disk) of the calling thread so far."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_majflt


_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class _Region:
    """A mapped tensor's pages: which are in memory (``resident``, from ``mincore``, kept
    current between refreshes by the pages this process asks for), and ``willneed`` to ask
    the kernel for the missing ones (``MADV_WILLNEED``: the read is queued, the call
    returns; reads asked for one after the other are in flight together).

    ``used`` marks pages as used for the kernel's page reclaim, through ``recency``: the
    same file bytes in a second mapping without ``MADV_RANDOM``. Since Linux 6.3 accesses
    through a ``MADV_RANDOM`` mapping do not count as uses (``vma_has_recency``), so under
    memory pressure the lookups' hottest pages were evicted as readily as the coldest
    (measured: disk reads a sample rose from 0.48 to 0.83 once the page cache was full).
    Pages are touched there only after the lookup read them (in memory: no read-around)."""

    def __init__(self, tensor: torch.Tensor, recency: Optional[torch.Tensor]) -> None:
        self.tensor = tensor
        self.recency = None if recency is None else recency.numpy()
        self.first_page = tensor.data_ptr() // mmap.PAGESIZE
        self.skew = tensor.data_ptr() - self.first_page * mmap.PAGESIZE
        end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
        self.resident = np.zeros(-(-end // mmap.PAGESIZE) - self.first_page, dtype=np.uint8)
        self.refresh()

    def used(self, byte_offsets: np.ndarray) -> None:
        """Touch these bytes through the recency mapping (after the lookup read them)."""
        if self.recency is not None:
            self.recency[byte_offsets]

    def refresh(self) -> None:
        fresh = np.zeros_like(self.resident)
        if _libc.mincore(self.first_page * mmap.PAGESIZE, fresh.size * mmap.PAGESIZE, fresh.ctypes.data) == 0:
            self.resident = fresh & 1

    def willneed(self, byte_offsets: np.ndarray) -> int:
        """Ask for the pages holding these byte offsets of the tensor that are not in memory;
        how many were asked for."""
        pages = (byte_offsets + self.skew) // mmap.PAGESIZE
        missing = pages[self.resident[pages] == 0]
        if not missing.size:
            return 0
        missing = np.unique(missing)
        for page in missing.tolist():
            _libc.madvise((self.first_page + page) * mmap.PAGESIZE, mmap.PAGESIZE, MADV_WILLNEED)
        self.resident[missing] = 1
        return int(missing.size)


class PagePrefetcher:
    """Hooked on a TBE whose weights are an entry's mapped pages: before each lookup, the
    pages of the batch's rows that are not in memory (and of their map entries, in an
    ordered entry) are asked for all at once (``MADV_WILLNEED``), so the disk reads them
    together and the batch waits about one read, not one per miss; then the lookup runs. It
    only reads: scores are untouched.

    Which pages are in memory: a residency map per tensor (``mincore``, read again in a
    background thread while the prefetch is on: ``_refresh_while_on``). No cost when
    the entry is resident: the prefetch runs only while the batches read from disk, a running
    mean over ~64 batches of the pages asked for plus the lookup's own major faults
    (``getrusage``) above PREFETCH_ON; below PREFETCH_OFF it stands down, leaving two
    ``getrusage`` calls a batch. ``stats``: batches, prefetched batches, pages asked for,
    pages the lookups still read themselves."""

    def __init__(self, tbe: IntNBitTableBatchedEmbeddingBagsCodegen, rows_used: Optional[torch.Tensor] = None,
                 map_used: Optional[torch.Tensor] = None) -> None:  # fmt: skip
        # numpy: a batch's arithmetic is a dozen small ops, each ~1 us in numpy, ~4 in torch
        self.table_of_feature = np.asarray(tbe.feature_table_map, dtype=np.int64)
        self.table_start = tbe.weights_offsets.to(torch.int64).cpu().numpy()
        self.row_bytes = np.asarray([rounded_row_size_in_bytes(dim, ty, tbe.row_alignment, tbe.scale_bias_size_in_bytes)
                                     for _, _, dim, ty, _ in tbe.embedding_specs], dtype=np.int64)  # fmt: skip
        mapping = tbe.index_remappings_array if tbe.index_remappings_array.numel() else None
        self.mapping = None if mapping is None else mapping.numpy()  # the map's mapped pages, as numpy
        self.map_start = None if mapping is None else tbe.index_remappings_array_offsets.cpu().numpy()
        self.rows = _Region(tbe.weights_host, rows_used)
        self.map = _Region(mapping, map_used) if mapping is not None else None
        self._used: List[Tuple[_Region, np.ndarray]] = []
        self.active = True  # a fresh mapping is cold until shown otherwise
        self.reads = 1.0  # running mean of disk reads a batch
        self.stats = {"batches": 0, "prefetched": 0, "asked": 0, "lookup_reads": 0}
        self._asked = 0
        self._before = 0
        self._hooks = [tbe.register_forward_pre_hook(self.before_lookup, with_kwargs=True),
                       tbe.register_forward_hook(self.after_lookup, with_kwargs=True)]  # fmt: skip
        threading.Thread(target=_refresh_while_on, args=(weakref.ref(self),), name="dlrm-residency", daemon=True).start()

    def detach(self) -> None:
        """Remove the hooks: the TBE's lookups go without prefetch from now on."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def refresh(self) -> None:
        """Read which pages are in memory again (``mincore``)."""
        for region in (self.rows, self.map):
            if region is not None:
                region.refresh()

    def before_lookup(self, module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """forward pre-hook of the TBE: ask for the missing pages of (indices, offsets)."""
        self._asked = 0
        indices = kwargs.get("indices", args[0] if args else None)
        offsets = kwargs.get("offsets", args[1] if len(args) > 1 else None)
        if self.active and indices is not None and offsets is not None and indices.numel():
            self._asked = self.prefetch(indices, offsets)
        self._before = _major_faults()

    def after_lookup(self, module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        """forward hook of the TBE: on or off for the next batch."""
        lookup_reads = _major_faults() - self._before
        for region, byte_offsets in self._used:
            region.used(byte_offsets)
        self._used = []
        self.stats["batches"] += 1
        self.stats["lookup_reads"] += lookup_reads
        self.stats["asked"] += self._asked
        self.reads += (self._asked + lookup_reads - self.reads) / 64
        if self.active and self.reads < PREFETCH_OFF:
            self.active = False
        elif not self.active and self.reads > PREFETCH_ON:
            self.active = True
            self.refresh()

    def prefetch(self, indices: torch.Tensor, offsets: torch.Tensor) -> int:
        """Ask for the missing pages of the rows of ``indices`` (their map entries first,
        whose values say where the rows are); how many pages were asked for."""
        offsets = offsets.numpy()
        features = self.table_of_feature.size
        bags = (offsets.size - 1) // features
        per_feature = np.diff(offsets[::bags]) if bags else np.zeros(features, dtype=np.int64)
        table = np.repeat(self.table_of_feature, per_feature)
        rows = indices.numpy().astype(np.int64, copy=False)
        asked = 0
        if self.map is not None:
            positions = self.map_start[table] + rows
            asked += self.map.willneed(positions * 4)
            rows = self.mapping[positions].astype(np.int64)  # waits for the map pages asked for
            self._used.append((self.map, positions * 4))
        first = self.table_start[table] + rows * self.row_bytes[table]
        row_bytes = np.concatenate([first, first + self.row_bytes[table] - 1])
        asked += self.rows.willneed(row_bytes)
        self._used.append((self.rows, row_bytes))
        self.stats["prefetched"] += 1
        return asked


def _refresh_while_on(prefetcher_ref: "weakref.ref[PagePrefetcher]") -> None:
    """The residency maps of a prefetcher read again while it is on, every
    RESIDENCY_REFRESH_SECONDS or ten times as long as a refresh takes, whichever is longer
    (``mincore`` of the full default's 3.1M pages: ~0.2 s); ends with the prefetcher (a weak
    reference: the model can go)."""
    pause = RESIDENCY_REFRESH_SECONDS
    while True:
        time.sleep(pause)
        prefetcher = prefetcher_ref()
        if prefetcher is None or not prefetcher._hooks:
            return
        if prefetcher.active:
            started = time.perf_counter()
            prefetcher.refresh()
            pause = max(RESIDENCY_REFRESH_SECONDS, 10 * (time.perf_counter() - started))
        del prefetcher


def prefetch_before_lookups(tbes: List[IntNBitTableBatchedEmbeddingBagsCodegen], entry: Optional[Entry] = None,
                            on: bool = PREFETCH) -> List[PagePrefetcher]:  # fmt: skip
    """A ``PagePrefetcher`` on each TBE whose weights are the pages of ``entry`` (the k-th
    TBE: the entry's tensors ``tbe<k>`` and ``map<k>``), as its forward hooks; none if not
    ``on``. (Hooks run when the TBE is called as a module: the lean CPU forward's call;
    TorchRec's sharded path calls ``forward`` directly and goes without.)"""
    if not on:
        return []
    views: Dict[str, torch.Tensor] = {}
    if entry is not None:  # the recency mapping (_Region.used): one private mapping of the file
        with open(entry.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        names = [name for name, _, _ in entry_tensors(entry.layouts)]
        views = {name: torch.frombuffer(mapped, dtype=torch.uint8, count=end - first, offset=first)
                 for name, (first, end) in tensor_file_offsets(entry.path, names).items()}  # fmt: skip
    return [PagePrefetcher(tbe, views.get(f"tbe{k}"), views.get(f"map{k}")) for k, tbe in enumerate(tbes)]


# ---------------------------------------------------------------------------------------
# Background verification: every block of a sampled-at-open entry, while it serves.
# ---------------------------------------------------------------------------------------

VERIFY_BYTES_PER_S = float(os.environ.get("DLRM_STORE_VERIFY_MB_S", 64)) * 1e6  # the I/O it may take
WATCH_SECONDS = 5.0  # how often a verified entry's file is checked for removal or replacement
IO_ALIGNMENT = 4096  # O_DIRECT offsets, lengths and buffers


def file_identity(path: str) -> Optional[Tuple[int, int, int, int]]:
    """(device, inode, size, mtime) of ``path``, or None if it is gone: a file rewritten or
    replaced has another."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def checked_in_background(path: str) -> bool:
    """Whether an entry is only sampled at open (above FULL_VERIFY_MAX_BYTES), so a serving
    process should ``verify_in_background``."""
    return os.path.getsize(path) > FULL_VERIFY_MAX_BYTES


def verify_in_background(path: str, on_failure: Callable[[str], None], bytes_per_s: float = VERIFY_BYTES_PER_S) -> threading.Thread:
    """Check every block of the entry at ``path`` against its CRC-32 from a daemon thread, at
    most ``bytes_per_s``, without filling the page cache (``O_DIRECT``; where the filesystem
    has none, pages read that were not resident are dropped again): a cold or larger-than-RAM
    entry keeps its hot pages. Then keep watching that the file is still the one mapped.

    A bad block: the entry is condemned (``condemn_entry``: removed from a writable store,
    so the next start rebuilds it; recorded for a read-only one, so starts refuse it) and
    ``on_failure(problem)`` is called with the file and block named; a serving worker exits
    there (TorchServe starts another). So does a worker whose file was removed or replaced
    by another process (one that found it bad)."""
    identity = file_identity(path)
    thread = threading.Thread(target=_verify_then_watch, args=(path, identity, on_failure, bytes_per_s),
                              name="dlrm-store-verify", daemon=True)  # fmt: skip
    thread.start()
    return thread


def _verify_then_watch(path: str, identity: Any, on_failure: Callable[[str], None], bytes_per_s: float) -> None:
    try:
        problem = verify_every_block(path, identity, bytes_per_s)
    except OSError as e:  # the file cannot be read: as bad as a wrong byte
        problem = f"{path}: cannot be read ({e})"
    if problem:
        condemn_entry(path, identity, problem)
        on_failure(problem)
        return
    while file_identity(path) == identity:
        time.sleep(WATCH_SECONDS)
    on_failure(f"{path} was removed or replaced since this process mapped it (found bad by another process?)")


def verify_every_block(path: str, identity: Any, bytes_per_s: float) -> Optional[str]:
    """None if every block of the file matches its CRC-32, else which does not (file, tensor,
    block, bytes). Blocks are read in file order, at most ``bytes_per_s``."""
    crcs = json.loads(read_header(path)[1]["__metadata__"]["crc32"])
    offsets = tensor_file_offsets(path, sorted(crcs))
    blocks = sorted((offsets[name][0] + start, offsets[name][0] + stop, name, i)
                    for name in crcs for i, (start, stop) in enumerate(_blocks(offsets[name][1] - offsets[name][0])))  # fmt: skip
    started, done = time.monotonic(), 0
    fd, direct = _open_uncached(path)
    buffer = mmap.mmap(-1, BLOCK_BYTES + 2 * IO_ALIGNMENT)  # page-aligned, as O_DIRECT needs
    try:
        for first, end, name, i in blocks:
            if file_identity(path) != identity:
                return f"{path} was removed or replaced while it was checked"
            found = _crc(_read_uncached(fd, direct, buffer, first, end - first))
            if found != crcs[name][i]:
                return f"{path}: block {i} of {name} (file bytes [{first}, {end})): CRC-32 {found}, header says {crcs[name][i]}"
            done += end - first
            time.sleep(max(0.0, started + done / bytes_per_s - time.monotonic()))
    finally:
        os.close(fd)
        buffer.close()
    logger.info("table store: verified all %d blocks of %s in the background in %.1f s (%s)", len(blocks), path,
                time.monotonic() - started, "O_DIRECT" if direct else "read and drop")  # fmt: skip
    return None


def _open_uncached(path: str) -> Tuple[int, bool]:
    """A descriptor that reads around the page cache (O_DIRECT), or a plain one: (fd, direct)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:  # tmpfs and some others have no O_DIRECT
        return os.open(path, os.O_RDONLY), False


def _read_uncached(fd: int, direct: bool, buffer: mmap.mmap, first: int, length: int) -> Any:
    """``length`` bytes at ``first``, leaving the page cache as it was: with O_DIRECT, the
    aligned range around them into ``buffer``; else a plain read, then the pages that were
    not resident before dropped again (``POSIX_FADV_DONTNEED``)."""
    if direct:
        start = first // IO_ALIGNMENT * IO_ALIGNMENT
        stop = -(-(first + length) // IO_ALIGNMENT) * IO_ALIGNMENT
        got = os.preadv(fd, [memoryview(buffer)[: stop - start]], start)
        return memoryview(buffer)[first - start : min(got, first - start + length)]
    resident = resident_pages(fd, first, length)
    data = os.pread(fd, length, first)
    page = mmap.PAGESIZE
    base = first // page * page
    for run_start, run_end in _runs(~resident):
        os.posix_fadvise(fd, base + run_start * page, (run_end - run_start) * page, os.POSIX_FADV_DONTNEED)
    return data


def resident_pages(fd: int, first: int, length: int) -> np.ndarray:
    """bool[pages]: which pages of the file's bytes [first, first + length) are in the page
    cache (``mincore`` of a private mapping of them: mapping reads nothing)."""
    page = mmap.PAGESIZE
    start = first // page * page
    size = first + length - start
    vec = np.zeros(-(-size // page), dtype=np.uint8)
    if size:
        with mmap.mmap(fd, size, offset=start, access=mmap.ACCESS_COPY) as mapped:
            anchor = ctypes.c_char.from_buffer(mapped)
            try:
                if _libc.mincore(ctypes.addressof(anchor), size, vec.ctypes.data) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
            finally:
                del anchor
    return (vec & 1).astype(bool)


def _runs(flags: np.ndarray) -> List[Tuple[int, int]]:
    """[start, end) of each run of True in a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _failure_record(path: str) -> str:
    """Where a bad entry of a read-only store is recorded: the system's temp folder (the
    store cannot hold it), one file per entry path."""
    name = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "dlrm-table-store-failures", f"{name}.json")


def recorded_failure(path: str) -> Optional[str]:
    """The problem a background check recorded for this very file (same identity), or None."""
    try:
        with open(_failure_record(path)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record.get("problem") if record.get("identity") == list(file_identity(path) or ()) else None


def condemn_entry(path: str, identity: Any, problem: str) -> None:
    """Make sure no later open serves the file at ``path`` (if it is still the one with
    ``identity``): removed from a writable store (the next start rebuilds it, as at open),
    else recorded (``recorded_failure``: the next start refuses it, naming the problem)."""
    store_dir = os.path.dirname(os.path.abspath(path))
    if _writable(store_dir):
        with _exclusive(os.path.join(store_dir, f".{os.path.basename(path)}.lock"), path):
            if file_identity(path) == identity:
                os.unlink(path)
                logger.error("table store: removed %s (%s); the next start rebuilds it", path, problem)
        return
    record = _failure_record(path)
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as f:
        json.dump({"path": path, "identity": list(identity or ()), "problem": problem}, f)
    logger.error("table store: %s is in a read-only store: recorded %s in %s; starts refuse it until it is rebuilt", path, problem, record)


def _open_unless_condemned(path: str, digest: str, access: str) -> Entry:
    """``open_entry``, unless a background check recorded this file as bad."""
    problem = recorded_failure(path)
    if problem:
        raise ValueError(f"corrupted: {problem} (found by a background check)")
    return open_entry(path, digest, access=access)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "verify":
        sys.exit("usage: python dlrm_table_store.py verify STORE_DIR")
    sys.exit(1 if verify_store(sys.argv[2]) else 0)
