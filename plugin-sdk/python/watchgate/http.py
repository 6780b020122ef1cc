"""Outbound HTTP to the hosts the operator granted (``[grants] http``).

:func:`send` queues the request and returns its id at once; the host sends
it in the background with a timeout and retries. The plugin never sees the
response."""

import json as _json
from typing import Any, Iterable, Optional, Tuple, Union

from wit_world.imports import http as _host

from . import _call

__all__ = ["send", "post_json"]


def send(
    method: str,
    url: str,
    headers: Iterable[Tuple[str, str]] = (),
    body: Optional[Union[bytes, str]] = None,
) -> int:
    """Queue a request; returns the id the gateway logs it under.
    Raises :class:`watchgate.HostError` when the host is not granted, the
    request is malformed or too many requests are in flight."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    request = _host.Request(method=method, url=url, headers=list(headers), body=body)
    return _call(_host.send, request)


def post_json(url: str, document: Any, headers: Iterable[Tuple[str, str]] = ()) -> int:
    """Queue a ``POST`` of ``document``: bytes/str as given, anything else
    encoded with :func:`json.dumps`."""
    if isinstance(document, (bytes, str)):
        body = document
    else:
        body = _json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return send("POST", url, [("content-type", "application/json"), *headers], body)
