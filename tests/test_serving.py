"""End to end (SPEC §4, §5): create_dlrm_mar.sh -> a real TorchServe on free loopback ports
-> HTTP requests, each answer compared with the same model called in-process.

The served config is the small one plus a 4th table of 2^24 + 10 rows (int8, D = 16: 20 B a
row, 336 MB), so that ids float32 cannot tell apart (2^24 and 2^24 + 1) reach their rows.
Same config and seed give bit-identical weights, so ``direct_model`` is the served model.

Two registrations of the same .mar: ``dlrm`` with the .mar's own batching
(model-config.yaml: batchSize 32, maxBatchDelay 1 ms) and ``dlrm_batched`` (batch_size 8,
max_batch_delay 2 s), on which concurrent requests really gather into batches of 8.

Symbols: B samples, N = 13 dense features, F = 4 sparse features.
"""

import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

import pytest
import torch

import serving
from conftest import REPO, SMALL_TABLE_SIZES, small_model_config
from dlrm_factory import DLRMFactory
from serving import Sample, TorchServe, make_request, predict, torchserve_fixture

BIG_TABLE_ROWS = 2**24 + 10
TABLE_SIZES = SMALL_TABLE_SIZES + [BIG_TABLE_ROWS]
KEYS = [f"cat_{f}" for f in range(len(TABLE_SIZES))]
E2E_CONFIG = small_model_config(num_embeddings_per_feature=TABLE_SIZES, max_samples_per_request=8)
# Batched and single matmuls differ by a few float32 ulps (1.5e-8 at |score| ~ 0.2);
# rows of the big table move the score by ~1e-6, so this still tells ids apart.
SCORE_TOLERANCE = 1e-7
REFERENCE = os.path.join(REPO, "tests", "data")  # upstream's request files, as they were


# --- requests and the in-process reference (tests/serving.py, for this model's tables) ---


def direct_scores(model: torch.nn.Module, samples: List[Sample]) -> List[float]:
    """The logits of ``model`` called in-process, its KJT built key-major feature by feature."""
    return serving.direct_scores(model, KEYS, samples)


def random_samples(rng: random.Random, count: int, max_length: int = 3) -> List[Sample]:
    return serving.random_samples(rng, count, TABLE_SIZES, max_length)


def approx(scores: Any) -> Any:
    return pytest.approx(scores, rel=0, abs=SCORE_TOLERANCE)


# --- the server: dlrm.mar registered twice -------------------------------------------------------

torchserve = torchserve_fixture(
    mars={"dlrm": E2E_CONFIG},
    models={
        "dlrm": {},  # the .mar's YAML: batchSize 32, maxBatchDelay 1 ms
        "dlrm_batched": {"mar": "dlrm.mar", "batch_size": 8, "max_batch_delay": 2000},
    },
)


@pytest.fixture(scope="module")
def direct_model() -> torch.nn.Module:
    return DLRMFactory(E2E_CONFIG)


# --- answers ------------------------------------------------------------------------------


def test_one_sample_request_is_answered_with_its_score_and_probability(
    torchserve: TorchServe, direct_model: torch.nn.Module
) -> None:
    samples = random_samples(random.Random(1), 1)
    status, answer = predict(torchserve, "dlrm", make_request(samples, one_sample=True))
    assert status == 200
    assert set(answer) == {"score", "probability"}
    assert isinstance(answer["score"], float)
    assert answer["score"] == approx(direct_scores(direct_model, samples)[0])
    assert answer["probability"] == pytest.approx(1 / (1 + math.exp(-answer["score"])), abs=1e-7)


def test_upstream_two_sample_request_equals_each_sample_sent_alone(
    torchserve: TorchServe, direct_model: torch.nn.Module
) -> None:
    with open(os.path.join(REFERENCE, "upstream_dlrm_bs_2.json")) as f:
        upstream = json.load(f)  # its dense features; ids valid for the served tables
    samples = [(upstream["float_features"][0], [[11], [222], [3333], [2**24 + 5]]),
               (upstream["float_features"][1], [[999], [0], [4999], [77]])]  # fmt: skip
    status, both = predict(torchserve, "dlrm", make_request(samples))
    alone = [predict(torchserve, "dlrm", make_request([s], one_sample=True)) for s in samples]
    assert status == 200 and [a[0] for a in alone] == [200, 200]
    assert len(both["score"]) == 2
    assert both["score"] == approx([a[1]["score"] for a in alone])
    assert both["score"] == approx(direct_scores(direct_model, samples))
    assert both["score"][0] != pytest.approx(both["score"][1], abs=1e-3)


def test_multi_hot_lengths_0_1_and_3_equal_a_direct_call_of_the_same_model(
    torchserve: TorchServe, direct_model: torch.nn.Module
) -> None:
    samples = [([0.5] * 13, [[], [7], [1, 2, 3], [2**24 + 9, 0, 123456]]),
               ([-0.5] * 13, [[999, 0, 5], [], [4], []])]  # fmt: skip
    status, answer = predict(torchserve, "dlrm", make_request(samples))
    assert status == 200
    assert answer["score"] == approx(direct_scores(direct_model, samples))
    # the bags matter: dropping one id changes the score
    fewer = [([0.5] * 13, [[], [7], [1, 2], [2**24 + 9, 0, 123456]])]
    assert direct_scores(direct_model, fewer)[0] != approx(answer["score"][0])


def test_id_above_2_24_reaches_its_own_row(torchserve: TorchServe, direct_model: torch.nn.Module) -> None:
    """float32 holds 2^24 + 1 as 2^24: upstream scored both ids with the same row."""
    dense = [0.1 * i for i in range(13)]
    scores = {}
    for big_id in (2**24, 2**24 + 1):
        sample = [(dense, [[1], [2], [3], [big_id]])]
        status, answer = predict(torchserve, "dlrm", make_request(sample, one_sample=True))
        assert status == 200
        assert answer["score"] == approx(direct_scores(direct_model, sample)[0])
        scores[big_id] = answer["score"]
    assert abs(scores[2**24] - scores[2**24 + 1]) > 5 * SCORE_TOLERANCE


# --- dynamic batching ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def burst(torchserve: TorchServe) -> Dict[str, Any]:
    """32 distinct requests (1 to 3 samples each) sent at once to ``dlrm_batched``."""
    rng = random.Random(32)
    sample_lists = [random_samples(rng, rng.randint(1, 3)) for _ in range(32)]
    calls_before = torchserve.handler_calls("dlrm_batched")
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda s: predict(torchserve, "dlrm_batched", make_request(s)), sample_lists))
    return {"samples": sample_lists, "answers": answers, "calls_before": calls_before}


def test_32_concurrent_requests_each_get_exactly_their_own_scores(
    burst: Dict[str, Any], direct_model: torch.nn.Module
) -> None:
    for samples, (status, answer) in zip(burst["samples"], burst["answers"]):
        assert status == 200
        assert len(answer["score"]) == len(samples)
        assert answer["score"] == approx(direct_scores(direct_model, samples))


def test_concurrent_requests_really_form_batches(torchserve: TorchServe, burst: Dict[str, Any]) -> None:
    torchserve.wait_until(  # the metrics log is written as the batches finish
        "the burst's metrics",
        lambda: torchserve.handler_calls("dlrm_batched") - burst["calls_before"] >= 4,
        30,
    )
    calls = torchserve.handler_calls("dlrm_batched") - burst["calls_before"]
    assert 4 <= calls < 32  # 32 requests in batches of up to 8


def test_malformed_request_in_a_batch_leaves_its_neighbours_answers_correct(
    torchserve: TorchServe, direct_model: torch.nn.Module
) -> None:
    worker_pid = torchserve.workers("dlrm_batched")[0]["pid"]
    calls_before = torchserve.handler_calls("dlrm_batched")
    sample_lists = random_samples(random.Random(8), 7)
    bodies: List[Any] = [make_request([s], one_sample=True) for s in sample_lists]
    bodies.insert(3, make_request(random_samples(random.Random(9), 1)) | {"id_list_features.values": "oops"})
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda b: predict(torchserve, "dlrm_batched", b), bodies))
    torchserve.wait_until(
        "the batch's metrics", lambda: torchserve.handler_calls("dlrm_batched") > calls_before, 30
    )
    assert torchserve.handler_calls("dlrm_batched") - calls_before == 1  # one batch of 8

    status, error = answers.pop(3)
    assert status == 400
    assert error == {"code": 400, "type": "InvalidInput", "message": error["message"]}
    assert error["message"].startswith("id_list_features.values: got the string 'oops'")
    for sample, (status, answer) in zip(sample_lists, answers):
        assert status == 200
        assert answer["score"] == approx(direct_scores(direct_model, [sample])[0])
    assert torchserve.workers("dlrm_batched")[0]["pid"] == worker_pid  # the worker survived


# --- bad requests over HTTP -----------------------------------------------------------------

VALID = make_request([([0.5] * 13, [[1], [2], [3], [4]])], one_sample=True)
TOO_MANY = make_request([([0.5] * 13, [[1], [2], [3], [4]])] * 9)


def body_with(**fields: Any) -> bytes:
    return json.dumps({**VALID, **{k.replace("__", "."): v for k, v in fields.items()}}).encode()


# (case, raw body, HTTP status, the field the message must name first)
TEST_CASES = [
    ("not_json", b"float_features=1", 400, "request body"),
    ("missing_key", json.dumps({"float_features": [0.5] * 13}).encode(), 400, "id_list_features.lengths"),
    ("wrong_count", body_with(float_features=[0.5] * 12), 400, "float_features"),
    ("string_number", body_with(float_features=["0.5"] * 13), 400, "float_features[0]"),
    ("bool", body_with(float_features=[0.5] * 12 + [False]), 400, "float_features[12]"),
    ("nan", body_with(float_features=[0.5] * 12 + [math.nan]), 400, "float_features[12]"),  # json.dumps writes NaN
    ("infinity", body_with(float_features=[math.inf] + [0.5] * 12), 400, "float_features[0]"),
    ("negative_id", body_with(id_list_features__values=[1, -2, 3, 4]), 400, "id_list_features.values[1]"),
    ("id_of_table_size", body_with(id_list_features__values=[1, 2, 3, BIG_TABLE_ROWS]), 400, "id_list_features.values[3]"),
    ("float_id", body_with(id_list_features__values=[1.0, 2, 3, 4]), 400, "id_list_features.values[0]"),
    ("lengths_not_summing_to_values", body_with(id_list_features__lengths=[1, 1, 1, 2]), 400, "id_list_features.values"),
    ("negative_length", body_with(id_list_features__lengths=[1, 1, -1, 3]), 400, "id_list_features.lengths[2]"),
    ("too_many_samples", json.dumps(TOO_MANY).encode(), 413, "float_features"),
]  # fmt: skip


@pytest.mark.parametrize("body, status, field", [c[1:] for c in TEST_CASES], ids=[c[0] for c in TEST_CASES])
def test_bad_request_is_answered_4xx_with_a_message_naming_the_field(
    torchserve: TorchServe, body: bytes, status: int, field: str
) -> None:
    answer_status, answer = predict(torchserve, "dlrm", body)
    assert answer_status == status
    assert answer["code"] == status and answer["type"] == "InvalidInput"
    assert answer["message"].startswith(f"{field}:")
    assert "expected" in answer["message"]


def test_worker_answers_normally_after_bad_requests(torchserve: TorchServe) -> None:
    assert predict(torchserve, "dlrm", b"{")[0] == 400
    status, answer = predict(torchserve, "dlrm", VALID)
    assert status == 200 and isinstance(answer["score"], float)
