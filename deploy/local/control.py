"""The launcher's control endpoint: a small JSON API on loopback.

    GET  /v1/pools                 targets and workers (with their states) per pool
    PUT  /v1/pools/{role}          {"replicas": N}: resize a pool (answers at once, 202)
    POST /v1/discovery/sync        the router's discovery: {"applied": version,
                                   "in_flight": {address: n}} -> {"version", "members"}

`pdserve scale` and the autoscaler's local scaler use the first two; the router's
launcher discovery (router/discovery/launcher.py) uses the third. It binds 127.0.0.1
only: whoever can reach it can resize the cluster.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pdserve.config import Role
from pdserve.deploy.local.pools import Pools
from pdserve.errors import ConfigError

POOLS_PATH = "/v1/pools"
SYNC_PATH = "/v1/discovery/sync"
MAX_BODY_BYTES = 1 << 20


def serve_control(host: str, port: int, pools: Pools) -> ThreadingHTTPServer:
    """Serve the control API for ``pools`` from a daemon thread; ``shutdown()`` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") != POOLS_PATH:
                self._reply(404, {"error": f"no such path {self.path}"})
                return
            self._reply(200, pools.describe())

        def do_PUT(self) -> None:
            prefix = POOLS_PATH + "/"
            if not self.path.startswith(prefix):
                self._reply(404, {"error": f"no such path {self.path}"})
                return
            try:
                role = Role(self.path[len(prefix) :].rstrip("/"))
                body = self._body()
                replicas = body.get("replicas")
                if not isinstance(replicas, int) or isinstance(replicas, bool):
                    raise ConfigError("give {'replicas': <integer>}")
                pools.set_target(role, replicas)
            except ValueError:
                self._reply(404, {"error": f"no pool {self.path[len(prefix) :]!r}"})
                return
            except ConfigError as e:
                self._reply(400, {"error": e.message})
                return
            self._reply(202, pools.describe())

        def do_POST(self) -> None:
            if self.path.rstrip("/") != SYNC_PATH:
                self._reply(404, {"error": f"no such path {self.path}"})
                return
            try:
                body = self._body()
                applied = body.get("applied", 0)
                in_flight = body.get("in_flight", {})
                if not isinstance(applied, int) or not isinstance(in_flight, dict):
                    raise ConfigError("give {'applied': int, 'in_flight': {address: int}}")
                counts = {str(k): int(v) for k, v in in_flight.items()}
            except (ConfigError, TypeError, ValueError) as e:
                message = e.message if isinstance(e, ConfigError) else str(e)
                self._reply(400, {"error": message})
                return
            self._reply(200, pools.sync(applied, counts))

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise ConfigError("body too large")
            try:
                doc = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as e:
                raise ConfigError(f"invalid JSON: {e}") from e
            if not isinstance(doc, dict):
                raise ConfigError("the body must be a JSON object")
            return doc

        def _reply(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the router syncs twice a second

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="launcher-control", daemon=True).start()
    return server
