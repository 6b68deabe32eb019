"""TorchServe handler for the TorchRec DLRM: the TorchServe glue around the request contract.

Three files, one job each:
    ``dlrm_request.py``  the request contract: JSON -> tensors -> key-major KJT, every error
                         message, each request's answer (pure functions; torch + torchrec)
    ``dlrm_handler.py``  this file: TorchServe's side (initialize, preprocess / inference /
                         postprocess, response statuses, custom metrics, the v2 envelope)
    ``dlrm_factory.py``  the model: ``DLRMFactory(config)``

The request path::

    curl --data @sample_data.json -> TorchServe (dynamic batching: up to batchSize requests
    per call) -> TorchRecDLRMHandler.handle -> preprocess: each request parsed alone, one
    key-major KeyedJaggedTensor + one dense tensor for the whole batch -> inference:
    model(dense, kjt) -> logits -> postprocess: each request its own answer, or its 4xx

Symbols, as in TorchRec's ``DLRM``: B samples, N dense features, F sparse features.

The handler also runs outside a worker, on any context that has what
``BaseHandler.initialize`` reads (``system_properties``, ``manifest``, ``metrics``): e.g.
TorchServe's ``MockContext`` of its handler tests, which cannot set response statuses or
content types; those are set only when the context can.

TorchServe loads a handler file only if it defines exactly one class: this file holds
``TorchRecDLRMHandler`` and functions only. No module-level function may be called
``handle``: TorchServe would take it for a function entry point.
"""

import http
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from ts.handler_utils.timer import timed
from ts.metrics.metric_cache_abstract import MetricCacheAbstract
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

import dlrm_row_order as row_order
import dlrm_table_store as table_store
from dlrm_factory import DLRMFactory, read_config_source, resolve_model_config, serving_config, visible_gpus
from dlrm_lean_forward import optimize_for_inference
from dlrm_request import (
    BAD_REQUEST,
    BINARY_HEADER,
    OK,
    PAYLOAD_TOO_LARGE,
    V2_OUTPUTS,
    RawRequest,
    RequestPlan,
    answer_bodies,
    encode_answer,
    error_response,
    parse_batch,
    request_body,
    to_key_major_kjt,
    v2_request,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"  # names inside the .mar (see create_dlrm_mar.sh)
CHECKPOINT_FILE = "checkpoint.pt"

# ---------------------------------------------------------------------------------------
# Custom metrics (``context.metrics``), declared in metrics.yaml: with metrics_mode=prometheus
# TorchServe publishes only declared backend metrics. Dimensions ModelName and Level (added
# by TorchServe), Hostname (added by the frontend).
# ---------------------------------------------------------------------------------------

SAMPLES_METRIC = "DLRMSamplesPerBatch"  # gauge: samples scored by one handle call
PREPROCESS_METRIC = "DLRMPreprocessTime"  # gauge, ms: parsing + KJT of one handle call
INFERENCE_METRIC = "DLRMInferenceTime"  # gauge, ms: the model call of one handle call
INVALID_METRIC = "DLRMInvalidRequests"  # counter: requests answered 4xx InvalidInput


def add_gauge(metrics: Any, name: str, value: float, unit: str) -> None:
    """A gauge on TorchServe's metrics cache (a worker's ``context.metrics``); a plain metric
    on the older ``MetricsStore`` (``MockContext``'s), which has no metric types."""
    if isinstance(metrics, MetricCacheAbstract):
        metrics.add_metric(name, value, unit, metric_type=MetricTypes.GAUGE)
    else:
        metrics.add_metric(name, value, unit)


def read_served_config(model_dir: str) -> Dict[str, Any]:
    """The resolved config of the ``.mar`` unpacked at ``model_dir``: its ``model_config.json``,
    with ``checkpoint`` set to the packaged ``checkpoint.pt`` when there is one (a relative
    checkpoint path is taken relative to ``model_dir``: create_dlrm_mar.sh packages a DCP
    directory as ``checkpoint.dcp``, and a config naming it so; so is ``id_counts``) and ``table_store`` set to where
    this worker keeps the tables (``dlrm_table_store.served_store_dir``)."""
    config = read_config_source(os.path.join(model_dir, CONFIG_FILE))
    packaged = os.path.join(model_dir, CHECKPOINT_FILE)
    if os.path.isfile(packaged):
        config["checkpoint"] = packaged
    elif isinstance(config.get("checkpoint"), str):
        config["checkpoint"] = os.path.join(model_dir, config["checkpoint"])
    if isinstance(config.get("id_counts"), str):  # packaged as id_counts.safetensors
        config["id_counts"] = os.path.join(model_dir, config["id_counts"])
    config["table_store"] = table_store.served_store_dir(config.get("table_store"))
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


def under_kservev2_envelope(context: Any) -> bool:
    """Whether TorchServe's ``kservev2`` envelope wraps ``handle`` (``service_envelope`` in
    config.properties, or ``TS_SERVICE_ENVELOPE``, which KServe sets for ``protocolVersion:
    v2``). The envelope then hands ``handle`` the "inputs" of ONE request, each
    ``{"name", "shape", "datatype", "data"}`` with its data already reshaped to its shape,
    and makes the list ``handle`` returns the v2 "outputs", naming output i
    ``context.input_names[i]``: an attribute only this envelope sets (before ``handle``)."""
    return hasattr(context, "input_names")


# A worker whose table store entry fails its background check exits with this status.
BAD_ENTRY_EXIT = 3


def served_id_counts(config: Dict[str, Any], model_name: str) -> Optional[row_order.ServedIdCounts]:
    """The ids this worker looks up, counted into ``$DLRM_ID_COUNTS_DIR/<model>-<pid>.safetensors``
    (``dlrm_row_order.ServedIdCounts``), or None when that variable is unset."""
    path = row_order.served_counts_path(model_name)
    if path is None:
        return None
    logger.info("counting the ids looked up into %s", path)
    return row_order.ServedIdCounts(config["id_list_features_keys"], config["num_embeddings_per_feature"], path)


def count_ids(counts: Optional[row_order.ServedIdCounts], kjt: KeyedJaggedTensor, samples: int) -> None:
    """Hand the batch's ids to the counter (a reference; counted off the request path)."""
    if counts is not None:
        counts.record(kjt.values(), kjt.lengths(), samples)


def verify_entry_in_background(model: Any) -> None:
    """A table store entry checked only by sample at open (over
    ``dlrm_table_store.FULL_VERIFY_MAX_BYTES``) is checked whole while this worker serves
    (bounded I/O, around the page cache); a bad block takes the worker out
    (``leave_worker``): TorchServe starts another, whose open rebuilds the entry (or refuses
    it, in a read-only store) instead of serving it."""
    entry = getattr(model, "table_store_entry", None)
    if entry and table_store.checked_in_background(entry["path"]):
        table_store.verify_in_background(entry["path"], on_failure=leave_worker)
        logger.info("table store: checking every block of %s in the background", entry["path"])


def leave_worker(problem: str) -> None:
    """Exit this worker at once, saying why (the entry it serves is bad)."""
    logger.error("table store: %s; this worker exits (its entry must not serve)", problem)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(BAD_ENTRY_EXIT)


def binary_header_length(context: Any, idx: int) -> Optional[str]:
    """The ``Inference-Header-Content-Length`` header of request ``idx`` (HTTP header names
    are case-insensitive; TorchServe passes them as the client spelled them), or None: a
    JSON request. None on a context without request headers (``MockContext``)."""
    try:
        headers = context.get_all_request_header(idx)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    wanted = BINARY_HEADER.lower()
    return next((value for name, value in headers.items() if isinstance(name, str) and name.lower() == wanted), None)


def raw_requests(data: Any, context: Any, v2: bool) -> List[RawRequest]:
    """The batch's requests as ``dlrm_request.parse_batch`` takes them: each body (read as
    BaseHandler reads it, ``request_body``) with its binary header length. Under the
    ``kservev2`` envelope, ``data`` is the inputs of one v2 request (``v2_request``)."""
    if v2:
        try:
            return [(v2_request(data), None)]
        except ValueError as error:
            return [(error, None)]
    return [(request_body(row), binary_header_length(context, idx)) for idx, row in enumerate(data)]


class TorchRecDLRMHandler(BaseHandler):
    """Scores DLRM requests; the model is built by ``DLRMFactory`` from the ``.mar``'s
    ``model_config.json`` (and ``checkpoint.pt``, if packaged). Nothing is downloaded.

    ``handle`` is BaseHandler's: preprocess -> inference -> postprocess. Under TorchServe's
    ``kservev2`` envelope (KServe's open inference protocol) the same steps answer one v2
    request: its inputs go through ``v2_request`` into the parser, its scores come back as
    the outputs ``score`` and ``probability``. Each call reports the custom metrics above
    through ``context.metrics``."""

    def initialize(self, context: Any) -> None:
        """Build the model. BaseHandler's model loading is not used: it would call the model
        file's class with no arguments, and a DLRM needs its config.

        Devices: this worker's own GPU, ``context.system_properties["gpu_id"]`` (TorchServe
        hands them out round robin: one worker per GPU by default), and world_size GPUs from
        there when the config asks for more; the CPU when TorchServe gave it none
        (number_of_gpu=0). Its share of each GPU's memory counts the workers that share one
        (the model YAML's maxWorkers; absent: one per GPU). See ``serving_config``."""
        self.context = context
        self.manifest = context.manifest
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        model_dir = context.system_properties["model_dir"]
        gpu_id = context.system_properties.get("gpu_id")
        self.config = serving_config(
            read_served_config(model_dir), gpu_id, visible_gpus(), self.model_yaml_config.get("maxWorkers")
        )
        logger.info(
            "DLRM config from %s (TorchServe gpu_id %s): %s",
            os.path.join(model_dir, CONFIG_FILE), gpu_id, json.dumps(self.config),
        )  # fmt: skip
        self.model = DLRMFactory(self.config)
        logger.info("tables: %s", getattr(self.model, "table_store_entry", "built in memory (no table store)"))
        threads = serving_threads(self.model_yaml_config)
        torch.set_num_threads(threads)  # after the build: filling the tables may use them all
        logger.info("torch intra-op threads for serving: %d", threads)
        self.device = next(self.model.parameters()).device  # the dense layers' device
        if self.device.type == "cpu":  # one TBE call instead of TorchRec's one-rank dist; same scores
            self.model = optimize_for_inference(self.model)
        context.metrics.add_counter(INVALID_METRIC, 0)  # on /metrics at 0 before any bad request
        self.id_counts = served_id_counts(self.config, getattr(context, "model_name", None) or "dlrm")
        verify_entry_in_background(self.model)
        self.initialized = True

    @timed
    def preprocess(self, data: List[Any]) -> Tuple[torch.Tensor, KeyedJaggedTensor, RequestPlan]:
        """The requests of one dynamic batch -> (dense Tensor[B, N], one KJT, the plan).

        ``data`` holds TorchServe's rows, each read by ``request_body`` (``row.get("data")
        or row.get("body")``, as BaseHandler reads them); a request with an
        ``Inference-Header-Content-Length`` header is a binary one (the open inference
        protocol's binary data extension), any other is JSON. ``parse_batch`` parses each
        request alone (a bad one joins the plan as its error and adds no samples), stacks
        the good ones sample-major into one tensor each (B = all their samples) and checks
        their values at once; then the ids are turned key-major (``to_key_major_kjt``;
        ``dlrm_request``'s docstring draws one request next to the KJT it becomes).

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
        plan, dense, lengths, values = parse_batch(raw_requests(data, self.context, v2), self.config)
        kjt = to_key_major_kjt(self.config["id_list_features_keys"], lengths, values)
        metrics = self.context.metrics
        invalid = sum(isinstance(item, ValueError) for item in plan)
        if invalid:
            metrics.add_counter(INVALID_METRIC, invalid)
        add_gauge(metrics, SAMPLES_METRIC, dense.shape[0], "count")
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
        count_ids(self.id_counts, kjt, dense.shape[0])
        with torch.inference_mode():
            logits = self.model(dense.to(self.device), kjt.to(self.device))
        logits = logits.reshape(-1).float().cpu()
        self.context.metrics.add_time(INFERENCE_METRIC, (time.perf_counter() - started) * 1000)
        return logits, plan

    @timed
    def postprocess(self, output: Tuple[torch.Tensor, RequestPlan]) -> List[Any]:
        """Each request its own answer, in order (``answer_bodies``): its scores, or its
        InvalidInput error with the 4xx set on its response.

        ``response_format`` "dlrm": each answer as the JSON bytes of its body (encoded here
        with orjson: TorchServe would ``json.dumps`` each dict with indent=2; its response
        for 32 answers took 203 us instead of 511 us, and bench_serve's 32 connections got
        +8% req/s). "upstream": each answer as the dict upstream's handler returns,
        ``{"default": [logit, ...]}`` (TorchServe encodes it), so that upstream's handler
        tests, which compare ``postprocess``'s dicts, and its clients keep working.

        Under the ``kservev2`` envelope: the v2 outputs of the one request, [scores
        float32[B], probabilities float32[B]], named ``score`` and ``probability``."""
        logits, plan = output
        if under_kservev2_envelope(self.context):
            self.context.input_names = list(V2_OUTPUTS)  # the envelope's names for the outputs
            return [logits.numpy(), torch.sigmoid(logits).numpy()]
        answers = answer_bodies(plan, logits, self.config["response_format"], getattr(self.context, "model_name", None))
        encoded = [encode_answer(body) for _, body in answers]
        self._set_responses([status for status, _ in answers], [answer[1:] for answer in encoded])
        if self.config["response_format"] == "upstream":
            return [body if isinstance(body, dict) else payload for (_, body), (payload, _, _) in zip(answers, encoded)]
        return [payload for payload, _, _ in encoded]

    def _set_responses(self, statuses: List[int], headers: List[Tuple[str, Dict[str, str]]]) -> None:
        """Each response's content type, other headers (a binary answer's
        Inference-Header-Content-Length) and, for an error, status, on a context that can
        hold them (a worker's; not ``MockContext``)."""
        context = self.context
        if hasattr(context, "set_response_content_type"):
            for idx, (content_type, _) in enumerate(headers):
                context.set_response_content_type(idx, content_type)
        if hasattr(context, "set_response_header"):
            for idx, (_, extra) in enumerate(headers):
                for name, value in extra.items():
                    context.set_response_header(idx, name, value)
        if hasattr(context, "set_response_status"):
            for idx, status in enumerate(statuses):
                if status != OK:
                    context.set_response_status(status, http.HTTPStatus(status).phrase, idx)
