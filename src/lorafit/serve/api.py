"""The HTTP face (Starlette, run by uvicorn): OpenAI's routes for causal LMs, /v1/classify, health, metrics.

Handlers only parse, check and tokenize, then hand rows to the engine and wait on futures; the
model runs on the engine's worker thread, so ``/health`` and ``/metrics`` answer while a batch
decodes. Every error is a JSON body in OpenAI's shape (``{"error": {"message", "type", "param",
"code"}}``) with a 4xx/5xx status - unknown routes and methods included - so the ``openai``
client raises its usual exceptions. A client that disconnects while its rows wait or decode
cancels them (polled every 0.1 s, or at once for a stream): the worker drops those rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any

from lorafit.serve.adapters import ServeError
from lorafit.serve.engine import Job
from lorafit.serve.generate import Row
from lorafit.serve.images import decode_base64
from lorafit.serve.requests import (chat_spec, classify_spec, completion_spec, detect_spec, image_spec, parse_body,
                                    read_fields)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait(request, futures: list[asyncio.Future], jobs: list[Job]) -> list[Any]:
    pending = set(futures)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.1)
        if pending and await request.is_disconnected():
            for job in jobs:
                job.cancelled.set()
            raise ClientGone
    results = [f.result() for f in futures]
    err = next((r for r in results if isinstance(r, ServeError)), None)
    if err is not None:
        raise err
    return results


def _number(text: str):
    """A query parameter as a JSON value where it reads as one (``?conf=0.5`` -> 0.5), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def completion_logprobs(scores) -> dict | None:
    """/v1/completions' ``logprobs`` object (``text_offset`` counts from the completion's start).

    ``top_logprobs`` is OpenAI's {text: logprob} per token, so alternatives with the same text (two
    partial UTF-8 byte tokens both shown as U+FFFD) keep one entry; the chat form lists them all.
    """
    if scores is None:
        return None
    top = any(t.top for t in scores)
    return {"tokens": [t.token for t in scores], "token_logprobs": [t.logprob for t in scores],
            "top_logprobs": [{a: v for a, v, _ in t.top} if t.logprob is not None else None for t in scores]
            if top else None, "text_offset": [t.offset for t in scores]}


def chat_logprobs(scores) -> dict | None:
    """/v1/chat/completions' ``logprobs`` object: ``content`` holds one entry per token."""
    if scores is None:
        return None

    def entry(token: str, logprob: float, raw: bytes) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**entry(t.token, t.logprob, t.bytes), "top_logprobs": [entry(*a) for a in t.top]}
                        for t in scores], "refusal": None}


def build_app(server):
    """The ASGI app of a :class:`lorafit.serve.server.Server` (its engine starts and stops with the app)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    backend, limits, metrics = server.backend, server.limits, server.metrics

    def error(exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def endpoint(name: str, handler):
        """Wrap a handler: JSON errors, the latency / status metrics."""
        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                response = await handler(request)
            except ServeError as exc:
                response = error(exc)
            except ClientGone:
                response = Response(status_code=499)
            if not isinstance(response, StreamingResponse):  # a stream records itself when it ends
                metrics.request(name, response.status_code, time.perf_counter() - t0)
            return response
        return run

    def check_declared_size(request: Request) -> None:
        """413 before reading a body whose Content-Length is over --max-request-bytes."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_request_bytes:
            raise ServeError(413, f"request body is {size} bytes; the limit is {limits.max_request_bytes} "
                                  "(--max-request-bytes)")

    async def body_of(request: Request, spec: dict) -> dict[str, Any]:
        check_declared_size(request)
        return read_fields(parse_body(await request.body(), limits.max_request_bytes), spec)

    def submit(kind: str, adapter: str | None, works: list[Any], on_emit=None) -> tuple[list[Job], list]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in works]

        def deliver_to(fut):
            def deliver(result):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))
            return deliver
        jobs = [Job(kind, adapter, w, deliver_to(f)) for w, f in zip(works, futures)]
        server.engine.submit(jobs)
        return jobs, futures

    # ------------------------------------------------------------ causal LM
    async def generate(request: Request, chat: bool) -> Response:
        spec = (chat_spec if chat else completion_spec)(limits.max_tokens, limits.max_inputs)
        f = await body_of(request, spec)
        adapter = server.resolve(f["model"])
        max_tokens = f.get("max_completion_tokens") or f["max_tokens"]
        if chat:
            prompts, param = [backend.encode_chat(f["messages"])], "messages"
        else:
            prompts, param = [backend.encode_prompt(p) if isinstance(p, str) else backend.check_ids(p, "prompt")
                              for p in f["prompt"]], "prompt"
        for ids in prompts:
            backend.check_length(ids, max_tokens, param)
        if len(prompts) * f["n"] > limits.max_inputs:
            raise ServeError(400, f"field 'n': {len(prompts)} prompt(s) x n {f['n']} = {len(prompts) * f['n']} "
                                  f"choices; at most {limits.max_inputs} per request", param="n")
        top, echo = logprobs_wanted(f, chat), bool(f.get("echo"))
        if max_tokens == 0 and not echo:
            raise ServeError(400, "field 'max_tokens': 0 only with 'echo': true (scoring the prompt)",
                             param="max_tokens")
        if echo and f["stream"]:
            raise ServeError(400, "field 'echo': not supported with 'stream': true by lorafit serve", param="echo")
        # choice i = prompt i // n, its (i % n)-th sample (OpenAI's order); a seed gives each choice seed + i
        rows = [Row(list(prompts[i // f["n"]]), max_tokens, f["temperature"], f["top_p"], f["stop"],
                    None if f["seed"] is None else f["seed"] + i, logprobs=top, echo=echo)
                for i in range(len(prompts) * f["n"])]
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": f["model"]}
        if f["stream"]:
            return stream(request, chat, head, adapter, rows, bool((f["stream_options"] or {}).get("include_usage")))
        jobs, futures = submit("generate", adapter, rows)
        results = await _wait(request, futures, jobs)
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice(chat, i, r) for i, r in enumerate(results)],
                             "usage": usage(results)})

    def logprobs_wanted(f: dict, chat: bool) -> int | None:
        """The top-k a request asks for with each token's log-probability, or None (not asked)."""
        if chat:
            if f["top_logprobs"] is not None and not f["logprobs"]:
                raise ServeError(400, "field 'top_logprobs': needs 'logprobs': true", param="top_logprobs")
            top = (f["top_logprobs"] or 0) if f["logprobs"] else None
        else:
            top = f["logprobs"]
        if top is not None and f["stream"]:
            raise ServeError(400, "field 'logprobs': not supported with 'stream': true by lorafit serve",
                             param="logprobs")
        return top

    def choice(chat: bool, i: int, r: dict) -> dict:
        if chat:
            return {"index": i, "message": {"role": "assistant", "content": r["text"]},
                    "logprobs": chat_logprobs(r["scores"]), "finish_reason": r["finish_reason"]}
        text, scores = r["text"], r["scores"]
        if r["echo"] is not None:  # the prompt (as the tokenizer reads it back) and its scored tokens first
            prompt, prompt_scores = r["echo"]
            text = prompt + text
            if scores is not None:
                scores = [*prompt_scores, *(dataclasses.replace(t, offset=t.offset + len(prompt)) for t in scores)]
        return {"index": i, "text": text, "logprobs": completion_logprobs(scores), "finish_reason": r["finish_reason"]}

    def usage(results: list[dict]) -> dict:
        p, c = sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def stream(request: Request, chat: bool, head: dict, adapter, rows: list[Row], include_usage: bool):
        """Server-sent events as OpenAI streams them: one chunk per text delta, then ``[DONE]``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, row in enumerate(rows):
            row.emit = lambda delta, i=i: loop.call_soon_threadsafe(events.put_nowait, ("delta", i, delta))
        jobs, futures = submit("generate", adapter, rows)
        for i, fut in enumerate(futures):
            fut.add_done_callback(lambda f, i=i: events.put_nowait(("done", i, f.result())))
        obj = "chat.completion.chunk" if chat else "text_completion"
        t0 = time.perf_counter()

        def chunk(i: int, delta: str | None, reason: str | None) -> str:
            if chat:
                c = {"index": i, "delta": {} if delta is None else {"content": delta}, "logprobs": None,
                     "finish_reason": reason}
            else:
                c = {"index": i, "text": delta or "", "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**head, 'object': obj, 'choices': [c]})}\n\n"

        async def body():
            status, done, results = 200, 0, []
            try:
                if chat:
                    for i in range(len(rows)):
                        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        yield f"data: {json.dumps({**head, 'object': obj, 'choices': [first]})}\n\n"
                while done < len(rows):
                    what, i, payload = await events.get()
                    if what == "delta":
                        yield chunk(i, payload, None)
                        continue
                    done += 1
                    if isinstance(payload, ServeError):
                        status = payload.status
                        yield f"data: {json.dumps(payload.body())}\n\n"
                        continue
                    results.append(payload)
                    yield chunk(i, None, payload["finish_reason"])
                if include_usage and results:
                    yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': usage(results)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on disconnect: Starlette cancels this generator
                if done < len(rows):
                    status = 499
                    for job in jobs:
                        job.cancelled.set()
                metrics.request("chat" if chat else "completions", status, time.perf_counter() - t0)

        return StreamingResponse(body(), media_type="text/event-stream")

    # ------------------------------------------------------------ classification
    async def classify(request: Request) -> Response:
        f = await body_of(request, classify_spec(limits.max_inputs))
        adapter = server.resolve(f["model"])
        if adapter is None:
            raise ServeError(400, f"model {f['model']!r} is the base, which has no trained classification head: "
                                  "name an adapter (GET /v1/models)", param="model")
        jobs, futures = submit("classify", adapter, [backend.encode(t) for t in f["input"]])
        results = await _wait(request, futures, jobs)
        return JSONResponse({"object": "list", "model": f["model"],
                             "data": [{"index": i, **r} for i, r in enumerate(results)]})

    async def multipart_images(request: Request, extra: dict) -> tuple[str, str, list, dict]:
        """``curl -F model=ADAPTER -F image=@cat.jpg [-F image=@dog.jpg] [-F conf=0.5]``: file parts named
        ``image`` (1 to max_inputs of them), every other part a field of the endpoint."""
        from starlette import formparsers

        if getattr(formparsers, "multipart", None) is None:
            raise ServeError(415, "multipart uploads need the python-multipart package (pip install "
                                  "'lorafit[serve]'); or send the image as base64 JSON or as the raw body")
        check_declared_size(request)
        try:
            form = await request.form(max_files=limits.max_inputs, max_fields=32)  # unknown ones: named below
        except (HTTPException, ValueError, KeyError) as exc:  # malformed or over the part limits
            detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
            raise ServeError(400, f"multipart body: {detail}") from None
        try:
            blobs, fields, total = [], {}, 0
            for key, value in form.multi_items():
                if isinstance(value, str):
                    if key in fields or key == "image":
                        raise ServeError(400, f"field {key!r}: given twice or not as a file", param=key)
                    fields[key] = value
                    continue
                if key != "image":
                    raise ServeError(400, f"file part {key!r}: images go in parts named 'image'", param=key)
                data = await value.read()
                total += len(data)
                if total > limits.max_request_bytes:
                    raise ServeError(413, f"uploaded images exceed {limits.max_request_bytes} bytes "
                                          "(--max-request-bytes)")
                blobs.append((data, f"image[{len(blobs)}] ({value.filename or 'no name'})"))
        finally:
            await form.close()
        name = fields.pop("model", None)
        if not name:
            raise ServeError(400, "field 'model' is required (a form field next to the image parts)", param="model")
        if not blobs:
            raise ServeError(400, "field 'image': no file part named 'image' in the form", param="image")
        got = read_fields({k: _number(v) for k, v in fields.items()}, extra)
        return name, server.resolve(name), blobs, got

    async def images_of(request: Request, extra: dict) -> tuple[str, str, list, dict]:
        """(model name, adapter, [(bytes, field)], other fields) of an image request: base64 JSON, a
        multipart form (``curl -F``) or a raw upload (``curl --data-binary``)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return await multipart_images(request, extra)
        if ctype.startswith("image/") or ctype == "application/octet-stream":  # a raw upload, ?model=ADAPTER
            query = dict(request.query_params)
            name = query.pop("model", None)
            if not name:
                raise ServeError(400, "query parameter 'model' is required with a raw image body", param="model")
            fields = read_fields({k: _number(v) for k, v in query.items()}, extra)
            adapter = server.resolve(name)
            raw = await request.body()
            if len(raw) > limits.max_request_bytes:
                raise ServeError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_request_bytes}")
            return name, adapter, [(raw, "body")], fields
        f = await body_of(request, {**image_spec(limits.max_inputs), **extra})
        name, adapter = f["model"], server.resolve(f["model"])
        many = isinstance(f["image"], list)
        values = f["image"] if many else [f["image"]]
        fields = [f"image[{i}]" if many else "image" for i in range(len(values))]
        blobs = [(decode_base64(v, field), field) for v, field in zip(values, fields)]
        return name, adapter, blobs, {k: f[k] for k in extra}

    async def classify_image(request: Request) -> Response:
        name, adapter, blobs, _ = await images_of(request, {})
        if adapter is None:
            raise ServeError(400, f"model {name!r} is the base, which has no trained classification head: "
                                  "name an adapter (GET /v1/models)", param="model")
        pixels = await asyncio.to_thread(lambda: [backend.encode(data, field) for data, field in blobs])
        jobs, futures = submit("classify", adapter, pixels)
        results = await _wait(request, futures, jobs)
        return JSONResponse({"object": "list", "model": name,
                             "data": [{"index": i, **r} for i, r in enumerate(results)]})

    async def detect(request: Request) -> Response:
        name, adapter, blobs, f = await images_of(request, detect_spec())
        encoded = await asyncio.to_thread(lambda: [backend.encode(data, field) for data, field in blobs])
        works = [{"pixels": px, "shape": shape, **f} for px, shape in encoded]
        jobs, futures = submit("detect", adapter, works)
        results = await _wait(request, futures, jobs)
        return JSONResponse({"object": "list", "model": name,
                             "data": [{"index": i, **r} for i, r in enumerate(results)]})

    # ------------------------------------------------------------ info
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": server.model_list()})

    async def health(request: Request) -> Response:
        return JSONResponse(server.health())

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(len(server.store.resident), server.store.max_resident,
                                                server.engine.queued()),
                                 media_type="text/plain; version=0.0.4")

    routes = [Route("/health", endpoint("health", health)), Route("/metrics", endpoint("metrics", prometheus)),
              Route("/v1/models", endpoint("models", models))]
    if "completions" in backend.endpoints:
        routes += [Route("/v1/completions", endpoint("completions", lambda r: generate(r, False)), methods=["POST"]),
                   Route("/v1/chat/completions", endpoint("chat", lambda r: generate(r, True)), methods=["POST"])]
    if "classify" in backend.endpoints:
        routes.append(Route("/v1/classify", endpoint("classify", classify), methods=["POST"]))
    if "detect" in backend.endpoints:
        routes.append(Route("/v1/detect", endpoint("detect", detect), methods=["POST"]))
    if "classify-image" in backend.endpoints:
        routes.append(Route("/v1/classify-image", endpoint("classify-image", classify_image), methods=["POST"]))
    routes += [Route(path, endpoint(name, handler), methods=["POST"]) for path, name, handler in server.extra_routes]

    async def http_error(request, exc: HTTPException):
        hint = f" (this server has: {', '.join(r.path for r in routes)})" if exc.status_code == 404 else ""
        return error(ServeError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}{hint}",
                                "not_found_error" if exc.status_code == 404 else "invalid_request_error"))

    async def internal_error(request, exc: Exception):
        return error(ServeError(500, f"internal error ({type(exc).__name__})", "server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error},
                     lifespan=lifespan)
