"""The OpenAI-compatible HTTP API and the web chat page, over the continuous-batching engine.

    POST /v1/chat/completions   messages (text, image_url parts: data: URLs of PNG/JPEG/DICOM),
                                max_tokens / max_completion_tokens, temperature, top_p, stop,
                                seed, stream (server-sent events ending with `data: [DONE]`)
    GET  /v1/models             the one model served
    POST /v1/preview            the image as the model sees it (PNG data URL), for the page
    GET  /health                200 once the model is loaded and every program is compiled
    GET  /metrics               Prometheus text
    GET  /                      the chat page (static files shipped with the package)

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status
for anything the client sent wrong; the message names the field.

Why one file (over 450 lines): every OpenAI request field is validated next to the route that
serves it, so that each 4xx names the field it came from; the page's assets are in static/.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import os
import threading
import time
import uuid
from importlib import resources

import numpy as np
from fastapi import Request as HTTPRequest

from qilin_jax.data.conversation import IMAGE_TAG
from qilin_jax.data.errors import DataError
from qilin_jax.infer.common import check_tokenizer, first_turn, load_pixels, prompt_ids, template_name
from qilin_jax.serve.config import ServeConfig
from qilin_jax.serve.engine import Engine, Event, QueueFull, Request, compile_count

log = logging.getLogger("qilin_jax.serve")

IMAGE_MIME = {
    "image/png": "image.png",
    "image/jpeg": "image.jpg",
    "image/jpg": "image.jpg",
    "application/dicom": "image.dcm",
    "image/dicom": "image.dcm",
}
API_KEY_ENV = "QILIN_API_KEY"


class APIError(Exception):
    """An error answered to the client: HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def response(self):
        """The JSONResponse of this error."""
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# --- request parsing ------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def decode_data_url(url, param: str) -> tuple[bytes, str]:
    """(bytes, a file name telling the decoder its type) of a base64 data: URL; APIError if not."""
    if not isinstance(url, str):
        raise APIError(400, f"{param} must be a string data: URL", param, "invalid_image_url")
    if not url.startswith("data:"):
        raise APIError(
            400,
            f"{param}: only data: URLs (base64 PNG, JPEG or DICOM) are accepted; "
            "the server fetches nothing from the network",
            param,
            "invalid_image_url",
        )
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise APIError(400, f"{param}: expected data:<mime type>;base64,<data>", param, "invalid_image_url")
    mime = head[: -len(";base64")].strip().lower()
    if mime not in IMAGE_MIME:
        raise APIError(
            400,
            f"{param}: unsupported image type {mime!r}; use one of {sorted(IMAGE_MIME)}",
            param,
            "invalid_image_format",
        )
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: invalid base64 ({e})", param, "invalid_base64") from None
    if not raw:
        raise APIError(400, f"{param}: the image is empty", param, "invalid_image")
    return raw, IMAGE_MIME[mime]


def _text_of(content, param: str, images: list | None) -> str:
    """The text of a message's content (a string or a list of parts); image parts go to `images`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of content parts", param)
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise APIError(400, f"{where} must be an object with a `type`", where)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.text must be a string", f"{where}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            if images is None:
                raise APIError(400, f"{where}: images are only accepted in user messages", where)
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            images.append((url, f"{where}.image_url"))
        else:
            raise APIError(400, f"{where}.type must be 'text' or 'image_url', got {kind!r}", f"{where}.type")
    return "\n".join(texts)


def parse_messages(messages) -> tuple[list[dict], str, list[tuple]]:
    """(LLaVA turns ending with the question, system prompt or "", [(data URL, param)] of images)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    system, turns, images = "", [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with `role` and `content`", where)
        role = m.get("role")
        if "content" not in m or m["content"] is None:
            raise APIError(400, f"{where}.content is missing", f"{where}.content")
        if role in ("system", "developer"):
            if turns:
                raise APIError(400, f"{where}: a system message must come before the conversation", f"{where}.role")
            system = (system + "\n" + _text_of(m["content"], f"{where}.content", None)).strip()
            continue
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role")
        text = _text_of(m["content"], f"{where}.content", images if role == "user" else None)
        text = text.replace(IMAGE_TAG, "").strip()  # images come from image_url parts only
        who = "human" if role == "user" else "gpt"
        if not turns and who == "gpt":
            raise APIError(400, f"{where}: the conversation must start with a user message", f"{where}.role")
        if turns and turns[-1]["from"] == who:  # consecutive messages of one role: one turn
            turns[-1]["value"] = (turns[-1]["value"] + "\n" + text).strip()
        else:
            turns.append({"from": who, "value": text})
    if not turns or turns[-1]["from"] != "human":
        raise APIError(400, "messages: the last message must be a user message (the question to answer)", "messages")
    return turns, system, images


# --- the app --------------------------------------------------------------------------------


class Metrics:
    """The Prometheus metrics of one server (own registry)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("qilin_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.finished = Counter("qilin_finished", "Finished generations by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("qilin_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("qilin_completion_tokens", "Tokens generated", registry=r)
        self.disconnects = Counter(
            "qilin_client_disconnects", "Requests dropped because the client went away", registry=r
        )
        Gauge("qilin_queue_depth", "Requests waiting for a slot", registry=r).set_function(engine.queue_depth)
        Gauge("qilin_slots_in_use", "Decode slots holding a request", registry=r).set_function(engine.slots_in_use)
        Gauge("qilin_slots", "Decode slots", registry=r).set(engine.slots)
        Gauge(
            "qilin_compilations_since_ready", "XLA compilations since the server became ready", registry=r
        ).set_function(lambda: compile_count() - (engine.ready_compiles or compile_count()))
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("qilin_time_to_first_token_seconds", "Submit to first token", buckets=buckets, registry=r)
        self.latency = Histogram("qilin_request_latency_seconds", "Submit to last token", buckets=buckets, registry=r)

    def on_finish(self, req: Request) -> None:
        """Engine hook: count a finished request."""
        self.finished.labels(reason=req.finish_reason or "").inc()
        self.prompt_tokens.inc(len(req.ids))
        self.completion_tokens.inc(len(req.tokens))
        if req.first_token_at is not None:
            self.ttft.observe(req.first_token_at - req.submitted)
        if req.finished_at is not None:
            self.latency.observe(req.finished_at - req.submitted)


class Server:
    """The engine, the FastAPI app and (optionally) a uvicorn server around them."""

    def __init__(self, model, tokenizer, cfg: ServeConfig | None = None, *, mesh=None):
        self.cfg = cfg or ServeConfig()
        self.cfg.validate("serve")
        check_tokenizer(model, tokenizer)
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.tokenizer_lock = threading.Lock()
        self.engine = Engine(
            model,
            tokenizer,
            slots=self.cfg.slots,
            max_len=self.cfg.max_context,
            prompt_buckets=self.cfg.prompt_buckets,
            max_queue=self.cfg.max_queue,
            prefill_batch=self.cfg.prefill_batch,
            mesh=mesh,
            tokenizer_lock=self.tokenizer_lock,
        )
        self.metrics = Metrics(self.engine)
        self.engine.on_finish = self.metrics.on_finish
        self.api_key = self.cfg.api_key or os.environ.get(API_KEY_ENV, "")
        self.created = int(time.time())
        self.app = self._build_app()
        self.uvicorn = None
        self.warmup_error: str = ""

    # -- helpers
    def _check_key(self, request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", None, "invalid_api_key"
            )

    async def _body(self, request) -> dict:
        limit = int(self.cfg.max_body_mb * 2**20)
        length = request.headers.get("content-length")
        too_big = APIError(
            413,
            f"the request body is larger than the limit of {self.cfg.max_body_mb:g} MB (serve.max_body_mb)",
            None,
            "request_too_large",
        )
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def _pixels(self, images: list[tuple]) -> np.ndarray | None:
        if not images:
            return None
        blobs, names = [], []
        for url, param in images:
            raw, name = decode_data_url(url, param)
            blobs.append(raw)
            names.append(name)
        try:
            return load_pixels(self.model, blobs, names, self.cfg.image_mode)
        except DataError as e:
            param = images[0][1] if len(images) == 1 else "messages"
            raise APIError(400, f"{param}: {e}", param, "invalid_image") from None
        except Exception as e:  # noqa: BLE001  any decoder failure is the image's fault
            param = images[0][1] if len(images) == 1 else "messages"
            raise APIError(
                400, f"{param}: cannot decode the image: {type(e).__name__}: {e}", param, "invalid_image"
            ) from None

    async def _parse(self, body: dict) -> tuple[Request, dict]:
        cfg = self.cfg
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model is required (a string); see GET /v1/models", "model")
        if model != cfg.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {cfg.model_name!r}",
                "model",
                "model_not_found",
            )
        n = body.get("n", 1)
        if n is not None and n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(key)
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise APIError(400, f"{key} must be an integer >= 1, got {max_tokens!r}", key)
        temperature = body.get("temperature")
        if temperature is None:
            temperature = cfg.temperature if cfg.do_sample else 0.0
        elif not _is_num(temperature) or not 0 <= temperature <= 2:
            raise APIError(400, f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
        top_p = body.get("top_p")
        if top_p is None:
            top_p = cfg.top_p
        elif not _is_num(top_p) or not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
        seed = body.get("seed")
        if seed is None:
            seed = cfg.seed
        elif not _is_int(seed):
            raise APIError(400, f"seed must be an integer, got {seed!r}", "seed")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
        so = body.get("stream_options") or {}
        if not isinstance(so, dict):
            raise APIError(400, "stream_options must be an object", "stream_options")
        turns, system, images = parse_messages(body.get("messages"))
        if len(images) > cfg.max_images:
            raise APIError(
                400,
                f"{len(images)} images in messages; at most {cfg.max_images} are accepted (serve.max_images)",
                "messages",
                "too_many_images",
            )
        if images:
            turns[0] = {"from": "human", "value": first_turn(turns[0]["value"], True)["value"]}
        pixels = await asyncio.to_thread(self._pixels, images)
        try:
            template = template_name(cfg.template, system)
            with self.tokenizer_lock:
                ids = prompt_ids(self.model, self.tokenizer, turns, template)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        n_prompt = len(ids)
        room = self.engine.max_len - n_prompt
        if room < 1:
            raise APIError(
                400,
                f"messages: the prompt is {n_prompt} tokens; the context is {self.engine.max_len} "
                "tokens, which leaves no room for an answer",
                "messages",
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(cfg.max_new_tokens, room)
        elif max_tokens > room:
            raise APIError(
                400,
                f"the prompt is {n_prompt} tokens and {key} is {max_tokens}: "
                f"{n_prompt + max_tokens} tokens, more than the context of "
                f"{self.engine.max_len}; lower {key}",
                key,
                "context_length_exceeded",
            )
        req = Request(
            ids=np.asarray(ids, np.int32),
            pixels=pixels,
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            seed=int(seed),
            stop=list(cfg.stop) + stop,
        )
        return req, {"stream": stream, "include_usage": bool(so.get("include_usage"))}

    def _submit(self, req: Request) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req.on_event = lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy ({e}); retry shortly",
                None,
                "rate_limit_exceeded",
                "requests",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        return q

    def _usage(self, req: Request) -> dict:
        n, m = len(req.ids), len(req.tokens)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    async def _completion(self, request):
        if not self.engine.ready:
            raise APIError(
                503,
                "the model is still loading / compiling; see GET /health",
                None,
                "not_ready",
                "server_error",
                headers={"Retry-After": "5"},
            )
        self._check_key(request)
        body = await self._body(request)
        req, opts = await self._parse(body)
        q = self._submit(req)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        name = self.cfg.model_name
        if opts["stream"]:
            return self._stream(req, q, cid, created, name, opts["include_usage"])
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        req.cancel()
                        self.metrics.disconnects.inc()
                        raise APIError(499, "client closed the request", None, "client_closed") from None
                    continue
                if ev.finish_reason:
                    break
        except asyncio.CancelledError:
            req.cancel()
            self.metrics.disconnects.inc()
            raise
        if ev.finish_reason not in ("stop", "length"):
            raise APIError(
                500, f"generation failed: {ev.error or ev.finish_reason}", None, "generation_failed", "server_error"
            )
        from fastapi.responses import JSONResponse

        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": req.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": ev.finish_reason,
                    }
                ],
                "usage": self._usage(req),
            }
        )

    def _stream(self, req: Request, q: asyncio.Queue, cid: str, created: int, name: str, include_usage: bool):
        from fastapi.responses import StreamingResponse

        def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
            d = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if usage is not None:
                d["usage"] = usage
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        metrics = self.metrics

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    ev: Event = await q.get()
                    if ev.text:
                        yield chunk({"content": ev.text})
                    if ev.finish_reason:
                        break
                if ev.finish_reason in ("stop", "length"):
                    yield chunk({}, ev.finish_reason)
                    if include_usage:
                        yield chunk({}, usage=self._usage(req), choices=False)
                else:
                    err = {
                        "message": f"generation failed: {ev.error or ev.finish_reason}",
                        "type": "server_error",
                        "param": None,
                        "code": "generation_failed",
                    }
                    yield f"data: {json.dumps({'error': err})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not req.done.is_set():  # the client went away mid-answer: free the slot
                    req.cancel()
                    metrics.disconnects.inc()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    def _preview(self, pixels: np.ndarray) -> str:
        from PIL import Image

        from qilin_jax.data.images import CLIP_MEAN, CLIP_STD

        x = (
            pixels[0] * np.asarray(CLIP_STD, np.float32)[:, None, None]
            + np.asarray(CLIP_MEAN, np.float32)[:, None, None]
        )
        rgb = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def _build_app(self):
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
        from starlette.exceptions import HTTPException as StarletteHTTPException

        app = FastAPI(title="Qilin-Med-VL", docs_url=None, redoc_url=None, openapi_url=None)
        static = resources.files("qilin_jax.serve") / "static"

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc):
            return APIError(exc.status_code, str(exc.detail), None, None).response()

        @app.exception_handler(RequestValidationError)
        async def validation_error(request, exc):
            return APIError(400, str(exc), None, None).response()

        @app.post("/v1/chat/completions")
        async def chat_completions(request: HTTPRequest):
            try:
                resp = await self._completion(request)
            except APIError as e:
                resp = e.response()
            self.metrics.requests.labels(status=str(resp.status_code)).inc()
            return resp

        @app.get("/v1/models")
        async def models(request: HTTPRequest):
            try:
                self._check_key(request)
            except APIError as e:
                return e.response()
            return {
                "object": "list",
                "data": [
                    {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "qilin-jax"}
                ],
            }

        @app.post("/v1/preview")
        async def preview(request: HTTPRequest):
            try:
                self._check_key(request)
                body = await self._body(request)
                iu = body.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                pixels = await asyncio.to_thread(self._pixels, [(url, "image_url")])
                return {
                    "preview": await asyncio.to_thread(self._preview, pixels),
                    "size": int(pixels.shape[-1]),
                    "image_mode": self.cfg.image_mode,
                }
            except APIError as e:
                return e.response()

        @app.get("/health")
        async def health():
            if self.engine.ready:
                return {
                    "status": "ok",
                    "model": self.cfg.model_name,
                    "slots": self.engine.slots,
                    "max_context": self.engine.max_len,
                }
            status = "error: " + self.warmup_error if self.warmup_error else "loading"
            return JSONResponse({"status": status}, status_code=503)

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/")
        async def index():
            return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

        @app.get("/static/{name}")
        async def static_file(name: str):
            types = {".js": "text/javascript", ".css": "text/css"}
            ext = os.path.splitext(name)[1]
            f = static / name
            if ext not in types or "/" in name or not f.is_file():
                return APIError(404, f"no static file {name!r}", None, "not_found").response()
            return PlainTextResponse(f.read_text(encoding="utf-8"), media_type=types[ext])

        return app

    # -- running
    def warmup(self) -> None:
        """Compile every program and start the engine; /health turns 200 after this."""
        try:
            self.engine.start()
        except Exception as e:
            self.warmup_error = f"{type(e).__name__}: {e}"
            log.exception("serve: warm-up failed")
            raise

    def _uvicorn(self, host: str, port: int):
        import uvicorn

        config = uvicorn.Config(
            self.app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5
        )
        self.uvicorn = uvicorn.Server(config)
        return self.uvicorn

    def run(self) -> None:
        """Serve on cfg.host:cfg.port until interrupted (warm-up runs while /health says 503)."""
        threading.Thread(target=self.warmup, name="qilin-serve-warmup", daemon=True).start()
        server = self._uvicorn(self.cfg.host, self.cfg.port)
        log.info(
            "serve: http://%s:%d (model %r; /health turns 200 once compiled)",
            self.cfg.host,
            self.cfg.port,
            self.cfg.model_name,
        )
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        finally:
            self.engine.stop()

    def start_background(self, host: str = "127.0.0.1", port: int = 0, *, warmup: bool = True) -> int:
        """Warm up, then serve from a daemon thread on host:port (0: a free port); returns the port."""
        import socket

        if warmup:
            self.warmup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        server = self._uvicorn(host, port)
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="qilin-serve-http", daemon=True).start()
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        if not server.started:
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
        return port

    def shutdown(self) -> None:
        """Stop the HTTP server and the engine."""
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
        self.engine.stop()


def run_serve(model, tokenizer, cfg: ServeConfig, *, mesh=None) -> dict:
    """Serve until interrupted (the `serve` task); returns what was served."""
    server = Server(model, tokenizer, cfg, mesh=mesh)
    server.run()
    return {"served": server.engine.generated, "steps": server.engine.steps}
