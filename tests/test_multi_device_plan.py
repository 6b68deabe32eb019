"""The plan GPUs get (SPEC §3 step 5), checked on CPU where ranks are simulated: the 26
default tables spread over 4 devices without building them."""

from typing import Any

import dlrm_factory
from dlrm_factory import DLRMFactory, plan_only, table_bytes_per_device
from conftest import small_model_config


def test_world_size_4_spreads_the_default_tables_within_an_even_share_plus_the_largest(capsys: Any) -> None:
    plan, cfg, device = plan_only({"device": "cpu", "world_size": 4})
    per_device = table_bytes_per_device(plan, cfg, device)
    with capsys.disabled():
        print("\nint8 table bytes per device, default config, world_size 4:")
        for name, size in per_device.items():
            print(f"  {name}: {size / 1e9:.2f} GB")

    total = sum(cfg["num_embeddings_per_feature"]) * 68
    largest = max(cfg["num_embeddings_per_feature"]) * 68
    assert len(per_device) == 4
    assert sum(per_device.values()) == total == 12_100_210_700
    assert max(per_device.values()) <= total / 4 + largest


def test_every_default_table_is_placed_whole_on_exactly_one_device() -> None:
    plan, cfg, _ = plan_only({"device": "cpu", "world_size": 4})
    tables = plan.plan["sparse_arch.embedding_bag_collection"]
    assert sorted(tables) == sorted(f"t_cat_{i}" for i in range(26))
    assert all(len(p.ranks) == 1 and p.sharding_type == "table_wise" for p in tables.values())


def test_plan_only_matches_the_plan_of_the_built_model() -> None:
    config = small_model_config(world_size=2)
    plan, cfg, device = plan_only(config)
    model = DLRMFactory(config)
    assert str(plan) == str(model.plan)
    assert table_bytes_per_device(plan, cfg, device) == table_bytes_per_device(model.plan, cfg, device)


def test_row_bytes_are_68_for_int8_d64_on_cpu_and_80_on_cuda() -> None:
    cfg = dlrm_factory.resolve_model_config({"device": "cpu"})
    assert dlrm_factory.row_bytes(cfg, "cpu") == 68
    assert dlrm_factory.row_bytes(cfg, "cuda") == 80
