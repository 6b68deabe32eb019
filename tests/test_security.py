"""Nothing untrusted is unpickled; servers listen on loopback only (SPEC §3, §5).

- A checkpoint is read with ``torch.load(weights_only=True)``: an object pickled into it is
  refused before it can run. The proof is a payload with a visible side effect (it creates
  a file): plain unpickling creates it, serving the checkpoint does not.
- No code path of the served files calls another unpickler.
- The shipped config.properties binds every TorchServe listener (REST inference,
  management, metrics; gRPC inference, management) to a loopback address.
"""

import ipaddress
import os
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

from conftest import REPO, small_model_config
from dlrm_factory import DLRMFactory
from serving import read_properties
from test_checkpoint import float_dlrm

SERVED_FILES = ("dlrm_factory.py", "dlrm_handler.py", "dlrm_lean_forward.py", "dlrm_request.py", "dlrm_table_store.py",
                "dlrm_checkpoint.py")
# The one unpickler the served code defines: DCP's .metadata through an allow-list
# (tests/test_dcp_checkpoint.py shows it refusing a pickle that would run code).
ALLOW_LIST_UNPICKLER = "class MetadataUnpickler(pickle.Unpickler):"
# Every listener TorchServe 0.12 opens, and how its address is written.
REST_ADDRESSES = ("inference_address", "management_address", "metrics_address")
GRPC_ADDRESSES = ("grpc_inference_address", "grpc_management_address")


class Payload:
    """Stands for what an attacker pickles into a checkpoint: unpickling it creates ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.fixture
def poisoned_checkpoint(tmp_path: Any) -> Any:
    """A real state_dict of the small config plus one pickled Payload; (path, marker)."""
    marker = tmp_path / "payload-ran"
    state = float_dlrm(small_model_config()).state_dict()
    state["payload"] = Payload(str(marker))
    path = tmp_path / "poisoned.pt"
    torch.save(state, path)
    return path, marker


def test_the_payload_runs_under_plain_unpickling(poisoned_checkpoint: Any) -> None:
    """The control: the payload works, so its absence below means it was refused."""
    path, marker = poisoned_checkpoint
    torch.load(path, weights_only=False)  # what must never happen with a user's file
    assert marker.exists()


def test_serving_a_checkpoint_never_runs_its_payload(poisoned_checkpoint: Any) -> None:
    path, marker = poisoned_checkpoint
    with pytest.raises(ValueError, match=r"weights_only=True"):
        DLRMFactory(small_model_config(checkpoint=str(path)))
    assert not marker.exists()


@pytest.mark.parametrize("name", SERVED_FILES)
def test_served_code_loads_tensors_only_with_weights_only(name: str) -> None:
    with open(os.path.join(REPO, name)) as f:
        source = f.read().replace(ALLOW_LIST_UNPICKLER, "")
    loads = re.findall(r"torch\.load\([^)]*\)", source)
    assert all("weights_only=True" in call for call in loads), loads
    for unsafe in ("pickle.load", "pickle.Unpickler", "torch.jit.load", "allow_pickle=True", "yaml.load(",
                   "weights_only=False", "eval(", "exec("):  # fmt: skip
        assert unsafe not in source.replace(".eval()", ""), f"{name} calls {unsafe}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def test_config_properties_binds_every_listener_to_loopback() -> None:
    properties = read_properties(os.path.join(REPO, "config.properties"))
    for key in REST_ADDRESSES:
        assert key in properties, f"{key} unset: TorchServe's default would decide"
        host = urlsplit(properties[key]).hostname
        assert host is not None and _is_loopback(host), f"{key}={properties[key]}"
    for key in GRPC_ADDRESSES:
        assert key in properties, f"{key} unset: TorchServe always starts its gRPC servers"
        assert _is_loopback(properties[key]), f"{key}={properties[key]}"
    other = [k for k in properties if k.endswith("_address") and k not in REST_ADDRESSES + GRPC_ADDRESSES]
    assert other == [], f"addresses not checked here: {other}"


def test_is_loopback_tells_loopback_from_the_rest() -> None:
    assert [_is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost")] == [True] * 5
    assert [_is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", "")] == [False] * 5
