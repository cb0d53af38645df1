"""A loopback upstream that speaks Anthropic's Messages API (`/v1/messages`,
`/v1/messages/count_tokens`) and OpenAI's Responses API (`/v1/responses`, and Azure's
`/openai/responses`) as their documentation shows them, plain and streamed, with fixed usage
(cache classes included). Every request it gets is kept for the tests to inspect."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = "Hello from the loopback upstream."
# Anthropic: `input_tokens` leaves out the cache reads and writes.
ANTHROPIC_USAGE = {
    "input_tokens": 21,
    "output_tokens": 9,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 2000,
}
# Responses: `input_tokens` includes the cached ones.
RESPONSES_USAGE = {
    "input_tokens": 1500,
    "input_tokens_details": {"cached_tokens": 1024},
    "output_tokens": 40,
    "output_tokens_details": {"reasoning_tokens": 16},
    "total_tokens": 1540,
}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class Upstream:
    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with upstream.lock:
                    upstream.requests.append(
                        {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                    )
                path = self.path.split("?")[0]
                if path == "/v1/messages/count_tokens":
                    self.json(200, {"input_tokens": 42})
                elif path == "/v1/messages":
                    if body.get("stream"):
                        self.stream(anthropic_events(body))
                    else:
                        self.json(200, anthropic_message(body))
                elif path in ("/v1/responses", "/openai/responses"):
                    if body.get("stream"):
                        self.stream(responses_events(body))
                    else:
                        self.json(200, response_object(body))
                else:
                    self.json(404, {"error": {"message": f"no route {self.path}"}})

            def stored(self, deleted: bool):
                with upstream.lock:
                    upstream.requests.append(
                        {"path": self.path, "method": self.command, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": None}
                    )
                path = self.path.split("?")[0]
                response_id = path.rsplit("/", 1)[-1]
                if not path.startswith(("/v1/responses/", "/openai/responses/")):
                    self.json(404, {"error": {"message": f"no route {self.path}"}})
                elif deleted:
                    self.json(200, {"id": response_id, "object": "response", "deleted": True})
                else:
                    self.json(200, dict(response_object({"model": "gpt-4.1"}), id=response_id))

            def do_GET(self):
                self.stored(deleted=False)

            def do_DELETE(self):
                self.stored(deleted=True)

            def json(self, status: int, data: dict):
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def stream(self, events: list[bytes]):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for event in events:
                    self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def last(self, path_prefix: str) -> dict:
        with self.lock:
            return [r for r in self.requests if r["path"].startswith(path_prefix)][-1]

    def close(self):
        self.server.shutdown()


TOOL_INPUT = {"city": "Paris"}
TOOL = "get_weather"


def calls_tool(body: dict) -> bool:
    """Offered the weather tool, the model calls it (other clients' tools, Claude Code's, are not called)."""
    return any(t.get("name") == TOOL for t in body.get("tools") or [])


def anthropic_message(body: dict) -> dict:
    if calls_tool(body):
        content = [{"type": "tool_use", "id": "toolu_01A", "name": TOOL, "input": TOOL_INPUT}]
        return dict(anthropic_text_message(body), content=content, stop_reason="tool_use")
    return anthropic_text_message(body)


def anthropic_text_message(body: dict) -> dict:
    return {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": body["model"] + "-20250929",
        "content": [{"type": "text", "text": ANSWER}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE,
    }


def anthropic_events(body: dict) -> list[bytes]:
    start_usage = dict(ANTHROPIC_USAGE, output_tokens=1)
    message = dict(anthropic_message(body), content=[], stop_reason=None, usage=start_usage)
    words = ANSWER.split(" ")
    events = [
        sse("message_start", {"type": "message_start", "message": message}),
        sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("ping", {"type": "ping"}),
    ]
    stop_reason = "end_turn"
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        events.append(
            sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
        )
    events.append(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if calls_tool(body):
        stop_reason = "tool_use"
        block = {"type": "tool_use", "id": "toolu_01A", "name": TOOL, "input": {}}
        raw = json.dumps(TOOL_INPUT)
        events += [
            sse("content_block_start", {"type": "content_block_start", "index": 1, "content_block": block}),
            sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": raw[:5]}}),
            sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": raw[5:]}}),
            sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ]
    events += [
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return events


def response_object(body: dict, status: str = "completed", usage: dict | None = RESPONSES_USAGE) -> dict:
    output = (
        [
            {
                "type": "message",
                "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e6",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": ANSWER, "annotations": []}],
            }
        ]
        if status == "completed"
        else []
    )
    return {
        "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        "object": "response",
        "created_at": 1741476542,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": body.get("model", "") + "-2025-04-14",
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": body.get("user"),
        "metadata": {},
    }


def responses_events(body: dict) -> list[bytes]:
    pending = response_object(body, status="in_progress", usage=None)
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    events = [
        ("response.created", {"type": "response.created", "response": pending}),
        ("response.in_progress", {"type": "response.in_progress", "response": pending}),
        ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": item}),
        (
            "response.content_part.added",
            {
                "type": "response.content_part.added",
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        ),
    ]
    for word in ANSWER.split(" "):
        events.append(
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": word + " ",
                    "logprobs": [],
                },
            )
        )
    events.append(("response.completed", {"type": "response.completed", "response": response_object(body)}))
    return [sse(name, dict(data, sequence_number=i)) for i, (name, data) in enumerate(events)]
