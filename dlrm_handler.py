"""TorchServe handler for the TorchRec DLRM: a JSON request in, its scores out.

The request path::

    curl --data @sample_data.json -> TorchServe (dynamic batching: up to batchSize requests
    per call) -> TorchRecDLRMHandler.handle -> preprocess: parse_request per request, one
    key-major KeyedJaggedTensor + one dense tensor for the whole batch -> inference:
    model(dense, kjt) -> logits -> postprocess: each request its own {"score", "probability"}

Symbols, as in TorchRec's ``DLRM``: B samples, N dense features (``dense_in_features``),
F sparse features (one embedding table each), L ids (the sum of the lengths).

A request (upstream's keys; see ``sample_data.json``)::

    {"float_features": [N numbers]  or  [[N numbers], ... B lists],
     "id_list_features.lengths": [B x F non-negative integers, sample-major],
     "id_list_features.values": [L ids, in the order of the lengths]}

Answers: ``{"score": s, "probability": p}`` for a one-sample request (``float_features`` a
flat list), ``{"score": [s0, ...], "probability": [p0, ...]}`` for B samples; ``score`` is
the model's logit and ``probability`` its sigmoid. A bad request is answered alone with a
4xx and ``{"code": 400, "type": "InvalidInput", "message": "<field>: <found>; expected
<what>"}``; the other requests of its batch are scored as if it were not there.

``parse_request`` is the whole request contract as a pure function: any JSON value, str or
bytes gives either a valid sample batch or a ``ValueError`` (see ``invalid_input``).

TorchServe loads a handler file only if it defines exactly one class: this file holds
``TorchRecDLRMHandler`` and functions only (errors are ``ValueError``s carrying an
``http_status`` attribute, not a class of their own). No module-level function may be called
``handle``: TorchServe would take it for a function entry point.
"""

import array
import http
import itertools
import json
import logging
import math
import operator
import os
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from ts.handler_utils.timer import timed
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from dlrm_factory import DLRMFactory, optimize_for_inference, read_config_source, resolve_model_config

try:  # orjson: faster, and strict (no NaN/Infinity literals); json as the fallback
    import orjson

    _json_loads = orjson.loads
    _json_dumps = orjson.dumps
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    _json_loads = json.loads

    def _json_dumps(value: Any) -> bytes:
        return json.dumps(value).encode()

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"  # names inside the .mar (see create_dlrm_mar.sh)
CHECKPOINT_FILE = "checkpoint.pt"
DENSE_KEY = "float_features"
LENGTHS_KEY = "id_list_features.lengths"
VALUES_KEY = "id_list_features.values"
REQUEST_KEYS = (DENSE_KEY, LENGTHS_KEY, VALUES_KEY)
BAD_REQUEST = 400
PAYLOAD_TOO_LARGE = 413
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# One request after parsing: (dense [B, N] float32, lengths [B, F] int64, values [L] int64,
# one_sample: float_features was a flat list, so the answer holds scalars).
ParsedRequest = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]


# ---------------------------------------------------------------------------------------
# Errors: a ValueError with the HTTP status to answer (400, or 413 for too many samples).
# ---------------------------------------------------------------------------------------


def invalid_input(message: str, status: int = BAD_REQUEST) -> ValueError:
    """The error of one bad request; ``error.http_status`` is the 4xx it is answered with."""
    error = ValueError(message)
    error.http_status = status
    return error


def error_response(error: ValueError) -> Tuple[int, Dict[str, Any]]:
    """(HTTP status, JSON body) answering a request that failed with ``error``."""
    status = getattr(error, "http_status", BAD_REQUEST)
    return status, {"code": status, "type": "InvalidInput", "message": str(error)}


def _describe(value: Any) -> str:
    """A short description of a JSON value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        text = value if len(value) <= 20 else value[:17] + "..."
        return f"the string {text!r}"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**20 else f"an integer of {len(str(abs(value)))} digits"
        return text
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "a JSON object"
    return f"a {type(value).__name__}"


def _first_of_wrong_type(items: List[Any], allowed: Tuple[type, ...]) -> int:
    """Index of the first item whose exact type is not in ``allowed`` (bool is not int)."""
    return next(i for i, item in enumerate(items) if type(item) not in allowed)


# ---------------------------------------------------------------------------------------
# Parsing one request: JSON -> (dense, lengths, values); every rule of SPEC §4.
# ---------------------------------------------------------------------------------------


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: one JSON object as a dict; a key given twice
    is an InvalidInput error naming it."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        field = key if key in REQUEST_KEYS else f"request body: the key {key[:40]!r}"
        raise invalid_input(
            f"{field}: given {sum(k == key for k, _ in pairs)} times in one JSON object; expected "
            f"each key once (JSON parsers disagree on which copy counts)"
        )
    return obj


def _refuse_duplicate_keys(body: Union[bytes, bytearray, str]) -> None:
    """Re-read ``body`` (valid JSON) with ``json.loads``, refusing a key given twice."""
    try:
        json.loads(body, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise invalid_input("request body: JSON nested too deeply; expected a JSON object of lists") from None
    except (ValueError, TypeError) as e:
        if hasattr(e, "http_status"):
            raise
        raise invalid_input(f"request body: not valid JSON ({e})") from None


def _more_colons_than(text: Union[bytes, bytearray, str], limit: int) -> bool:
    """Whether ``text`` holds more than ``limit`` ':'. Large bodies jump from one ':' to the
    next with ``find`` (memchr): ~20x faster than ``count`` on a 1024-sample request."""
    colon = ":" if isinstance(text, str) else b":"
    if len(text) < 4096:
        return text.count(colon) > limit
    start = 0
    for _ in range(limit + 1):
        start = text.find(colon, start) + 1
        if start == 0:
            return False
    return True


def decode_body(body: Any) -> Any:
    """The request as a JSON value: bytes/bytearray/str are parsed, anything else (TorchServe
    already parsed an ``application/json`` body) is returned as it is.

    A key given twice in one JSON object is refused (orjson and json silently keep the last
    copy). orjson cannot report it, so the check is cheap first: each key-value pair of the
    text holds one ':' outside strings, so a body with no more ':' than its top-level object
    has keys (every valid request: 3) holds no duplicate and no nested object. Only other
    bodies are read a second time, by ``json.loads`` with a hook that refuses duplicates."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            value = _json_loads(body)
        except (ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise invalid_input(
                f"request body: not valid JSON ({e}); expected a JSON object with the keys "
                f"{', '.join(REQUEST_KEYS)}"
            ) from None
        if _more_colons_than(body, len(value) if isinstance(value, dict) else 0):
            _refuse_duplicate_keys(body)
        return value
    return body


def _parse_dense(raw: Any, num_dense: int, max_samples: int) -> Tuple[torch.Tensor, bool]:
    """``float_features`` -> (Tensor[B, N] float32, one_sample)."""
    expected = f"a list of {num_dense} numbers (one sample) or a list of B lists of {num_dense} numbers"
    if not isinstance(raw, list) or not raw:
        raise invalid_input(f"{DENSE_KEY}: got {_describe(raw)}; expected {expected}")
    one_sample = not isinstance(raw[0], list)
    if one_sample:
        if len(raw) != num_dense:
            raise invalid_input(f"{DENSE_KEY}: got {len(raw)} numbers; expected {expected}")
        rows, flat = [raw], raw
    else:
        if len(raw) > max_samples:
            raise invalid_input(
                f"{DENSE_KEY}: {len(raw)} samples in one request; expected at most "
                f"max_samples_per_request = {max_samples} (split the request)",
                PAYLOAD_TOO_LARGE,
            )
        for b, row in enumerate(raw):
            if not isinstance(row, list) or len(row) != num_dense:
                raise invalid_input(
                    f"{DENSE_KEY}[{b}]: got {_describe(row)}; expected a list of {num_dense} "
                    f"numbers (every sample has {num_dense} dense features)"
                )
        rows, flat = raw, list(itertools.chain.from_iterable(raw))

    def where(i: int) -> str:
        return f"{DENSE_KEY}[{i}]" if one_sample else f"{DENSE_KEY}[{i // num_dense}][{i % num_dense}]"

    if not set(map(type, flat)) <= {int, float}:
        i = _first_of_wrong_type(flat, (int, float))
        raise invalid_input(
            f"{where(i)}: got {_describe(flat[i])}; expected a JSON number (not a string or boolean)"
        )
    try:
        dense = torch.tensor(flat, dtype=torch.float64).float()
    except OverflowError:  # an integer beyond float64
        dense = torch.full((len(flat),), math.inf)
    bad = ~torch.isfinite(dense)  # NaN, +-inf, or beyond float32 (which became inf)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise invalid_input(
            f"{where(i)}: got {_describe(flat[i])}; expected a finite number within float32 "
            f"range (+-{FLOAT32_MAX:.4g})"
        )
    return dense.view(len(rows), num_dense), one_sample


def _parse_int_list(raw: Any, field: str, count: int, what: str) -> torch.Tensor:
    """A JSON list of ``count`` integers (not floats, strings or booleans) -> Tensor[count]
    int64. ``what`` says what the list holds, for the messages."""
    if not isinstance(raw, list):
        raise invalid_input(f"{field}: got {_describe(raw)}; expected a list of {what}")
    if len(raw) != count:
        raise invalid_input(f"{field}: got {len(raw)} items; expected {what}")
    if not set(map(type, raw)) <= {int}:
        i = _first_of_wrong_type(raw, (int,))
        beyond = isinstance(raw[i], float) and abs(raw[i]) >= 2**63  # orjson reads ints >= 2^64 as floats
        raise invalid_input(
            f"{field}[{i}]: got {_describe(raw[i])}; expected a JSON integer"
            f"{' within int64' if beyond else ''}"
        )
    try:
        return torch.tensor(raw, dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError):  # an integer beyond int64
        i = next(i for i, x in enumerate(raw) if not INT64_MIN <= x <= INT64_MAX)
        raise invalid_input(f"{field}[{i}]: got {_describe(raw[i])}; expected an integer within int64") from None


def _parse_lengths(raw: Any, num_samples: int, keys: List[str]) -> torch.Tensor:
    """``id_list_features.lengths`` -> Tensor[B, F] int64, sample-major as sent."""
    count = num_samples * len(keys)
    what = f"B x F = {num_samples} x {len(keys)} = {count} non-negative integers (sample-major)"
    lengths = _parse_int_list(raw, LENGTHS_KEY, count, what)
    negative = (lengths < 0).nonzero()
    if negative.numel():
        i = int(negative[0])
        raise invalid_input(
            f"{LENGTHS_KEY}[{i}]: got {int(lengths[i])} (sample {i // len(keys)}, feature "
            f"{keys[i % len(keys)]}); expected a non-negative integer"
        )
    return lengths.view(num_samples, len(keys))


def _parse_ids(raw: Any, lengths: torch.Tensor, cfg: Dict[str, Any]) -> torch.Tensor:
    """``id_list_features.values`` -> Tensor[L] int64, each id checked against its table
    (or taken mod its size under ``id_overflow: hash``)."""
    keys = cfg["id_list_features_keys"]
    total = sum(lengths.reshape(-1).tolist())  # in Python: an int64 sum could wrap around
    what = f"{total} ids (the sum of {LENGTHS_KEY}: one id per unit of length)"
    values = _parse_int_list(raw, VALUES_KEY, total, what)
    cells = torch.arange(lengths.numel()).repeat_interleave(lengths.reshape(-1))  # [L]: b*F+f
    feature = cells % len(keys)
    table_size = torch.tensor(cfg["num_embeddings_per_feature"], dtype=torch.int64)[feature]
    hashed = cfg["id_overflow"] == "hash"
    bad = (values < 0) if hashed else (values < 0) | (values >= table_size)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        f, size = int(feature[i]), int(table_size[i])
        expected = "a non-negative integer (id_overflow: hash)" if hashed else (
            f"an integer in [0, {size}) (its table has {size} rows; or serve with id_overflow: hash)"
        )
        raise invalid_input(
            f"{VALUES_KEY}[{i}]: got {int(values[i])} for feature {keys[f]} of sample "
            f"{int(cells[i]) // len(keys)}; expected {expected}"
        )
    return values % table_size if hashed else values


def parse_request(body: Any, cfg: Dict[str, Any]) -> ParsedRequest:
    """One request -> (dense Tensor[B, N] float32, lengths Tensor[B, F] int64 sample-major,
    values Tensor[L] int64, one_sample).

    ``body``: bytes, bytearray or str holding JSON, or an already parsed JSON value.
    ``cfg``: a resolved model config (``dlrm_factory.resolve_model_config``).
    Raises ``ValueError`` (``error.http_status`` 400, or 413 for more than
    ``max_samples_per_request`` samples) whose message names the field, what it held and
    what was expected. Raises nothing else, whatever ``body`` is."""
    request = decode_body(body)
    if not isinstance(request, dict):
        raise invalid_input(
            f"request body: got {_describe(request)}; expected a JSON object with the keys "
            f"{', '.join(REQUEST_KEYS)}"
        )
    for key in REQUEST_KEYS:
        if key not in request:
            # curl --data without a JSON Content-Type posts a form: TorchServe then hands
            # over the JSON text as a form field name.
            as_form = any(isinstance(k, str) and k.lstrip().startswith("{") for k in request)
            hint = " (the body arrived as a form: send it with -H 'Content-Type: application/json')"
            raise invalid_input(
                f"{key}: missing; expected a JSON object with the keys "
                f"{', '.join(REQUEST_KEYS)}{hint if as_form else ''}"
            )
    dense, one_sample = _parse_dense(
        request[DENSE_KEY], cfg["dense_in_features"], cfg["max_samples_per_request"]
    )
    lengths = _parse_lengths(request[LENGTHS_KEY], dense.shape[0], cfg["id_list_features_keys"])
    values = _parse_ids(request[VALUES_KEY], lengths, cfg)
    return dense, lengths, values, one_sample


# ---------------------------------------------------------------------------------------
# The fast path: a plainly valid request checked whole lists at a time, in C builtins.
# ---------------------------------------------------------------------------------------

# One request after parsing, as lists for the batch's tensors: (dense [B*N] numbers,
# lengths [B*F] ints sample-major, values [L] ids (mod their table's size under
# ``id_overflow: hash``), B, one_sample).
ParsedLists = Tuple[List[Any], List[int], List[int], int, bool]


def parse_plain_request(request: Any, cfg: Dict[str, Any]) -> Optional[ParsedLists]:
    """``request`` (a parsed JSON value) as lists when it is plainly valid, else None.

    Gives what ``parse_request`` gives for the requests it accepts, with no tensor op and no
    Python loop per number or id: each check runs over a whole list inside a C builtin
    (``set(map(type, ...))``, ``min``, ``max``, ``all(map(operator.lt, ...))``). A one-sample
    request takes ~10 us here against ~180 us in ``parse_request`` (~20 small tensor ops).
    It never rejects: None hands the request to ``parse_request``, which decides and words
    the error. So it accepts only what ``parse_request`` accepts (tests/test_fast_parse.py
    checks that they agree): exactly the three keys; B <= max_samples_per_request lists of
    N numbers (int or float), finite and within +-FLOAT32_MAX (finite in float32 too);
    B x F non-negative int lengths summing to the number of ids; int ids in [0, table size)
    (``error``) or in [0, INT64_MAX] (``hash``, then taken mod the table size)."""
    if type(request) is not dict or len(request) != len(REQUEST_KEYS):
        return None
    raw_dense, lengths, ids = (request.get(key) for key in REQUEST_KEYS)
    if type(raw_dense) is not list or not raw_dense or type(lengths) is not list or type(ids) is not list:
        return None
    num_dense, sizes = cfg["dense_in_features"], cfg["num_embeddings_per_feature"]
    one_sample = type(raw_dense[0]) is not list
    if one_sample:
        num_samples, dense = 1, raw_dense
        if len(dense) != num_dense:
            return None
    else:
        num_samples = len(raw_dense)
        if num_samples > cfg["max_samples_per_request"] or set(map(type, raw_dense)) != {list}:
            return None
        if set(map(len, raw_dense)) != {num_dense}:
            return None
        dense = list(itertools.chain.from_iterable(raw_dense))
    if not set(map(type, dense)) <= {int, float} or not set(map(type, lengths)) <= {int}:
        return None
    if not set(map(type, ids)) <= {int} or len(lengths) != num_samples * len(sizes):
        return None
    try:
        if not all(map(math.isfinite, dense)) or max(map(abs, dense)) > FLOAT32_MAX:
            return None
    except OverflowError:  # an integer beyond float64
        return None
    if min(lengths) < 0 or sum(lengths) != len(ids):
        return None
    if ids:
        if min(ids) < 0:
            return None
        per_id_size = list(itertools.chain.from_iterable(map(itertools.repeat, sizes * num_samples, lengths)))
        if cfg["id_overflow"] == "hash":
            if max(ids) > INT64_MAX:
                return None
            ids = list(map(operator.mod, ids, per_id_size))
        elif not all(map(operator.lt, ids, per_id_size)):
            return None
    return dense, lengths, ids, num_samples, one_sample


def parse_request_lists(body: Any, cfg: Dict[str, Any]) -> ParsedLists:
    """``parse_request`` for a batch: one request as lists (see ``ParsedLists``), by the fast
    path when it is plainly valid, else by ``parse_request`` (which raises its error)."""
    request = decode_body(body)
    plain = parse_plain_request(request, cfg)
    if plain is not None:
        return plain
    dense, lengths, values, one_sample = parse_request(request, cfg)
    return dense.reshape(-1).tolist(), lengths.reshape(-1).tolist(), values.tolist(), dense.shape[0], one_sample


def _tensor_of(numbers: array.array, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor viewing ``numbers`` (kept alive by the tensor), or an empty one."""
    return torch.frombuffer(numbers, dtype=dtype) if numbers else torch.empty(0, dtype=dtype)


def stack_requests(parsed: List[ParsedLists], cfg: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parsed requests of a batch, in order -> (dense Tensor[B, N] float32, lengths
    Tensor[B, F] int64 sample-major, values Tensor[L] int64): three tensors for the batch.
    Dense numbers go through float64 as in ``parse_request``: the same float32 values.

    The numbers are packed into an ``array.array`` (C doubles / int64) and the tensor is a
    view of it (``torch.frombuffer``), faster than ``torch.tensor`` of a list, which converts
    one Python object at a time: 832 ids in 32 us instead of 112 us; the three tensors of 32
    one-sample requests in 121 us instead of 205 us."""
    chain = itertools.chain.from_iterable
    dense = _tensor_of(array.array("d", chain(p[0] for p in parsed)), torch.float64).float()
    lengths = _tensor_of(array.array("q", chain(p[1] for p in parsed)), torch.int64)
    values = _tensor_of(array.array("q", chain(p[2] for p in parsed)), torch.int64)
    num_features = len(cfg["id_list_features_keys"])
    return dense.view(-1, cfg["dense_in_features"]), lengths.view(-1, num_features), values


# ---------------------------------------------------------------------------------------
# A batch of parsed requests -> the model's inputs.
# ---------------------------------------------------------------------------------------


def to_key_major_kjt(keys: List[str], lengths: torch.Tensor, values: torch.Tensor) -> KeyedJaggedTensor:
    """Sample-major ``lengths`` Tensor[B, F] and ``values`` Tensor[L] -> TorchRec's key-major
    ``KeyedJaggedTensor`` (all of feature 0's samples, then feature 1's, ...).

    Cell (b, f) of the request is jagged segment b*F + f; the KJT wants it at f*B + b.
    fbgemm's ``permute_1D_sparse_data`` (the op TorchRec permutes jagged segments with, e.g.
    in ``KeyedJaggedTensor.permute`` for variable batch sizes) moves whole segments in one
    op: no Python loop per id. One sample is already key-major (segment f is at f*1 + 0).

    Offsets and per-key lengths are left for the KJT to compute when asked (the lean CPU
    forward asks only for the offsets): a lone request's KJT + forward took 0.37 ms instead
    of 0.45 ms (1.27 instead of 1.43 ms with cold caches), 32 samples' 1.92 instead of 2.02."""
    num_samples, num_features = lengths.shape
    if num_samples == 1:
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.reshape(-1))
    segment_order = torch.arange(num_samples * num_features, dtype=torch.int32)
    segment_order = segment_order.view(num_samples, num_features).t().reshape(-1)
    key_major_lengths, key_major_values, _ = torch.ops.fbgemm.permute_1D_sparse_data(
        segment_order, lengths.reshape(-1), values, None, values.numel()
    )
    return KeyedJaggedTensor(keys=keys, values=key_major_values, lengths=key_major_lengths)


def request_body(row: Any) -> Any:
    """The payload of one TorchServe request: its "body" (or "data") field - JSON already
    parsed by TorchServe for ``application/json``, bytes otherwise; a row without either is
    taken as the request itself."""
    if isinstance(row, dict):
        for key in ("body", "data"):
            if key in row:
                return row[key]
    return row


# ---------------------------------------------------------------------------------------
# KServe v2 (open inference protocol), through TorchServe's ``kservev2`` envelope.
# ---------------------------------------------------------------------------------------

# The v2 inputs of a request: upstream's keys as names, each with its datatype; the outputs.
V2_DATATYPES = {DENSE_KEY: "FP32", LENGTHS_KEY: "INT64", VALUES_KEY: "INT64"}
V2_OUTPUTS = ("score", "probability")  # FP32, shape [B] each


def under_kservev2_envelope(context: Any) -> bool:
    """Whether TorchServe's ``kservev2`` envelope wraps ``handle`` (``service_envelope`` in
    config.properties, or ``TS_SERVICE_ENVELOPE``, which KServe sets for ``protocolVersion:
    v2``). The envelope then hands ``handle`` the "inputs" of ONE request, each
    ``{"name", "shape", "datatype", "data"}`` with its data already reshaped to its shape,
    and makes the list ``handle`` returns the v2 "outputs", naming output i
    ``context.input_names[i]``: an attribute only this envelope sets (before ``handle``)."""
    return hasattr(context, "input_names")


def v2_request(inputs: Any) -> Dict[str, Any]:
    """The inputs of one v2 request -> the same request in upstream's keys, for
    ``parse_request`` (which checks every value). ``float_features`` [B, N] stays B lists
    (or one list for shape [N]); ``id_list_features.lengths`` may be [B, F] (flattened
    sample-major) or [B*F]; ``id_list_features.values`` is [L]."""
    if not isinstance(inputs, list):
        raise invalid_input(f"inputs: got {_describe(inputs)}; expected a list of v2 input tensors")
    request = {}
    for tensor in inputs:
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if not isinstance(name, str) or name not in V2_DATATYPES:
            named = repr(name[:40]) if isinstance(name, str) else _describe(name)
            raise invalid_input(
                f"inputs: got an input named {named}; expected the inputs {', '.join(REQUEST_KEYS)}"
            )
        datatype = tensor.get("datatype")
        if datatype != V2_DATATYPES[name]:
            found = repr(datatype[:20]) if isinstance(datatype, str) else _describe(datatype)
            raise invalid_input(f"{name}: got datatype {found}; expected {V2_DATATYPES[name]!r}")
        data = tensor.get("data")
        if name != DENSE_KEY and isinstance(data, list) and data and isinstance(data[0], list):
            data = list(itertools.chain.from_iterable(data))  # [B, F] -> sample-major [B*F]
        request[name] = data
    return request


# ---------------------------------------------------------------------------------------
# Custom metrics (``context.metrics``), declared in metrics.yaml: with metrics_mode=prometheus
# TorchServe publishes only declared backend metrics. Dimensions ModelName and Level (added
# by TorchServe), Hostname (added by the frontend).
# ---------------------------------------------------------------------------------------

SAMPLES_METRIC = "DLRMSamplesPerBatch"  # gauge: samples scored by one handle call
PREPROCESS_METRIC = "DLRMPreprocessTime"  # gauge, ms: parsing + KJT of one handle call
INFERENCE_METRIC = "DLRMInferenceTime"  # gauge, ms: the model call of one handle call
INVALID_METRIC = "DLRMInvalidRequests"  # counter: requests answered 4xx InvalidInput


def read_served_config(model_dir: str) -> Dict[str, Any]:
    """The resolved config of the ``.mar`` unpacked at ``model_dir``: its ``model_config.json``,
    with ``checkpoint`` set to the packaged ``checkpoint.pt`` when there is one (a relative
    checkpoint path is taken relative to ``model_dir``)."""
    config = read_config_source(os.path.join(model_dir, CONFIG_FILE))
    packaged = os.path.join(model_dir, CHECKPOINT_FILE)
    if os.path.isfile(packaged):
        config["checkpoint"] = packaged
    elif isinstance(config.get("checkpoint"), str):
        config["checkpoint"] = os.path.join(model_dir, config["checkpoint"])
    return resolve_model_config(config)


def serving_threads(model_yaml_config: Dict[str, Any]) -> int:
    """Torch intra-op threads while serving: the model YAML's ``handler: {torch_num_threads:
    N}``, else ``$OMP_NUM_THREADS``, else 1.

    Why 1 by default: a dynamic batch is a few samples (B x 512 matmuls, 26 bag lookups),
    too little work to split, and the worker shares the cores with TorchServe's frontend.
    torch's default (one thread per core) makes every op wait for all of them: on 2 busy
    cores the forward of B = 8 took 11.6 ms with 2 threads against 2.2 ms with 1, and
    through TorchServe a lone request went from 12 to 64 answers/s."""
    handler_config = model_yaml_config.get("handler") or {}
    if "torch_num_threads" in handler_config:
        return int(handler_config["torch_num_threads"])
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return 1


# The work of one ``handle`` call: per request either (its number of samples, one_sample)
# or the ValueError it is answered with.
RequestPlan = List[Union[Tuple[int, bool], ValueError]]


class TorchRecDLRMHandler(BaseHandler):
    """Scores DLRM requests; the model is built by ``DLRMFactory`` from the ``.mar``'s
    ``model_config.json`` (and ``checkpoint.pt``, if packaged). Nothing is downloaded.

    ``handle`` is BaseHandler's: preprocess -> inference -> postprocess. Under TorchServe's
    ``kservev2`` envelope (KServe's open inference protocol) the same steps answer one v2
    request: its inputs go through ``v2_request`` into ``parse_request``, its scores come
    back as the outputs ``score`` and ``probability``. Each call reports the custom metrics
    above through ``context.metrics``."""

    def initialize(self, context: Any) -> None:
        """Build the model. BaseHandler's model loading is not used: it would call the model
        file's class with no arguments, and a DLRM needs its config."""
        self.context = context
        self.manifest = context.manifest
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        model_dir = context.system_properties["model_dir"]
        self.config = read_served_config(model_dir)
        logger.info(
            "DLRM config from %s: %s", os.path.join(model_dir, CONFIG_FILE), json.dumps(self.config)
        )
        self.model = DLRMFactory(self.config)
        threads = serving_threads(self.model_yaml_config)
        torch.set_num_threads(threads)  # after the build: filling the tables may use them all
        logger.info("torch intra-op threads for serving: %d", threads)
        self.device = next(self.model.parameters()).device  # the dense layers' device
        if self.device.type == "cpu":  # one TBE call instead of TorchRec's one-rank dist; same scores
            self.model = optimize_for_inference(self.model)
        context.metrics.add_counter(INVALID_METRIC, 0)  # on /metrics at 0 before any bad request
        self.initialized = True

    @timed
    def preprocess(self, data: List[Any]) -> Tuple[torch.Tensor, KeyedJaggedTensor, RequestPlan]:
        """The requests of one dynamic batch -> (dense Tensor[B, N], one KJT, the plan).

        Every request is parsed alone (``parse_request_lists``: the fast path, or
        ``parse_request``); a bad one joins the plan as its error and adds no samples. The
        good ones are stacked sample-major into one tensor each (B = all their samples),
        then the ids are turned key-major. One request of B = 2 samples, F = 3::

            {"float_features": [[0.5, ...], [1.5, ...]],      # B lists of N numbers
             "id_list_features.lengths": [1, 0, 2,  2, 1, 1],  # B x F, sample-major
             "id_list_features.values":  [7, 42, 43,  5, 6, 9, 11]}

                       sample 0    sample 1
            cat_0      [7]         [5, 6]
            cat_1      []          [9]
            cat_2      [42, 43]    [11]

            KeyedJaggedTensor(keys=["cat_0", "cat_1", "cat_2"],
                              lengths=[1, 2,  0, 1,  2, 1],      # F x B, key-major
                              values=[7, 5, 6,  9,  42, 43, 11])

        (Upstream passed the sample-major lists to the KJT as they came: right for one
        sample, scrambled for more.)

        Under the ``kservev2`` envelope ``data`` is the inputs of one v2 request, and a bad
        one raises ``PredictionException`` with its 4xx (the envelope cannot carry an error
        body)."""
        started = time.perf_counter()
        v2 = under_kservev2_envelope(self.context)
        if v2 and len(getattr(self.context, "request_ids", None) or ()) > 1:
            raise PredictionException(
                f"{len(self.context.request_ids)} requests in one batch: TorchServe's kservev2 "
                "envelope passes on only the first; serve this model with batchSize 1 (as "
                "kserve/config/config.properties does)",
                500,
            )
        plan: RequestPlan = []
        parsed: List[ParsedLists] = []
        for row in [data] if v2 else data:
            try:
                request = parse_request_lists(v2_request(row) if v2 else request_body(row), self.config)
            except ValueError as error:
                plan.append(error)
                continue
            parsed.append(request)
            plan.append((request[3], request[4]))
        dense, lengths, values = stack_requests(parsed, self.config)
        kjt = to_key_major_kjt(self.config["id_list_features_keys"], lengths, values)
        metrics = self.context.metrics
        invalid = len(plan) - len(parsed)
        if invalid:
            metrics.add_counter(INVALID_METRIC, invalid)
        metrics.add_metric(SAMPLES_METRIC, dense.shape[0], "count", metric_type=MetricTypes.GAUGE)
        metrics.add_time(PREPROCESS_METRIC, (time.perf_counter() - started) * 1000)
        if v2 and invalid:
            status, body = error_response(plan[0])
            # An error's 413 reaches the client as 507 (TorchServe keeps 413 for a worker
            # killed for memory): too many samples is a 400 here (SPEC §4 allows either).
            raise PredictionException(body["message"], BAD_REQUEST if status == PAYLOAD_TOO_LARGE else status)
        return dense, kjt, plan

    @timed
    def inference(
        self, batch: Tuple[torch.Tensor, KeyedJaggedTensor, RequestPlan]
    ) -> Tuple[torch.Tensor, RequestPlan]:
        """(dense Tensor[B, N], KJT, plan) -> (logits Tensor[B] on the CPU, plan)."""
        dense, kjt, plan = batch
        if dense.shape[0] == 0:  # every request of the batch was bad
            return torch.empty(0), plan
        started = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(dense.to(self.device), kjt.to(self.device))
        logits = logits.reshape(-1).float().cpu()
        self.context.metrics.add_time(INFERENCE_METRIC, (time.perf_counter() - started) * 1000)
        return logits, plan

    @timed
    def postprocess(self, output: Tuple[torch.Tensor, RequestPlan]) -> List[Any]:
        """Each request its own answer, in order: its scores (scalars for a one-sample
        request) or its InvalidInput error with the 4xx set on its response; each as the JSON
        bytes of its body. (Encoded here with orjson: TorchServe would ``json.dumps`` each
        dict with indent=2; its response for 32 answers took 203 us instead of 511 us, and
        bench_serve's 32 connections got +8% req/s.)

        Under the ``kservev2`` envelope: the v2 outputs of the one request, [scores
        float32[B], probabilities float32[B]], named ``score`` and ``probability``."""
        logits, plan = output
        if under_kservev2_envelope(self.context):
            self.context.input_names = list(V2_OUTPUTS)  # the envelope's names for the outputs
            return [logits.numpy(), torch.sigmoid(logits).numpy()]
        scores, probabilities = logits.tolist(), torch.sigmoid(logits).tolist()
        answers: List[Dict[str, Any]] = []
        start = 0
        for idx, item in enumerate(plan):
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(item, ValueError):
                status, body = error_response(item)
                self.context.set_response_status(status, http.HTTPStatus(status).phrase, idx)
                answers.append(body)
                continue
            num_samples, one_sample = item
            end = start + num_samples
            if one_sample:
                answers.append({"score": scores[start], "probability": probabilities[start]})
            else:
                answers.append({"score": scores[start:end], "probability": probabilities[start:end]})
            start = end
        return [_json_dumps(answer) for answer in answers]
