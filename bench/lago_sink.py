#!/usr/bin/env python3
"""A small Python stand-in for Lago's batch endpoint, for bench/ship.sh (not a test).

It costs what a small Python web server costs: the standard library's threading HTTP/1.1 server,
`json` to read each batch and to write Lago's answer (every event echoed back with a `lago_id`,
as Lago's `POST /api/v1/events/batch` does). It keeps no store and does not dedupe; it counts the
events it acknowledged and the CPU it has spent, which the benchmark reads from GET /count, and
knows every subscription (GET /api/v1/subscriptions/ID).

It turns Nagle's algorithm off, as Python's asyncio servers (uvicorn) do for every connection: the
standard library's handler writes an answer's headers and body in two sends, and with Nagle on,
the body waits for the client's delayed ACK of the headers (about 40 ms on Linux). That stall,
not CPU, would cap any client at one batch per 40 ms per connection.

    bench/lago_sink.py PORT_FILE      # listens on a free loopback port, writes it to PORT_FILE
"""
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNT = 0
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/count":
            with LOCK:
                self._answer(200, {"events": COUNT, "cpu_secs": time.process_time()})
        elif self.path.startswith("/api/v1/subscriptions/"):
            # Every subscription exists here: the shipper's check stays quiet.
            external_id = self.path.rsplit("/", 1)[1]
            self._answer(200, {"subscription": {"external_id": external_id, "status": "active"}})
        else:
            self._answer(404, {"status": 404, "error": "Not Found", "code": "not_found"})

    def do_POST(self):
        global COUNT
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != "/api/v1/events/batch":
            self._answer(404, {"status": 404, "error": "Not Found", "code": "not_found"})
            return
        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            self._answer(401, {"status": 401, "error": "Unauthorized"})
            return
        events = json.loads(raw)["events"]
        out = []
        for e in events:
            e = dict(e)
            e["lago_id"] = str(uuid.uuid4())
            e["lago_customer_id"] = None
            out.append(e)
        with LOCK:
            COUNT += len(events)
        self._answer(200, {"events": out})


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
