"""`setdiv serve INDEX`: a small HTTP API over two-stage search (the standard library's
threading HTTP server; queries are serialised through one lock, the model is not re-entrant).

    GET  /               a query page (HTML; /?q=TEXT searches on load)
    GET  /health         {"status": "ok", "items": N, "modality": ..., "export_sha256": ...}
    GET  /openapi.json   the OpenAPI 3 description of this API
    POST /search         {"text": str} | {"texts": [str]} | {"image": base64} | {"images": [...]}
                         + optional "k", "candidates"  ->  {"results": [{"query", "hits"}]}

Bad input gets a 4xx with {"error": ...}: bodies are bounded (Content-Length required), JSON is
the only format parsed, images are decoded by Pillow alone, and no input reaches anything that
executes code. A client that stalls is dropped after `TIMEOUT_S`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import torch

from setdiv.index.search import SetSearcher
from setdiv.model.encoders import IMAGE_INPUT_KIND

__all__ = ["MAX_BODY", "MAX_K", "MAX_QUERIES", "add_arguments", "make_server", "run"]

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20
"""Largest request body (bytes): a batch of a few JPEGs."""
MAX_QUERIES = 64
MAX_K = 100
MAX_CANDIDATES = 4096
MAX_TEXT = 1000
"""Characters per text query."""
TIMEOUT_S = 10.0
QUERY_KEYS = ("text", "texts", "image", "images")


class RequestError(Exception):
    """A 4xx answer: the status and what was wrong."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _int_field(body: dict, key: str, default: int, limit: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}' must be an integer in 1..{limit}")
    return value


def _queries(body: Any, modality: str) -> tuple[str, list[Any]]:
    """("text" | "image", the queries) of a request body, validated."""
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    unknown = set(body) - {*QUERY_KEYS, "k", "candidates"}
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown fields: {sorted(unknown)}")
    given = [k for k in QUERY_KEYS if k in body]
    if len(given) != 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"give exactly one of {list(QUERY_KEYS)}")
    key = given[0]
    queries = body[key] if key.endswith("s") else [body[key]]
    if not isinstance(queries, list) or not 1 <= len(queries) <= MAX_QUERIES:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}': 1..{MAX_QUERIES} queries")
    if not all(isinstance(q, str) and 0 < len(q) for q in queries):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}': non-empty strings only")
    kind = "text" if key.startswith("text") else "image"
    if kind == "text" and any(len(q) > MAX_TEXT for q in queries):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"a text query is over {MAX_TEXT} characters")
    wanted = "text" if modality == "image" else "image"
    if kind != wanted:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"this index holds {modality} items: send {wanted} queries"
        )
    return kind, queries


class Service:
    """The searcher behind the API, and the one lock its model is used under."""

    def __init__(self, searcher: SetSearcher) -> None:
        self.searcher, self.lock = searcher, threading.Lock()

    def health(self) -> dict[str, Any]:
        meta = self.searcher.store.meta
        return {
            "status": "ok",
            "items": len(self.searcher.store),
            "modality": meta.modality,
            "export_sha256": meta.export_sha256,
            "ann": meta.ann.factory(),
        }

    def _images(self, blobs: list[str]) -> torch.Tensor:
        cfg = self.searcher.exported.cfg
        if IMAGE_INPUT_KIND[cfg.model.image.name] != "image":
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"this index's model ({cfg.model.image.name}) reads region features, not images",
            )
        from setdiv.data.samples import image_file_pixels

        pixels = []
        for i, blob in enumerate(blobs):
            try:
                data = base64.b64decode(blob, validate=True)
                pixels.append(
                    image_file_pixels(
                        io.BytesIO(data), cfg.data.image_size, cfg.data.image_transform
                    )
                )
            except (binascii.Error, ValueError) as exc:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"image {i}: {exc}") from None
        return torch.cat(pixels)

    def search(self, body: Any) -> dict[str, Any]:
        kind, queries = _queries(body, self.searcher.modality)
        k = _int_field(body, "k", 10, MAX_K)
        candidates = _int_field(body, "candidates", 64, MAX_CANDIDATES)
        with self.lock:
            if kind == "text":
                try:
                    sets = self.searcher.encode_texts(queries)
                except ValueError as exc:  # e.g. nothing left after tokenisation
                    raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None
            else:
                sets = self.searcher.encode_images(self._images(queries))
            hits = self.searcher.search(sets, k, candidates)
        return {
            "results": [
                {
                    "query": q if kind == "text" else f"image {i}",
                    "hits": self.searcher.describe(hits, i),
                }
                for i, q in enumerate(queries)
            ]
        }


def openapi() -> dict[str, Any]:
    query = {
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": MAX_TEXT},
            "texts": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_QUERIES},
            "image": {"type": "string", "format": "byte"},
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
            "candidates": {"type": "integer", "minimum": 1, "maximum": MAX_CANDIDATES},
        },
        "additionalProperties": False,
    }
    error = {"description": "bad request", "content": {"application/json": {}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "setdiv search", "version": "1"},
        "paths": {
            "/health": {"get": {"responses": {"200": {"description": "index summary"}}}},
            "/search": {
                "post": {
                    "requestBody": {"content": {"application/json": {"schema": query}}},
                    "responses": {
                        "200": {"description": "hits per query, best first"},
                        "400": error, "411": error, "413": error, "415": error,
                    },
                }
            },
        },
    }  # fmt: skip


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>setdiv search</title>
<style>body{font:15px sans-serif;max-width:50em;margin:2em auto}li{margin:.4em 0}
.s{color:#888;font-family:monospace}</style></head><body>
<h1>setdiv search</h1><form id="f"><input id="q" size="50" placeholder="a red circle" autofocus>
<button>search</button></form><p id="info"></p><ol id="hits"></ol><script>
fetch('/health').then(r => r.json()).then(h => {
  document.getElementById('info').textContent = h.items + ' ' + h.modality + ' items, ' + h.ann; });
const form = document.getElementById('f');
form.onsubmit = async e => {
  if (e) e.preventDefault();
  const r = await fetch('/search', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({text: document.getElementById('q').value, k: 10})});
  const out = document.getElementById('hits'); out.replaceChildren();
  const data = await r.json();
  if (!r.ok) { out.textContent = data.error; return; }
  for (const h of data.results[0].hits) {
    const li = document.createElement('li'); const s = document.createElement('span');
    s.className = 's'; s.textContent = h.score.toFixed(4) + ' ' + h.id + ' ';
    li.append(s, (h.captions || [h.text]).join(' | ')); out.append(li); }
};
const q = new URLSearchParams(location.search).get('q');  // /?q=...: search on load
if (q) { document.getElementById('q').value = q; form.onsubmit(); }
</script></body></html>"""


class _Handler(BaseHTTPRequestHandler):
    """HTTP over a `Service`: GET the page, /health, /openapi.json; POST /search."""

    service: Service  # bound per server by `make_server`
    timeout = TIMEOUT_S  # a stalled client is dropped
    server_version = "setdiv"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        path = urlsplit(self.path).path
        if path == "/health":
            self._json(HTTPStatus.OK, self.service.health())
        elif path == "/openapi.json":
            self._json(HTTPStatus.OK, openapi())
        elif path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            if self.path != "/search":
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such path: {self.path}")
            self._json(HTTPStatus.OK, self.service.search(self._body()))
        except RequestError as exc:
            self.close_connection = True
            self._json(exc.status, {"error": str(exc)})
        except Exception:  # a bug: logged with its traceback, the client gets a 500
            log.exception("search failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def _body(self) -> Any:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required")
        if int(length) > MAX_BODY:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"bodies are limited to {MAX_BODY} bytes"
            )
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is shorter than announced")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"not JSON: {exc}") from None

    def _unsupported(self) -> None:
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "GET or POST only"})

    do_PUT = do_DELETE = do_PATCH = _unsupported  # noqa: N815


def make_server(service: Service, host: str, port: int) -> ThreadingHTTPServer:
    """A server bound to (host, port) (port 0: any free one); `serve_forever()` runs it."""
    handler = type("Handler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index directory (`setdiv index build`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    p.add_argument("--export", default=None, help="the export (default: the one the index names)")


def run(args: argparse.Namespace) -> int:
    service = Service(SetSearcher(args.index, args.export))
    server = make_server(service, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.index} ({len(service.searcher.store)} items) on http://{host}:{port}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
