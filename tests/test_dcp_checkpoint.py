"""A ``torch.distributed.checkpoint`` (DCP) directory as ``checkpoint`` (SPEC §8, dlrm_checkpoint.py):
read table by table and chunk by chunk from whatever row-wise or table-wise chunks it holds,
served exactly as the same weights in one file; its ``.metadata`` pickle read through an
allow-list (a pickle that would run code is refused and nothing runs); its items only through
``torch.load(weights_only=True)``; layouts it cannot read refused by name; its identity (all
its files) in the table store key.

The DCP directories here are written in this process by DCP itself (``dcp.save`` in a
one-rank gloo group), the tables as TorchRec's ``ShardedTensor``s cut into uneven row chunks -
the layout ``DistributedModelParallel.state_dict()`` saves from N ranks (2 and 3 here), with
one chunk per table-wise table. ``tests/test_train_torchrun.py`` writes one from a real
2-rank torchrun training.

Symbols: B batch, F = 3 tables, D = 16.
"""

import json
import os
import pickle
import shutil
import subprocess
import zipfile
from typing import Any, Dict, Iterator, List

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards
from torch.distributed.checkpoint import FileSystemReader

import dlrm_checkpoint
import dlrm_factory
import dlrm_table_store
from conftest import REPO, small_model_config
from dlrm_factory import DLRMFactory
from test_checkpoint import IDS, float_dlrm, scores
from test_security import Payload  # unpickling it creates a file

TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{}.weight"
# Row chunks of the row-wise tables, as N ranks would hold them (uneven: the planner's last
# rank may hold fewer rows); t_cat_1 is table-wise (one chunk).
ROW_CHUNKS = {TABLE.format(0): [0, 500, 1000], TABLE.format(2): [0, 1234, 3000, 5000]}


def save_dcp(state: Dict[str, torch.Tensor], directory: str, row_chunks: Dict[str, List[int]], columns: bool = False) -> str:
    """``dcp.save`` of ``state`` with the tensors of ``row_chunks`` as ShardedTensors cut at
    those rows (or, ``columns``, at those columns), in a one-rank gloo group."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        to_save: Dict[str, Any] = dict(state)
        for name, cuts in row_chunks.items():
            tensor = state[name]
            shards = []
            for start, end in zip(cuts, cuts[1:]):
                part = tensor[:, start:end] if columns else tensor[start:end]
                offsets = [0, start] if columns else [start, 0]
                shards.append(Shard(tensor=part.clone(), metadata=ShardMetadata(
                    shard_offsets=offsets, shard_sizes=list(part.shape), placement="rank:0/cpu")))  # fmt: skip
            to_save[name] = init_from_local_shards(shards, list(tensor.shape))
        dcp.save(to_save, checkpoint_id=directory)
    finally:
        dist.destroy_process_group()
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """A float DLRM of the small config (TorchRec's own init), in one file and as DCP."""
    workdir = tmp_path_factory.mktemp("dcp")
    model = float_dlrm(small_model_config())
    state = model.state_dict()
    torch.save(state, workdir / "dlrm.pt")
    return {"model": model, "state": state, "file": str(workdir / "dlrm.pt"),
            "dcp": save_dcp(state, str(workdir / "dlrm.dcp"), ROW_CHUNKS)}  # fmt: skip


def copy_dcp(trained: Dict[str, Any], tmp_path: Any) -> str:
    return shutil.copytree(trained["dcp"], str(tmp_path / "copy.dcp"))


def rewrite_metadata(directory: str, change: Any) -> None:
    """Apply ``change(metadata)`` to a DCP's .metadata (read here as DCP itself reads it)."""
    metadata = FileSystemReader(directory).read_metadata()
    change(metadata)
    with open(os.path.join(directory, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def storage_of(metadata: Any, name: str) -> Any:
    """The (first) stored item of tensor ``name`` in ``metadata``."""
    return next(info for index, info in metadata.storage_data.items() if index.fqn == name)


# --- served as the same weights in one file ----------------------------------------------------

SERVED_AS = [("fp32", 1, "table_wise"), ("int8", 1, "table_wise"), ("int8", 2, "row_wise"), ("int4", 3, "table_wise")]


@pytest.mark.parametrize("quant_dtype, world_size, sharding_type", SERVED_AS)
def test_dcp_directory_serves_bit_identically_to_the_same_weights_in_one_file(
    trained: Dict[str, Any], quant_dtype: str, world_size: int, sharding_type: str, monkeypatch: Any
) -> None:
    """Serving shards (1-3 simulated ranks) cut the checkpoint's chunks anywhere: 300-row
    fill chunks straddle the DCP chunks at rows 500, 1234 and 3000."""
    monkeypatch.setattr(dlrm_factory, "FILL_CHUNK_ROWS", 300)
    overrides = {"quant_dtype": quant_dtype, "world_size": world_size, "sharding_type": sharding_type}
    from_file = scores(DLRMFactory(small_model_config(checkpoint=trained["file"], **overrides)))
    from_dcp = scores(DLRMFactory(small_model_config(checkpoint=trained["dcp"], **overrides)))
    assert from_dcp.shape == (len(IDS), 1)
    assert torch.equal(from_dcp, from_file)


def test_fp32_from_dcp_scores_as_the_float_model(trained: Dict[str, Any]) -> None:
    got = scores(DLRMFactory(small_model_config(checkpoint=trained["dcp"], quant_dtype="fp32")))
    torch.testing.assert_close(got, scores(trained["model"]), rtol=0, atol=1e-6)


ROW_RANGES = [(0, 1), (1233, 1235), (499, 501), (0, 5000), (2999, 3001), (4990, 5000), (700, 700)]


@pytest.mark.parametrize("start, end", ROW_RANGES)
def test_row_range_across_chunks_reads_exactly_those_rows(trained: Dict[str, Any], start: int, end: int) -> None:
    table = dlrm_checkpoint.read_dcp(trained["dcp"])[TABLE.format(2)]
    assert len(table.chunks) == 3 and table.shape == (5000, 16)
    assert torch.equal(table[start:end], trained["state"][TABLE.format(2)][start:end])


def test_tables_are_read_a_fill_chunk_of_rows_at_a_time_never_a_whole_shard(
    trained: Dict[str, Any], monkeypatch: Any
) -> None:
    """The largest read is one fill chunk (300 rows) of one DCP chunk; the largest chunk
    holds 2000 rows."""
    monkeypatch.setattr(dlrm_factory, "FILL_CHUNK_ROWS", 300)
    reads: List[int] = []
    pread_into = dlrm_checkpoint._pread_into
    monkeypatch.setattr(dlrm_checkpoint, "_pread_into", lambda path, offset, target: (reads.append(len(target)), pread_into(path, offset, target)))
    DLRMFactory(small_model_config(checkpoint=trained["dcp"]))
    row_bytes = 16 * 4
    assert sum(reads) >= (1000 + 2000 + 5000) * row_bytes  # every row was read
    assert max(reads) == 300 * row_bytes


# --- the table store key: the directory's files -------------------------------------------------


def test_store_entry_of_a_dcp_checkpoint_is_found_again_and_changes_with_any_of_its_files(
    trained: Dict[str, Any], tmp_path: Any
) -> None:
    directory = copy_dcp(trained, tmp_path)
    config = small_model_config(checkpoint=directory, table_store=str(tmp_path / "store"))
    first = DLRMFactory(config).table_store_entry
    again = DLRMFactory(config).table_store_entry
    assert first["built"] and not again["built"] and again["path"] == first["path"]

    digest = dlrm_table_store.directory_sha256(directory)
    with open(os.path.join(directory, "__0_0.distcp"), "r+b") as f:  # one byte of the dense layers' items
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert dlrm_table_store.directory_sha256(directory) != digest
    with open(os.path.join(directory, "notes.txt"), "w") as f:
        f.write("a file more")
    assert len({digest, dlrm_table_store.directory_sha256(directory)}) == 2


def test_a_sha256_file_next_to_the_directory_is_trusted_instead_of_reading_it(trained: Dict[str, Any], tmp_path: Any) -> None:
    """What create_dlrm_mar.sh packages next to checkpoint.dcp, so that a worker reads no rank's file to key its entry."""
    directory = copy_dcp(trained, tmp_path)
    (tmp_path / "copy.dcp.sha256").write_text("ab" * 32 + "  copy.dcp\n")
    assert dlrm_table_store.directory_sha256(directory) == "ab" * 32
    assert dlrm_table_store.directory_sha256(directory + "/") == "ab" * 32


# --- safety: the .metadata pickle, the items ---------------------------------------------------


@pytest.fixture
def poisoned_dcp(trained: Dict[str, Any], tmp_path: Any) -> Iterator[Any]:
    """A real DCP checkpoint whose .metadata carries a Payload in its storage_meta; (dir, marker)."""
    directory = copy_dcp(trained, tmp_path)
    marker = tmp_path / "payload-ran"
    rewrite_metadata(directory, lambda metadata: setattr(metadata.storage_meta, "save_id", Payload(str(marker))))
    yield directory, marker


def test_the_metadata_payload_runs_under_dcps_own_reader(poisoned_dcp: Any) -> None:
    """The control: ``FileSystemReader.read_metadata`` is ``pickle.load``: the payload runs."""
    directory, marker = poisoned_dcp
    FileSystemReader(directory).read_metadata()
    assert marker.exists()


def test_malicious_metadata_is_refused_naming_the_class_and_file_and_nothing_runs(poisoned_dcp: Any) -> None:
    directory, marker = poisoned_dcp
    metadata_file = os.path.join(directory, ".metadata")
    with pytest.raises(ValueError, match=rf"{metadata_file} names (builtins|io)\.open, which is not one of the classes a DCP \.metadata holds"):
        DLRMFactory(small_model_config(checkpoint=directory))
    assert not marker.exists()


def test_create_dlrm_mar_refuses_a_malicious_metadata_before_packaging(poisoned_dcp: Any, tmp_path: Any) -> None:
    directory, marker = poisoned_dcp
    config = tmp_path / "small.json"
    config.write_text(json.dumps(small_model_config()))
    result = subprocess.run([os.path.join(REPO, "create_dlrm_mar.sh"), "--config", str(config), "--checkpoint", directory,
                             "--export-path", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1
    assert "open, which is not one of the classes a DCP .metadata holds" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_item_holding_a_pickled_object_is_refused_and_nothing_runs(trained: Dict[str, Any], tmp_path: Any) -> None:
    """An item is loaded only with ``torch.load(weights_only=True)``."""
    directory = copy_dcp(trained, tmp_path)
    marker = tmp_path / "payload-ran"
    with open(os.path.join(directory, "__evil.distcp"), "wb") as f:
        torch.save(Payload(str(marker)), f)
        length = f.tell()
    name = "over_arch.model.1.bias"

    def point_at_the_payload(metadata: Any) -> None:
        info = storage_of(metadata, name)
        info.relative_path, info.offset, info.length = "__evil.distcp", 0, length

    rewrite_metadata(directory, point_at_the_payload)
    with pytest.raises(ValueError, match=rf"checkpoint item {name} rows 0\+ in .*__evil.distcp could not be loaded as one tensor \(torch.load weights_only=True\)"):
        DLRMFactory(small_model_config(checkpoint=directory))
    assert not marker.exists()


def test_an_item_path_outside_the_directory_is_refused(trained: Dict[str, Any], tmp_path: Any) -> None:
    directory = copy_dcp(trained, tmp_path)
    rewrite_metadata(directory, lambda metadata: setattr(storage_of(metadata, TABLE.format(1)), "relative_path", "../dlrm.pt"))
    with pytest.raises(ValueError, match=r"file '../dlrm.pt' is not a file name inside the checkpoint directory"):
        dlrm_checkpoint.read_dcp(directory)


# --- layouts it cannot read: refused by name ---------------------------------------------------


def test_items_under_a_stream_transform_are_refused(trained: Dict[str, Any], tmp_path: Any) -> None:
    """DCP's experimental ``_extensions`` (e.g. zstd compression) rewrite the item's bytes."""
    directory = copy_dcp(trained, tmp_path)
    rewrite_metadata(directory, lambda metadata: setattr(storage_of(metadata, TABLE.format(1)), "transform_descriptors", ["stream.zstd"]))
    with pytest.raises(ValueError, match=rf"{TABLE.format(1)} rows 0\+: written through the stream transforms \['stream.zstd'\]"):
        DLRMFactory(small_model_config(checkpoint=directory))


def test_column_wise_chunks_are_refused(trained: Dict[str, Any], tmp_path: Any) -> None:
    directory = save_dcp(trained["state"], str(tmp_path / "cw.dcp"), {TABLE.format(1): [0, 8, 16]}, columns=True)
    with pytest.raises(ValueError, match=rf"{TABLE.format(1)} \(2000, 16\): a chunk at \(0, 0\) of \(2000, 8\) splits its columns"):
        DLRMFactory(small_model_config(checkpoint=directory))


def test_an_item_that_is_not_a_torch_save_archive_is_refused(trained: Dict[str, Any], tmp_path: Any) -> None:
    directory = copy_dcp(trained, tmp_path)
    with open(os.path.join(directory, "__0_0.distcp"), "r+b") as f:
        f.write(b"not a zip at all")  # over the first item's header
    with pytest.raises(ValueError, match=r"could not be loaded as one tensor"):
        dlrm_checkpoint.read_dcp(directory)


def test_dcp_not_matching_the_config_names_the_tensor(trained: Dict[str, Any], tmp_path: Any) -> None:
    state = {k: v for k, v in trained["state"].items() if k != "over_arch.model.1.weight"}
    directory = save_dcp(state, str(tmp_path / "missing.dcp"), ROW_CHUNKS)
    with pytest.raises(ValueError, match=r"missing \['over_arch.model.1.weight'\]"):
        DLRMFactory(small_model_config(checkpoint=directory))


def test_a_directory_without_dcp_metadata_is_a_config_error(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"'checkpoint' is .*; expected null, the path of an existing state_dict file, or a torch.distributed.checkpoint directory"):
        dlrm_factory.resolve_model_config(small_model_config(checkpoint=str(tmp_path)))


def test_dcp_directory_is_packaged_into_the_mar_with_its_digest(trained: Dict[str, Any], tmp_path: Any) -> None:
    """torch-model-archiver copies the directory; the .mar's config names it, its sha256 beside it."""
    config = tmp_path / "small.json"
    config.write_text(json.dumps(small_model_config()))
    result = subprocess.run([os.path.join(REPO, "create_dlrm_mar.sh"), "--config", str(config), "--checkpoint", trained["dcp"],
                             "--export-path", str(tmp_path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "dlrm.mar") as mar:
        names = set(mar.namelist())
        packaged = json.loads(mar.read("model_config.json"))
        sidecar = mar.read("checkpoint.dcp.sha256").decode()
    assert {"checkpoint.dcp/.metadata", "checkpoint.dcp/__0_0.distcp", "dlrm_checkpoint.py"} <= names
    assert packaged["checkpoint"] == "checkpoint.dcp"
    assert sidecar == f"{dlrm_table_store.directory_sha256(trained['dcp'])}  checkpoint.dcp\n"
