"""The HTTP transport: a FastAPI app over the OptimizerService, and uvicorn runners.

``create_app(service, token)`` builds the app; ``build_http_server`` /
``serve_http`` / ``HttpServerThread`` run it on uvicorn (uvloop + httptools).
"""

from adamserve.transports.http.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_BYTES,
    HttpServerThread,
    build_http_server,
    create_app,
    serve_http,
)
from adamserve.transports.http.binary import HEADER_LENGTH, TRITON_HEADER_LENGTH

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_JSON_BYTES",
    "HEADER_LENGTH",
    "TRITON_HEADER_LENGTH",
    "HttpServerThread",
    "build_http_server",
    "create_app",
    "serve_http",
]
