"""Hypothesis strategies for requests, shared by the property tests of the request contract
(test_parser_properties.py) and of its fast path (test_fast_parse.py), with the small configs
they run against.

Symbols: B samples, N = 13 dense features, F = 3 sparse features (tables of 10, 20 and 5
rows: small, so that drawn ids often fall inside them and now and then just past the end),
L ids.
"""

import math
import random
from typing import Any, Dict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from conftest import small_model_config
from dlrm_factory import resolve_model_config
from dlrm_request import REQUEST_KEYS

TABLE_SIZES = [10, 20, 5]
N, F = 13, len(TABLE_SIZES)
MAX_SAMPLES = 4
CONFIGS = {
    policy: resolve_model_config(
        small_model_config(num_embeddings_per_feature=TABLE_SIZES, max_samples_per_request=MAX_SAMPLES, id_overflow=policy)
    )
    for policy in ("error", "hash")
}
# Deterministic and bounded for CI: the same examples every run (derandomize), no example
# database, no deadline (a shared CI machine is slow now and then).
PROPERTY_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Any JSON value (what json.loads / orjson.loads can return), NaN and infinities included
# (json.loads reads NaN and Infinity), integers well beyond int64.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.sampled_from(REQUEST_KEYS), st.text(max_size=6)), children, max_size=5),
    ),
    max_leaves=40,
)
# Values at the edges of every rule: floats at and beyond float32's range and below its
# smallest subnormal, ints at and beyond int64 and beyond float64, booleans, strings, NaN,
# infinities, lists and objects where numbers belong.
edge_values = st.one_of(
    st.sampled_from([True, False, None, "1", [], [1], {}, 3.5e38, -3.4028235e38, 1e39, -1e39, 1e-46, -0.0, 1.0,
                     -1, 0, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, math.nan, math.inf, -math.inf]),
    st.floats(width=32),
    json_scalars,
)  # fmt: skip


@st.composite
def near_valid_requests(draw: st.DrawFn, junk: bool = True) -> Dict[str, Any]:
    """A request of 1 to MAX_SAMPLES + 1 samples, ids up to one past their table's end.
    With ``junk``, it is valid or close to it: one element of a list replaced by an edge
    value (about 1 in 3), one sample's row of the wrong length or type (1 in 6), a whole
    field replaced by any JSON value (1 in 6 each), a key missing (1 in 8) or extra (1 in 6)."""
    num_samples = draw(st.integers(min_value=1, max_value=MAX_SAMPLES + 1))
    one_sample = num_samples == 1 and draw(st.booleans())
    # The valid parts from a drawn seed (a few draws instead of hundreds: fast to generate);
    # the faults below are drawn, so hypothesis varies and shrinks those.
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    rows = [[rng.uniform(-10, 10) if rng.random() < 0.8 else rng.randint(-10, 10) for _ in range(N)]
            for _ in range(num_samples)]  # fmt: skip
    lengths = [rng.randint(0, 3) for _ in range(num_samples * F)]
    ids = [rng.randint(0, TABLE_SIZES[cell % F]) for cell, n in enumerate(lengths) for _ in range(n)]  # 0 .. size
    request = {
        "float_features": rows[0] if one_sample else rows,
        "id_list_features.lengths": lengths,
        "id_list_features.values": ids,
    }
    if not junk:
        return request
    if draw(st.integers(0, 2)) == 0:  # one element of one list
        target = draw(st.sampled_from([rows[0], rows[-1], lengths] + ([ids] if ids else [])))
        target[draw(st.integers(0, len(target) - 1))] = draw(edge_values)
    if not one_sample and draw(st.integers(0, 5)) == 0:  # one row of the wrong length or type
        rows[draw(st.integers(0, num_samples - 1))] = draw(st.one_of(
            edge_values, st.lists(st.floats(-10, 10), max_size=N + 1), st.lists(edge_values, min_size=N, max_size=N)
        ))  # fmt: skip
    for key in REQUEST_KEYS:
        if draw(st.integers(0, 5)) == 0:
            request[key] = draw(json_values)
    if draw(st.integers(0, 7)) == 0:
        del request[draw(st.sampled_from(REQUEST_KEYS))]
    if draw(st.integers(0, 5)) == 0:
        request[draw(st.text(max_size=4))] = draw(json_values)
    return request
