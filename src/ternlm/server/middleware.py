"""Plain ASGI middleware (no response buffering, so streams and client disconnects pass straight through)."""

from __future__ import annotations

from .metrics import ServerMetrics
from .schemas import ErrorDetail, ErrorResponse


class BodySizeLimit:
    """Answers 413 to a request body over `max_bytes` before anything parses it. A body without a
    Content-Length (chunked) is read here up to the limit and handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay():
            nonlocal body_sent
            if body_sent:
                return await receive()  # from now on: the client's disconnect, when it comes
            body_sent = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        await send_error(send, 413, f"the request body is larger than {self.max_bytes} bytes", "invalid_request_error",
                         "request_too_large", [(b"connection", b"close")])


class RequestLimit:
    """Answers 503 (OpenAI's error JSON, with Retry-After) to a request arriving while `max_requests`
    others are in progress, /health and /metrics excepted so that a saturated server can still be
    watched. It stands where uvicorn's own limit would, whose 503 is plain text, and like it counts
    requests before any API key is checked."""

    UNLIMITED = frozenset({"/health", "/metrics"})

    def __init__(self, app, max_requests: int):
        self.app, self.max_requests, self.in_progress = app, max_requests, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.UNLIMITED:
            return await self.app(scope, receive, send)
        if self.in_progress >= self.max_requests:
            return await send_error(send, 503, f"the server has {self.in_progress} requests in progress, its limit; "
                                               "retry later", "server_error", "server_overloaded",
                                    [(b"retry-after", b"1"), (b"connection", b"close")])
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


async def send_error(send, status: int, message: str, error_type: str, code: str, headers: list) -> None:
    body = ErrorResponse(error=ErrorDetail(message=message, type=error_type, code=code)).model_dump_json().encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class CountResponses:
    """Counts every response by path (the app's own paths; anything else is "other") and status."""

    def __init__(self, app, metrics: ServerMetrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
