"""Read a ``torch.distributed.checkpoint`` (DCP) directory as the factory reads a checkpoint
file: tensor by tensor, row range by row range, never a whole table (or a whole rank's shard
of one) in memory, and without running anything the files hold.

What TorchRec training writes (``dcp.save(dmp.state_dict(), checkpoint_id=DIR)`` with torch
2.13's ``FileSystemWriter``, its default ``torch_save`` format)::

    DIR/.metadata        a pickle of ``Metadata``:
                           state_dict_metadata  {name: TensorStorageMetadata(properties.dtype,
                                                 size, chunks=[ChunkStorageMetadata(offsets, sizes)])}
                           storage_data         {MetadataIndex(name, chunk offsets):
                                                 _StorageInfo(relative_path, offset, length,
                                                              transform_descriptors)}
    DIR/__<rank>_0.distcp  each rank's chunks, one after another: at ``offset``, ``length``
                           bytes holding one chunk as a complete ``torch.save`` zip (stored,
                           not compressed): ``archive/data.pkl`` (how to rebuild the tensor)
                           and ``archive/data/0`` (its raw bytes, little-endian)

A TorchRec ``ShardingPlan`` decides the chunks: a table-wise table is one chunk (on its
rank), a row-wise one a chunk of rows per rank (offsets [r0, 0]), the dense layers one chunk
each (DCP saves replicated tensors once). Symbols: R rows of a tensor (its first dimension),
C its other dimensions' product; a chunk holds rows [r0, r0 + n).

How it is read:
  - ``.metadata`` through ``MetadataUnpickler``, an allow-list: DCP's metadata classes,
    ``torch.Size``, dtypes, layouts, paths; any other class is refused with an error naming
    it and the file, before anything is called. (DCP's own ``FileSystemReader.read_metadata``
    unpickles it unrestricted; DCP has no pickle-free metadata format for this layout.)
  - each chunk's item through ``torch.load(item, map_location="meta", weights_only=True)``:
    its dtype, shape and strides with no data read and no code run; then the item's zip
    directory (``zipfile``) gives where the raw bytes of ``data/0`` start in the file.
  - rows [a, b) of a tensor: ``pread`` of those rows' bytes from the chunks that hold them,
    into one new tensor of (b - a) x C values (the factory asks for ``FILL_CHUNK_ROWS`` rows
    at a time). No mapping: read pages are the kernel's page cache, not this process's
    memory, and are dropped after use (``POSIX_FADV_DONTNEED``) so that a 45 GB checkpoint
    does not push the served tables out of the cache.
Refused with a ``ValueError`` naming the tensor: items under a stream transform (DCP's
``_extensions``, e.g. compression), items that are not a stored ``torch.save`` zip (the
``safetensors`` serialization format), chunks split along another dimension than the first
(TorchRec's column-wise and table-column-wise sharding), non-contiguous or big-endian items,
and chunks that do not tile the rows exactly.

The reader is DCP-version-specific by nature (it reads the files DCP writes, not an API):
``SUPPORTED_DCP_VERSIONS`` lists what was checked.
"""

import io
import logging
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, List, NamedTuple, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

logger = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
SUPPORTED_DCP_VERSIONS = ("1.0.0",)
LOCAL_HEADER_NAME_EXTRA = "<2H"  # a zip local header's name and extra-field lengths, at bytes 26-29

# The classes a DCP .metadata may name (torch 2.13's FileSystemWriter): module -> names.
# Calling any of them builds plain data; nothing here opens, imports or runs anything else.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_METADATA_GLOBALS: Dict[str, Tuple[str, ...]] = {
    _DCP_METADATA: (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    ),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch": ("Size",),  # and every dtype: see MetadataUnpickler.find_class
    "torch.serialization": ("_get_layout",),  # a layout looked up by its name
    "pathlib": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),  # storage_meta.checkpoint_id
    "pathlib._local": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),  # Python 3.13+
    "collections": ("OrderedDict",),
}  # fmt: skip


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` naming only ``ALLOWED_METADATA_GLOBALS`` (and torch
    dtypes). Every class or function a pickle uses reaches ``find_class`` first, so a pickle
    that names anything else (``os.system``, ``builtins.eval``, ...) stops there, before it is
    called; persistent ids are refused (the base class's default)."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{self.path} names {module}.{name}, which is not one of the classes a DCP .metadata "
            "holds (DCP's metadata classes, torch.Size, dtypes, layouts, paths): refused, nothing was run"
        )


def is_dcp_directory(path: Any) -> bool:
    """Whether ``path`` is a directory holding a DCP ``.metadata``."""
    return isinstance(path, str) and os.path.isfile(os.path.join(path, METADATA_FILE))


def read_metadata(directory: str) -> Metadata:
    """The checkpoint's ``Metadata``, through ``MetadataUnpickler``; ValueError naming the file
    if it is not one."""
    path = os.path.join(directory, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
    except pickle.UnpicklingError as e:  # a refused class (its message names the file), or a broken pickle
        raise ValueError(f"checkpoint: {e}" if str(e).startswith(path) else f"checkpoint: {path} is not a DCP .metadata: {e}") from e
    except Exception as e:  # truncated, not a pickle, a class's own check failing ...
        raise ValueError(f"checkpoint: {path} is not a DCP .metadata: {type(e).__name__}: {e}") from e
    if not isinstance(metadata, Metadata):
        raise ValueError(f"checkpoint: {path} holds a {type(metadata).__name__}, not DCP Metadata")
    if metadata.version not in SUPPORTED_DCP_VERSIONS:
        logger.warning("checkpoint: %s is DCP version %s; this reader was checked with %s",
                       path, metadata.version, ", ".join(SUPPORTED_DCP_VERSIONS))  # fmt: skip
    return metadata


class AllowListFileSystemReader(FileSystemReader):
    """DCP's own ``FileSystemReader`` (for ``dcp.load`` into a sharded model: each rank reads
    its shards, DCP reshards) with the ``.metadata`` read through ``MetadataUnpickler``
    instead of an unrestricted unpickling. Its items DCP loads with ``weights_only=True``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise ValueError("checkpoint: per-rank .metadata files (DCP without collectives) are not read")
        metadata = read_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------------------------
# Items: where a chunk's raw bytes are.
# ---------------------------------------------------------------------------------------


class _FileRange(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable file of their own (one
    DCP item), for ``zipfile`` and ``torch.load``."""

    def __init__(self, file: Any, offset: int, length: int) -> None:
        super().__init__()
        self.file, self.offset, self.length, self.position = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + position)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self.length - self.position))
        data = os.pread(self.file.fileno(), count, self.offset + self.position)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


class Chunk(NamedTuple):
    """Rows [first_row, first_row + rows) of a tensor, stored in ``path`` from byte ``offset``
    on: ``rows`` x ``row_bytes``, row-major."""

    path: str
    offset: int
    first_row: int
    rows: int
    row_bytes: int


def _stored_data_offset(view: _FileRange, item: str) -> Tuple[int, int]:
    """(offset of the tensor's raw bytes in the item, their length): the one ``data/<key>``
    record of a ``torch.save`` zip, which must be stored uncompressed, as torch writes it."""
    try:
        archive = zipfile.ZipFile(view)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{item} is not a torch.save archive (DCP's torch_save serialization format): {e}") from e
    records = archive.infolist()
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    data = [r for r in records if r.filename.split("/")[-2:-1] == ["data"]]
    if compressed or len(data) != 1:
        raise ValueError(f"{item}: expected one stored data record, found {[r.filename for r in data]} "
                         f"(compressed: {compressed})")  # fmt: skip
    byteorder = [r for r in records if r.filename.endswith("/byteorder")]
    if byteorder and archive.read(byteorder[0]).decode(errors="replace") != "little":
        raise ValueError(f"{item}: a big-endian tensor; only little-endian checkpoints are read")
    record = data[0]
    view.seek(record.header_offset)
    header = view.read(zipfile.sizeFileHeader)
    if len(header) != zipfile.sizeFileHeader or header[:4] != zipfile.stringFileHeader:
        raise ValueError(f"{item}: bad zip local header for {record.filename}")
    name_length, extra_length = struct.unpack(LOCAL_HEADER_NAME_EXTRA, header[26:30])
    return record.header_offset + zipfile.sizeFileHeader + name_length + extra_length, record.file_size


def locate_chunk(directory: str, name: str, meta: TensorStorageMetadata, chunk: Any, storage: Any) -> Chunk:
    """Where the rows of one chunk of tensor ``name`` are, checked against the metadata: its
    item is read as a meta tensor (``torch.load(weights_only=True)``: no data, no code)."""
    item = f"checkpoint item {name} rows {chunk.offsets[0] if chunk.offsets else 0}+"
    if getattr(storage, "transform_descriptors", None):
        raise ValueError(f"{item}: written through the stream transforms {list(storage.transform_descriptors)} "
                         "(DCP _extensions, e.g. compression); only untransformed items are read")  # fmt: skip
    relative = storage.relative_path
    if not isinstance(relative, str) or os.path.basename(relative) != relative or relative in ("", ".", ".."):
        raise ValueError(f"{item}: file {relative!r} is not a file name inside the checkpoint directory")
    path = os.path.join(directory, relative)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not (0 <= storage.offset and 0 < storage.length and storage.offset + storage.length <= size):
            raise ValueError(f"{item}: bytes [{storage.offset}, {storage.offset + storage.length}) "
                             f"lie outside {path} ({size} bytes)")  # fmt: skip
        view = _FileRange(f, storage.offset, storage.length)
        try:
            tensor = torch.load(view, map_location="meta", weights_only=True)
        except Exception as e:  # UnpicklingError for any object that is not plain tensor data
            raise ValueError(f"{item} in {path} could not be loaded as one tensor (torch.load weights_only=True): {e}") from e
        data_offset, data_bytes = _stored_data_offset(_FileRange(f, storage.offset, storage.length), item)
    sizes = tuple(chunk.sizes)
    if (
        not isinstance(tensor, torch.Tensor)
        or tensor.dtype != meta.properties.dtype
        or tuple(tensor.shape) != sizes
        or not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or data_bytes < tensor.numel() * tensor.element_size()
    ):
        found = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{item} in {path}: holds {found}; expected a contiguous {meta.properties.dtype} {sizes}")
    rows = sizes[0] if sizes else 1
    return Chunk(path=path, offset=storage.offset + data_offset, first_row=chunk.offsets[0] if sizes else 0,
                 rows=rows, row_bytes=tensor.numel() * tensor.element_size() // max(rows, 1))  # fmt: skip


# ---------------------------------------------------------------------------------------
# Tensors: row ranges read from their chunks.
# ---------------------------------------------------------------------------------------


class DCPTensor:
    """One tensor of a DCP checkpoint, read by rows: ``t[a:b]`` is a new tensor of rows
    [a, b), read from the chunks that hold them; ``t[:]`` the whole tensor (for the small
    dense layers). ``shape`` and ``dtype`` as a tensor's."""

    def __init__(self, name: str, shape: torch.Size, dtype: torch.dtype, chunks: List[Chunk]) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype
        self.chunks = sorted(chunks, key=lambda c: c.first_row)

    def __repr__(self) -> str:
        return f"DCPTensor({self.name!r}, {tuple(self.shape)}, {self.dtype}, {len(self.chunks)} chunks)"

    def __getitem__(self, rows: slice) -> torch.Tensor:
        total = self.shape[0] if self.shape else 1
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"{self.name}: only row ranges t[a:b] are read, not {rows!r}")
        start, end, _ = rows.indices(total)
        end = max(start, end)
        out = torch.empty((end - start, *self.shape[1:]), dtype=self.dtype)
        buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        for chunk in self.chunks:
            first, last = max(start, chunk.first_row), min(end, chunk.first_row + chunk.rows)
            if first < last:
                target = buffer[(first - start) * chunk.row_bytes : (last - start) * chunk.row_bytes]
                _pread_into(chunk.path, chunk.offset + (first - chunk.first_row) * chunk.row_bytes, target)
        return out if self.shape else out.reshape(())


def _pread_into(path: str, offset: int, target: Any) -> None:
    """Fill the bytes ``target`` from ``path`` at ``offset`` (a kernel read caps at ~2 GiB),
    then drop those pages from the page cache."""
    view = memoryview(target).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count <= 0:
                raise ValueError(f"checkpoint file {path} ended at byte {offset + done}; expected {len(view) - done} more")
            done += count
        os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _tensor_chunks(directory: str, name: str, meta: TensorStorageMetadata, by_offset: Dict[Tuple[str, Tuple[int, ...]], Any]) -> List[Chunk]:
    """Every chunk of ``name``, checked to split only its rows and to tile them exactly.
    ``by_offset``: the metadata's storage data keyed by (name, chunk offsets)."""
    size = tuple(meta.size)
    chunks = []
    for chunk in meta.chunks:
        if tuple(chunk.offsets[1:]) != (0,) * (len(size) - 1) or tuple(chunk.sizes[1:]) != size[1:]:
            raise ValueError(
                f"checkpoint tensor {name} {size}: a chunk at {tuple(chunk.offsets)} of {tuple(chunk.sizes)} splits "
                "its columns (TorchRec's column-wise or table-column-wise sharding); only row-wise and table-wise "
                "checkpoints are read"
            )
        storage = by_offset.get((name, tuple(chunk.offsets)))
        if storage is None:
            raise ValueError(f"checkpoint tensor {name}: no stored item for its chunk at {tuple(chunk.offsets)}")
        chunks.append(locate_chunk(directory, name, meta, chunk, storage))
    covered = 0
    for chunk in sorted(chunks, key=lambda c: c.first_row):
        if chunk.first_row != covered:
            raise ValueError(f"checkpoint tensor {name} {size}: its chunks leave or overlap rows at {covered}")
        covered += chunk.rows
    if covered != (size[0] if size else 1):
        raise ValueError(f"checkpoint tensor {name} {size}: its chunks hold {covered} rows")
    return chunks


def read_dcp(directory: str) -> Dict[str, Any]:
    """{name: ``DCPTensor``} of a DCP checkpoint directory (a non-tensor entry, e.g. an int in
    the saved state dict, as its ``BytesStorageMetadata``: the caller refuses it by name).
    Reads the metadata and each item's zip directory; no tensor data yet."""
    metadata = read_metadata(directory)
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise ValueError(f"checkpoint: {os.path.join(directory, METADATA_FILE)} has no DCP storage data")
    try:
        by_offset = {(index.fqn, tuple(index.offset or ())): info for index, info in metadata.storage_data.items()}
    except (TypeError, AttributeError) as e:
        raise ValueError(f"checkpoint: malformed DCP storage data in {directory}: {type(e).__name__}: {e}") from e
    state: Dict[str, Any] = {}
    for name, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            state[name] = meta
            continue
        try:
            chunks = _tensor_chunks(directory, name, meta, by_offset)
            state[name] = DCPTensor(name=name, shape=torch.Size(meta.size), dtype=meta.properties.dtype, chunks=chunks)
        except (TypeError, AttributeError, IndexError, KeyError) as e:  # fields of the wrong kind
            raise ValueError(f"checkpoint tensor {name}: malformed DCP metadata in {directory}: {type(e).__name__}: {e}") from e
    return state
