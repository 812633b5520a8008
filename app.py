"""Cortex chat server: the web page, the original /api/chat stream and an OpenAI-compatible API, over one batching engine.

    python3 app.py                                  # ./dpo.bin (downloaded from ModelScope when missing) on 127.0.0.1:8080
    python3 app.py --checkpoint runs/mix            # a stage run dir (its tokenizer is taken from its stage.json)
    python3 app.py --checkpoint my.safetensors --tokenizer tokens --device cuda --dtype bfloat16 --port 8000
    python3 app.py --allow-origin http://localhost:3000   # let that site's pages call the API (CORS)

Endpoints
    GET  /                      the chat page (static/)
    POST /api/chat              the original request fields; SSE `data: {"event": "thinking_chunk"|"answer_chunk"|"error"
                                |"done", "data": ...}` (done carries finish_reason and usage)
    POST /v1/chat/completions   OpenAI chat completions, streamed or not (reasoning_content = thinking)
    POST /v1/completions        OpenAI (legacy) completions on raw text or token ids: echo, logprobs (lm-eval)
    GET  /v1/models[/ID]        the served model
    GET  /tokenizer_info, POST /tokenize, POST /detokenize   the tokenizer (vLLM's endpoints, for lm-eval)
    GET  /health, GET /stats    liveness, model name, size and context; queue, tokens/s, time to first token and
                                prompt tokens reused (prefix reuse)
Errors are JSON with a 4xx/5xx status: {"event": "error", "data": message} under /api, OpenAI's {"error": {...}} under /v1.

Other web sites: a request with an Origin header (a browser sends it from pages of other sites) is refused with 403
unless it is the server's own origin or allowed with --allow-origin; POST bodies must be application/json (a browser
sends text/plain across sites without asking first). When the server listens on a loopback address, requests must
name a loopback host (localhost, 127.0.0.1, [::1]): a rebound DNS name of an attacker's site gets 403.
HTTP/1.1 with keep-alive: API clients reuse their connection. A client that closes its connection ends its request
(frees its slot or queue place) within a fraction of a second, streamed or not (ClientConnection).
"""

import argparse
import ipaddress
import itertools
import json
import logging
import select
import socket
import sys
import time
import urllib.parse
from pathlib import Path

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wsgi import LimitedStream

from model import count_parameters
from serving.chat import ChatRequest, ReplyPiece, RequestError, build_prompt, parse_web_request, stream_reply
from serving.checkpoint import DTYPES, QUANTIZE, CheckpointError, load_for_serving
from serving.completions import (collect_choice, completion_body, detokenize, generation_requests,
                                 parse_completion_request, tokenize, tokenizer_info)
from serving.engine import Engine, GenerationRequest, QueueFullError
from serving.openai_api import (Completion, check_model, error_body, model_card, models_list, parse_openai_request,
                                stop_answer_at, usage)
from trainer.tokenizer import Tokenizer, TokenizerFilesError

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1 << 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
INTERNAL_ERROR = "internal server error (the details are in the server log)"
CLIENT_ENVIRON_KEY = "cortex.client"  # the request's ClientConnection (our server's handler puts it there)

log = logging.getLogger("cortex.app")


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, *, allow_origins: tuple[str, ...] = (),
               loopback_only: bool = True) -> Flask:
    """allow_origins: web sites (scheme://host[:port], or "*" for any) whose pages may call the server besides its own
    page. loopback_only: accept only requests that name a loopback host (the server listens on a loopback address)."""
    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    started = int(time.time())
    parameters = count_parameters(engine.model.config)  # shown on the page's welcome text

    def submit(chat: ChatRequest) -> GenerationRequest:
        prompt_ids, dropped = build_prompt(tokenizer, chat.messages, chat.thinking, engine.max_context)
        if dropped:
            log.info("dropped the %d oldest messages to fit the context", dropped)
        return submit_generation(GenerationRequest(prompt_ids, chat.sampling, chat.thinking, chat.think_budget,
                                                   client_connection().gone))

    def submit_generation(generation: GenerationRequest) -> GenerationRequest:
        try:
            return engine.submit(generation)
        except QueueFullError as err:
            raise RequestError(str(err), status=503) from None

    def other_site() -> str | None:
        """The Origin of a request from another site's page (None from our own page and from non-browser clients)."""
        origin = request.headers.get("Origin")
        return None if origin is None or origin == f"{request.scheme}://{request.host}" else origin

    def allowed(origin: str) -> bool:
        return origin in allow_origins or "*" in allow_origins

    @app.before_request
    def check_host_and_origin():
        if loopback_only and not is_loopback(host_name(request.host)):
            raise RequestError(f"the Host header {request.host!r} is not a loopback name: this server listens on a "
                               f"loopback address and answers only requests for localhost, 127.0.0.1 or [::1] (a guard "
                               f"against DNS rebinding); to serve other names, listen on another address with --host",
                               status=403)
        origin = other_site()
        if origin is not None and not allowed(origin):
            raise RequestError(f"requests from pages of {origin} are not allowed: only this server's own page may call "
                               f"it; start the server with --allow-origin {origin} to allow that site", status=403)

    @app.after_request
    def cors(response):
        if allow_origins:
            response.vary.add("Origin")
        origin = other_site()
        if origin is not None and allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = "POST, GET, OPTIONS"
            # what the preflight asks for (the openai JavaScript client sends x-stainless-* headers too)
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Content-Type, Authorization")
        return response

    @app.errorhandler(RequestError)
    def request_error(err: RequestError):
        return error_response(err.status, err.message, err.param, err.code)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        message = {413: f"the request body is larger than {MAX_BODY_BYTES} bytes"}.get(err.code, err.description)
        response = error_response(err.code, message)
        for name, value in err.get_headers():  # e.g. a 405's Allow
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected_error(err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, INTERNAL_ERROR)

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    @app.post("/api/chat")
    def api_chat():
        generation = submit(parse_web_request(json_body(), engine.max_context))
        pieces = stream_reply(generation, tokenizer, client_connection().check)

        def events():
            for item in pieces:
                if isinstance(item, ReplyPiece):
                    yield sse({"event": f"{item.kind}_chunk", "data": item.text})
                elif item.reason == "error":
                    yield sse({"event": "error", "data": "generation failed: " + INTERNAL_ERROR})
                else:
                    yield sse({"event": "done", "data": {"finish_reason": item.reason, "usage": usage(item)}})

        return Response(events(), mimetype="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    def chat_completions():
        body = json_body()
        check_model(body, model_name)
        chat, stream, include_usage = parse_openai_request(body, engine.max_context)
        generation = submit(chat)
        pieces = stream_reply(generation, tokenizer, client_connection().check)
        if chat.sampling.stop:
            pieces = stop_answer_at(pieces, generation, chat.sampling.stop)
        completion = Completion(model_name)
        if not stream:
            texts, finished = {"thinking": [], "answer": []}, None
            for item in pieces:
                if isinstance(item, ReplyPiece):
                    texts[item.kind].append(item.text)
                else:
                    finished = item
            if finished is None or finished.reason in ("error", "cancelled"):
                return unfinished_response(finished.reason if finished else "error")
            return jsonify(completion.message("".join(texts["thinking"]), "".join(texts["answer"]), finished))

        def chunks():
            first = next(pieces)  # nothing is sent while the request waits, so that a lost client can be told apart
            yield sse(completion.chunk({"role": "assistant", "content": ""}))
            for item in itertools.chain([first], pieces):
                if isinstance(item, ReplyPiece):
                    key = "reasoning_content" if item.kind == "thinking" else "content"
                    yield sse(completion.chunk({key: item.text}))
                elif item.reason == "error":
                    yield sse(error_body("generation failed: " + INTERNAL_ERROR, 500))
                elif item.reason != "cancelled":
                    yield sse(completion.chunk({}, finish_reason=item.reason))
                    if include_usage:
                        yield sse(completion.usage_chunk(item))
            yield "data: [DONE]\n\n"

        return Response(chunks(), mimetype="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions")
    def completions():
        body = json_body()
        check_model(body, model_name)
        asked = parse_completion_request(body, tokenizer, engine.max_context)
        generations, client = [], client_connection()
        try:
            for generation in generation_requests(asked, client.gone):
                generations.append(submit_generation(generation))
            choices = [collect_choice(generation, echo_text, asked, tokenizer, client.check)
                       for generation, (_, echo_text) in zip(generations, asked.prompts)]
        finally:
            for generation in generations:  # after a failure (queue full, a lost client): free the others' slots
                generation.cancel()
        if any(choice.finish_reason in ("error", "cancelled") for choice in choices):
            return unfinished_response("error" if any(c.finish_reason == "error" for c in choices) else "cancelled")
        return jsonify(completion_body(choices, model_name))

    @app.get("/v1/models")
    def models():
        return jsonify(models_list(model_name, started))

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str):
        check_model({"model": model_id}, model_name)
        return jsonify(model_card(model_name, started))

    @app.get("/tokenizer_info")
    def get_tokenizer_info():
        return jsonify(tokenizer_info(tokenizer, engine.max_context))

    @app.post("/tokenize")
    def post_tokenize():
        return jsonify(tokenize(json_body(), tokenizer, engine.max_context))

    @app.post("/detokenize")
    def post_detokenize():
        return jsonify(detokenize(json_body(), tokenizer))

    @app.get("/health")
    def health():
        ok = engine.alive
        body = {"status": "ok" if ok else "decode loop stopped", "model": model_name,
                "parameters": parameters.total, "active_parameters": parameters.active,
                "max_context": engine.max_context, "slots": len(engine.slots)}
        return jsonify(body), 200 if ok else 503

    @app.get("/stats")
    def stats():
        return jsonify(engine.stats())

    return app


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    openai_path = request.path.startswith("/v1/")
    response = jsonify(error_body(message, status, param, code) if openai_path else {"event": "error", "data": message})
    response.status_code = status
    if status == 503:
        response.headers["Retry-After"] = "1"
    return response


def unfinished_response(reason: str):
    """A non-streamed generation that ended without its reply ("cancelled" or "error"): its client left (499, nginx's
    "client closed request", seen only in the log), the server is stopping (503), or the engine failed (500)."""
    if reason == "cancelled":
        if client_connection().gone():
            return error_response(499, "the client closed the connection before the reply")
        return error_response(503, "the server is stopping")
    return error_response(500, "generation failed: " + INTERNAL_ERROR)


def json_body():
    if request.mimetype != "application/json":  # a browser posts text/plain across sites without asking first
        raise RequestError(f"the request body must be JSON sent with the header Content-Type: application/json "
                           f"(got {request.content_type or 'no Content-Type'})", status=415)
    raw = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: 413
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"the request body is not valid UTF-8 (bad byte at offset {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"the request body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") \
            from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply (arrays or objects hundreds of levels deep)") \
            from None


def host_name(host: str) -> str:
    """The name in a Host header: 'localhost:8080' -> 'localhost', '[::1]:8080' -> '::1'."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if ":" in host else host


def is_loopback(name: str) -> bool:
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ClientConnection:
    """The connection of the request being served, watched while the model works: a client that went away ends its
    request at once (its slot or queue place freed) instead of a minute later, when TCP keep-alive would notice.

    A client that closed its connection and one that only shut its sending side (still reading the reply) look the
    same from here: end of file. While nothing of the reply is sent, `check()` tells them apart with an interim
    `100 Continue` reply, which HTTP/1.1 clients skip: a closed socket answers it with a reset, and `gone()` turns true.
    Left to TCP keep-alive (ServerRequestHandler): HTTP/1.0 clients, and one that closed after pipelining a next request.
    """

    INTERIM_REPLY = b"HTTP/1.1 100 Continue\r\n\r\n"

    def __init__(self, sock: socket.socket, http11: bool):
        self.sock = sock
        self.may_probe = http11  # an HTTP/1.0 client must not get interim replies
        self.lost = False

    def gone(self) -> bool:
        """True once the connection is gone: reset or hung up (any thread may ask; the engine does before every step)."""
        return self.lost or bool(self._events() & (select.POLLHUP | select.POLLERR | select.POLLNVAL))

    def check(self):
        """Asked by the request's own thread while it waits for the model: at the client's end of file (pipelined
        bytes of a next request are not), sends the interim reply once."""
        if not self.may_probe or not self._events():
            return
        try:
            at_eof = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return
        except OSError:  # reset
            self.lost = True
            return
        if at_eof:
            self.may_probe = False
            try:
                self.sock.sendall(self.INTERIM_REPLY)
            except OSError:
                self.lost = True

    def _events(self) -> int:
        poller = select.poll()  # one per call: the engine's thread and the request's may ask at the same time
        poller.register(self.sock, select.POLLIN)  # hang-ups and errors are always reported
        return sum(events for _, events in poller.poll(0))

    def reply_started(self):
        self.may_probe = False  # from now on bytes of the reply are on the wire; it fails at a write once the client left


class NoClientWatch:
    """Under another WSGI server (or on Windows, without poll()): a lost client is noticed when a write fails."""

    def gone(self) -> bool:
        return False

    def check(self):
        pass


def client_connection() -> ClientConnection | NoClientWatch:
    return request.environ.get(CLIENT_ENVIRON_KEY) or NoClientWatch()


class RequestBody(LimitedStream):
    """The bytes of one request's body, so that neither the app nor werkzeug's after-reply drain reads into the next
    request on a kept-alive connection."""

    def on_disconnect(self, error=None):
        pass  # a body cut short just reads short (the app's own Content-Length stream reports it)


class ServerRequestHandler(WSGIRequestHandler):
    """werkzeug's handler with HTTP/1.1 keep-alive (werkzeug's own closes every connection), TCP_NODELAY and a
    ClientConnection for each request."""
    protocol_version = "HTTP/1.1"
    # Streams are many small writes: without TCP_NODELAY, Nagle's algorithm and delayed ACKs hold each back ~40 ms
    disable_nagle_algorithm = True
    # A kept-alive connection that sends nothing for this long (or a client that reads nothing of its reply) is closed,
    # so idle clients do not hold server threads forever; decoding between writes never waits on the socket
    timeout = 120
    client: ClientConnection | None = None  # the current request's

    def setup(self):
        super().setup()
        # TCP keep-alive probes notice a client that left without a reset: its host vanished (about 25 s), or it closed
        # the connection and ClientConnection could not probe it (about a minute, 61.6 s measured, when its host drops
        # the closed connection)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):  # Linux; other systems keep their defaults
                self.connection.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

    def make_environ(self):
        environ = super().make_environ()
        self.client = None
        if hasattr(select, "poll"):  # Windows has no poll()
            self.client = environ[CLIENT_ENVIRON_KEY] = ClientConnection(self.connection,
                                                                         self.request_version == "HTTP/1.1")
        return environ

    def send_response(self, code: int, message: str | None = None):
        if self.client is not None:
            self.client.reply_started()
        super().send_response(code, message)

    def run_wsgi(self):
        length = self.headers.get("Content-Length", "0")
        if self.request_version != "HTTP/1.1" or "Transfer-Encoding" in self.headers \
                or not (length.isascii() and length.isdigit()):
            return super().run_wsgi()  # chunked or unknown body length: werkzeug's way, closing after the reply
        connection, self.rfile = self.rfile, RequestBody(self.rfile, int(length))
        try:
            super().run_wsgi()
        finally:
            self.rfile = connection

    def send_header(self, keyword: str, value: str):
        # werkzeug sends "Connection: close" with every reply: drop it when the body was read to its end, so that the
        # next request starts right after it
        if keyword.lower() == "connection" and value.lower() == "close" and isinstance(self.rfile, RequestBody) \
                and self.rfile.is_exhausted and not self.close_connection:
            return
        super().send_header(keyword, value)


def make_app_server(app: Flask, host: str, port: int) -> BaseWSGIServer:
    """A threaded HTTP server for the app (port 0 picks a free port; the server's .port says which)."""
    return make_server(host, port, app, threaded=True, request_handler=ServerRequestHandler)


def origin_arg(value: str) -> str:
    """--allow-origin: "*" or scheme://host[:port], as browsers send it in the Origin header."""
    url = urllib.parse.urlsplit(value.rstrip("/"))
    if value != "*" and (url.scheme not in ("http", "https") or not url.netloc or url.path or url.query):
        raise argparse.ArgumentTypeError(f"{value!r} is not an origin: give scheme://host[:port], e.g. "
                                         f"http://localhost:3000 (no path), or * for any site")
    return "*" if value == "*" else f"{url.scheme}://{url.netloc}"


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Cortex chat server: web page, /api/chat and an OpenAI-compatible API")
    parser.add_argument("--checkpoint", default="dpo.bin",
                        help="a .bin or .safetensors file, or a stage run dir (default ./dpo.bin, downloaded from "
                             "ModelScope qibin0506/Cortex-2.5.1 when missing)")
    parser.add_argument("--tokenizer", help="'cortex', 'tiny' or a tokenizer directory (default: the checkpoint's "
                                            "run dir says, else cortex)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="the compute dtype (default: bfloat16 on CUDA, else float32)")
    parser.add_argument("--quantize", choices=QUANTIZE,
                        help="how the linear layers, experts and head are stored: none (in --dtype), bf16, or int8 "
                             "with per-channel scales (default: bf16 on x86 CPUs when --dtype is not given, else "
                             "none)")
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together (KV cache rows)")
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting for a slot before 503s")
    parser.add_argument("--seed", type=int, help="sampling seed (default: random)")
    parser.add_argument("--allow-origin", action="append", default=[], type=origin_arg, metavar="URL",
                        help="a web site (scheme://host[:port]) whose pages may call this server, besides its own page; "
                             "repeat for several, * for any (default: none)")
    parser.add_argument("--compile", action="store_true",
                        help="decode with a torch.compile'd step (faster per token; compiles at start, needs a C++ "
                             "compiler on CPU or Triton on CUDA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        served = load_for_serving(args.checkpoint, args.tokenizer, args.device, args.dtype, args.quantize)
        engine = Engine(served.model, served.tokenizer, slots=args.slots, max_queue=args.max_queue, seed=args.seed,
                        compile=args.compile)
        app = create_app(engine, served.tokenizer, served.name, allow_origins=tuple(args.allow_origin),
                         loopback_only=is_loopback(args.host))
        server = make_app_server(app, args.host, args.port)
    except (CheckpointError, TokenizerFilesError, ValueError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:
        sys.exit(f"error: cannot listen on {args.host}:{args.port}: {err}")
    print(f"Cortex chat ({served.name}, {engine.device}, {engine.max_context}-token context, "
          f"{args.slots} slots) on http://{args.host}:{server.port}", flush=True)
    try:
        engine.run_beside(server.serve_forever)  # decoding in this thread, which loaded the model: see serving/engine.py
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
