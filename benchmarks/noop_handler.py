"""A do-nothing TorchServe handler: the floor that ``bench_serve.py`` measures the DLRM
handler against.

It answers every request of a batch with the same constant JSON, already encoded, without
reading the request: what remains is TorchServe's own cost per request (HTTP in the Java
frontend, batching, the socket to the Python worker, TorchServe's decoding of the body).
A module-level ``handle`` (TorchServe's function entry point) skips even ``BaseHandler``'s
bookkeeping, so this is the cheapest handler TorchServe can run.
"""

from typing import Any, List, Optional

ANSWER = b'{"score": 0.0, "probability": 0.5}'


def handle(data: Optional[List[Any]], context: Any) -> Optional[List[bytes]]:
    """``data`` is None once, when the worker loads the model; then one answer per request."""
    if data is None:
        return None
    return [ANSWER] * len(data)
