"""`setdiv serve INDEX`: an HTTP API over the index on FastAPI + uvicorn.

    GET  /               a query page (HTML; /?q=TEXT searches on load), thumbnails for images
    GET  /health         {"status": "ok", "items": N, "modality": ..., "export_sha256": ...}
    GET  /image/{id}     a JPEG thumbnail of the gallery item with that id (404 if none)
    GET  /image/at/{n}   the same for the item at position n (`index` in hits; picture URLs)
    GET  /openapi.json   the OpenAPI document, generated from the request model below
    POST /search         `SearchRequest` -> {"results": [{"query", "scored", "hits"}]}

Every error is {"error": ...} (with pydantic's "detail" for invalid fields), a 4xx for bad
input: the request model forbids unknown fields and bounds every list, string and number;
bodies are bounded and need a Content-Length or chunked encoding; query images are bounded in
pixels each, per request (413 beyond) and being decoded at once per process (503 if no share
frees up in time; `setdiv.index.service`); a request has `DEADLINE_S` in all (408 if the
client is still sending, 503 if the answer is not ready) and at most `MAX_IN_FLIGHT` are in
the server at once (503 and Retry-After beyond); a connection that sends no complete request
head within `HEAD_TIMEOUT_S` is closed. Log lines escape what clients sent. The
transport-level checks are `setdiv.index.guard`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from setdiv.errors import UserError
from setdiv.index.guard import (
    DEADLINE_KEY,
    DEADLINE_S,
    MAX_BODY,
    MAX_IN_FLIGHT,
    Guard,
    HeadTimeoutH11,
    error_response,
    escape,
)
from setdiv.index.page import page_html
from setdiv.index.search import AUTO
from setdiv.index.service import (
    LARGE_IMAGE,
    MAX_PIXELS,
    MAX_REQUEST_PIXELS,
    DecodeBusyError,
    Service,
    TooManyPixelsError,
)
from setdiv.index.sharded import ShardUnavailableError, open_searcher

__all__ = ["Guard", "SearchRequest", "add_arguments", "app_from_env", "create_app", "run"]

log = logging.getLogger(__name__)

MAX_QUERIES = 64
MAX_IMAGES = 8
MAX_IMAGE_B64 = MAX_BODY
MAX_K = 100
MAX_CANDIDATES = 4096
MAX_TEXT = 1000
"""Characters per text query."""
QUERY_KEYS = ("text", "texts", "image", "images")

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Image64 = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_B64)]


class SearchRequest(BaseModel):
    """Exactly one of `text`, `texts` (image galleries), `image`, `images` (base64 JPEG /
    PNG / WebP; text galleries), with optional `k` and `candidates`."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"oneOf": [{"required": [key]} for key in QUERY_KEYS]},
    )

    text: Text | None = None
    texts: Annotated[list[Text], Field(min_length=1, max_length=MAX_QUERIES)] | None = None
    image: Image64 | None = None
    images: Annotated[list[Image64], Field(min_length=1, max_length=MAX_IMAGES)] | None = None
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 10
    candidates: Literal["auto"] | Annotated[int, Field(ge=1, le=MAX_CANDIDATES)] = AUTO

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchRequest:
        given = [key for key in QUERY_KEYS if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(QUERY_KEYS)}, got {given}")
        return self

    def queries(self) -> tuple[str, list[str]]:
        """("text" | "image", the queries)."""
        key = next(key for key in QUERY_KEYS if getattr(self, key) is not None)
        value = getattr(self, key)
        return ("text" if key.startswith("text") else "image"), (
            value if isinstance(value, list) else [value]
        )


def create_app(service: Service, allowed_hosts: set[str] | None = None) -> FastAPI:
    """The FastAPI app over `service` (`allowed_hosts`: Host header names accepted; None:
    any)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # after uvicorn has let in-flight requests finish

    app = FastAPI(
        title="setdiv search",
        version="2",
        description=(
            f"Set-based image-text search. Request bodies are limited to {MAX_BODY} bytes and "
            f"need a Content-Length (or chunked encoding); a request has {DEADLINE_S:.0f} s in "
            f"all; at most {MAX_IN_FLIGHT} are in the server at once (503 beyond). Query images: "
            f"at most {MAX_PIXELS} pixels each and {MAX_REQUEST_PIXELS} per request (413 "
            f"beyond, checked before decoding); a server process decodes one image of over "
            f"{LARGE_IMAGE} pixels and one smaller image at a time, and an image waits for its "
            'turn until the deadline (503). Every error is {"error": message}.'
        ),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts = [f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in errors]
        detail = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in errors]
        return error_response(400, "; ".join(parts)[:2000], detail=detail)

    @app.exception_handler(HTTPException)  # Starlette's and FastAPI's (405, a body not read)
    async def httperror_response(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)  # a bug: the same shape (its traceback goes to the log)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error ({type(exc).__name__})")

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> JSONResponse:
        return error_response(404, f"no such path: {escape(request.url.path)}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    html = page_html((MAX_BODY - 64) // 4 * 3, MAX_PIXELS)  # a file whose base64 fits a body

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    jpeg: dict[int | str, dict[str, Any]] = {
        200: {"content": {"image/jpeg": {}}},
        404: {"description": "no such item, or no picture"},
    }

    @app.get("/image/at/{position}", responses=jpeg)
    async def image_at(position: str) -> Response:
        """The picture of the item at `position` (0-based: `index` in hits)."""
        digits = position.isascii() and position.isdigit() and len(position) < 19
        return await _thumbnail(service.picture_at, int(position) if digits else -1)

    @app.get("/image/{item}", responses=jpeg)
    async def image(item: str) -> Response:
        """The picture of the item whose id is `item` (compared as text, never a position)."""
        return await _thumbnail(service.picture, item)

    for path, endpoint in (
        ("/health", health), ("/", page), ("/image/at/{position}", image_at),
        ("/image/{item}", image),
    ):  # fmt: skip
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.post("/search", responses={400: {}, 408: {}, 411: {}, 413: {}, 415: {}, 503: {}})
    async def search(body: SearchRequest, request: Request) -> dict[str, Any]:
        kind, queries = body.queries()
        wanted = "text" if service.modality == "image" else "image"
        if kind != wanted:
            return error_response(
                400, f"this index holds {service.modality} items: send {wanted} queries"
            )
        try:
            if kind == "text":
                if any(not q.strip() for q in queries):
                    raise UserError("an empty text query")
                payload: Any = queries
            else:  # an image waits for its decoding lane until a second before the deadline
                until = request.scope.get(DEADLINE_KEY, time.monotonic() + DEADLINE_S) - 1.0
                payload = await run_in_threadpool(
                    lambda: service.decode_images(_b64(queries), until)
                )
            hits = await asyncio.wrap_future(service.submit(kind, payload, body.k, body.candidates))
        except TooManyPixelsError as exc:
            return error_response(413, str(exc))
        except (DecodeBusyError, ShardUnavailableError) as exc:
            return error_response(503, str(exc), headers={"Retry-After": "1"})
        except (UserError, ValueError) as exc:
            return error_response(400, str(exc))
        return {
            "results": [
                {
                    "query": q if kind == "text" else f"image {i}",
                    "scored": hits.candidates[i],
                    "hits": service.describe(hits, i),
                }
                for i, q in enumerate(queries)
            ]
        }

    return app


async def _thumbnail(picture: Any, key: str | int) -> Response:
    """`picture(key)`'s JPEG bytes, or a 404 saying why there are none."""
    try:
        data = await run_in_threadpool(picture, key)
    except (LookupError, UserError) as exc:
        return error_response(404, str(exc))
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _b64(blobs: list[str]) -> list[bytes]:
    out = []
    for i, blob in enumerate(blobs):
        try:
            out.append(base64.b64decode(blob, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise UserError(f"image {i}: not base64 ({exc})") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index directory (`setdiv index build`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free one, 1 worker)")
    p.add_argument("--export", default=None, help="the export (default: the one the index names)")
    p.add_argument(
        "--workers", type=int, default=1, help="server processes over the one memory-mapped index"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each worker's math (torch, FAISS); more cores: more --workers",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        help="a Host header name to accept (repeatable; default: localhost names and --host; "
        "'*': any)",
    )
    p.add_argument(
        "--ray", action="store_true",
        help="INDEX holds index shards (shard-*/): deploy one Ray Serve replica per shard and "
        "route queries to them from this process (docs/search.md)",
    )  # fmt: skip
    p.add_argument("--address", default=None, help="--ray: the Ray cluster (default: local)")
    p.add_argument(
        "--shard-cpus", type=float, default=1.0, help="--ray: CPUs each shard replica asks for"
    )


ENV = "SETDIV_SERVE"


def app_from_env() -> FastAPI:
    """The app of one worker process: `ENV` holds the index, export and allowed hosts."""
    from PIL import Image

    opts = json.loads(os.environ[ENV])
    set_threads(opts["threads"])
    # Decoded images in blocks over glibc's largest mmap threshold (32 MB): a large query
    # image's memory goes back to the system when it is freed, not into a thread's heap.
    Image.core.set_block_size(64 << 20)
    service = Service(open_searcher(opts["index"], opts["export"]))
    hosts = None if opts["hosts"] is None else set(opts["hosts"])
    return Guard(create_app(service, hosts), hosts)  # type: ignore[return-value]


def set_threads(n: int) -> None:
    """`n` intra-op threads for torch and FAISS in this process. One by default: the model
    thread batches concurrent queries, so throughput comes from batching and from workers,
    and OpenMP threads spinning for a core on a busy machine slowed the server thirtyfold
    (BENCHMARKS.md, "The search service under load")."""
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def allowed_hosts(args: argparse.Namespace) -> list[str] | None:
    if args.allowed_host and "*" in args.allowed_host:
        return None
    return sorted({"localhost", "127.0.0.1", "::1", args.host, *(args.allowed_host or [])})


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT / SIGTERM; in-flight requests finish first (uvicorn's graceful
    shutdown)."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    import uvicorn

    if args.workers < 1:
        raise UserError("--workers must be >= 1")
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    if args.workers > 1 and args.port == 0:
        raise UserError("--workers > 1 needs a fixed --port")
    if args.ray:
        return _run_on_ray(args, uvicorn)
    open_searcher(args.index, args.export)  # fails here, in one line, before any worker starts
    os.environ[ENV] = json.dumps(
        {
            "index": args.index,
            "export": args.export,
            "hosts": allowed_hosts(args),
            "threads": args.threads,
        }
    )
    print(f"serving {args.index} on http://{args.host}:{args.port}/ ({args.workers} worker(s))")
    uvicorn.run(
        "setdiv.index.serve:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        http=HeadTimeoutH11,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=DEADLINE_S,
    )
    return 0


def _run_on_ray(args: argparse.Namespace, uvicorn: Any) -> int:
    """`--ray`: the shards on Ray Serve, this process the router (one uvicorn worker: the
    Serve handles live here)."""
    from setdiv.index.serve_ray import sharded_searcher

    if args.workers != 1:
        raise UserError("--ray serves from one router process: drop --workers")
    set_threads(args.threads)
    service = Service(sharded_searcher(args.index, args.export, args.address, args.shard_cpus))
    named = allowed_hosts(args)
    hosts = None if named is None else set(named)
    app = Guard(create_app(service, hosts), hosts)
    print(f"serving {args.index} on http://{args.host}:{args.port}/ (Ray Serve shards)")
    uvicorn.run(
        app, host=args.host, port=args.port, http=HeadTimeoutH11, access_log=False,
        log_level="info", timeout_graceful_shutdown=DEADLINE_S,
    )  # fmt: skip
    return 0
