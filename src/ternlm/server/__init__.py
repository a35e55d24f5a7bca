"""`ternlm serve`: an OpenAI-compatible HTTP API with continuous batching, and a chat page.

    app.py        routes, errors, OpenAI's response shapes, streaming
    schemas.py    request and response bodies (pydantic; they make the OpenAPI document)
    scheduler.py  continuous batching over the engine's batched step
    metrics.py    what /metrics reports
    middleware.py request body limit, response counts
    ray_deploy.py `ternlm serve --ray`: the same app as Ray Serve replicas (the `ray` extra)
    static/       the chat page (plain HTML, CSS and JavaScript)

Needs the `serve` extra: pip install "ternlm[serve]".
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from ..api import LanguageModel
from .app import ServerOptions, create_app

__all__ = ["ServerOptions", "create_app", "serve", "serving_in_thread"]


def serve(model: LanguageModel, model_id: str, options: ServerOptions, host: str = "127.0.0.1", port: int = 8000,
          access_log: bool = False) -> None:
    """Runs until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, model_id, options), host=host, port=port, access_log=access_log, log_level="info")


@contextmanager
def serving_in_thread(app, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Runs `app` on a free port in a background thread (for tests and benchmarks); yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
