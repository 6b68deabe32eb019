"""Shared fixtures: small configs that build in well under a second."""

import os
import sys
from typing import Any, Dict, Iterator

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (os.path.join(REPO, "scripts"), REPO):  # scripts/: torchserve_process
    if path not in sys.path:
        sys.path.insert(0, path)

from dlrm_factory import create_default_model_config  # noqa: E402

# Three tables of 1000, 2000 and 5000 rows, D = 16, the default MLP shapes scaled down.
SMALL_TABLE_SIZES = [1000, 2000, 5000]


def small_model_config(**overrides: Any) -> Dict[str, Any]:
    """A new small config: 3 tables, D = 16, int8, on CPU."""
    config = create_default_model_config()
    config.update(
        dense_arch_layer_sizes=[32, 16],
        over_arch_layer_sizes=[32, 16, 1],
        embedding_dim=16,
        num_embeddings_per_feature=list(SMALL_TABLE_SIZES),
        device="cpu",
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="session", autouse=True)
def private_table_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Handlers built by the tests keep their table store in a temp dir, not the user's
    ~/.cache/dlrm/table_store (DLRM_TABLE_STORE; servers get their own, tests/serving.py)."""
    previous = os.environ.get("DLRM_TABLE_STORE")
    os.environ["DLRM_TABLE_STORE"] = store = str(tmp_path_factory.mktemp("table_store"))
    yield store
    if previous is None:
        os.environ.pop("DLRM_TABLE_STORE", None)
    else:
        os.environ["DLRM_TABLE_STORE"] = previous


@pytest.fixture
def small_config() -> Dict[str, Any]:
    return small_model_config()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A failed test that used a TorchServe (tests/test_serving.py) shows the server's logs."""
    report = yield
    server = getattr(item, "funcargs", {}).get("torchserve")
    if report.failed and server is not None:
        report.sections.append(("TorchServe logs (last lines)", server.log_tail()))
    return report
