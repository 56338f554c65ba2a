"""`create_app`: the OpenAI-compatible HTTP API over the engine's streams (FastAPI).

    POST /v1/chat/completions   messages in the tokenizer's chat template
    POST /v1/completions        prompt strings (special tokens added) or lists of token ids, one or a batch
    GET  /v1/models  /health  /metrics

`"stream": true` answers with server-sent events: `data: {chunk}` per text delta, a chunk with the
finish reason, a usage chunk when `stream_options.include_usage` (off by default, as with OpenAI;
`continuous_usage_stats` puts the usage so far on every chunk, as vLLM does), then `data: [DONE]`.
Each prompt of a batch is one engine request of `n` samples (one prefill, the samples forked from it);
choice p * n + i is sample i of prompt p. Streamed and whole answers come out of one path
(`rlkv.serve.responses`: the engine's outputs, decoded by one `Detokenizer` per sample), so the
deltas concatenate to exactly the non-streamed text. A client that disconnects (streaming or not)
aborts its requests. Errors are OpenAI's JSON body
`{"error": {"message", "type", "param", "code"}}`: 400 for a bad body or a request that can never
run, 401 without the API key (`rlkv.serve.auth`), 404 for an unknown model, 413 for a body over
`max_body_bytes`, 500 for a request the engine failed on, 503 while the engine restarts or the server
shuts down. /health answers 200 `{"status": "ok"}` while requests can run (behind `Replicas`: "degraded"
while some replicas are down, with each one's state), else 503 with why.

The event loop never waits on work: a body is read up to its size limit, then parsed, templated,
tokenized and checked in a small thread pool; each request's text is decoded in the engine
transport's thread (`rlkv.serve.async_engine`); the objects alive at start-up (the model's
tokenizer, the libraries) are frozen out of the garbage collector's full passes.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from rlkv.engine import Engine, RequestError, RequestOutput, SamplingParams
from rlkv.serve import protocol as p
from rlkv.serve.async_engine import AsyncEngine, EngineStopped, RequestFailed, Streams
from rlkv.serve.auth import ApiKeyMiddleware
from rlkv.serve.detokenize import Detokenizer
from rlkv.serve.errors import ApiError, describe_validation
from rlkv.serve.logprobs import LogprobTexts
from rlkv.serve.metrics import CONTENT_TYPE, ServerMetrics
from rlkv.serve.reasoning import ReasoningParser
from rlkv.serve.replicas import Replicas
from rlkv.serve.responses import Answer

MIN_BODY_BYTES = 1 << 20
BODY_BYTES_PER_TOKEN = 64  # a prompt of max_seq_len tokens as JSON text or ids, escapes and all, fits


def default_max_body_bytes(max_seq_len: int) -> int:
    """The body limit unless one is given: room for a prompt of the whole context, at least 1 MiB."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_seq_len)


Body = TypeVar("Body", bound=BaseModel)


@dataclass
class _Prepared:
    """A request made ready off the event loop: parsed, its prompts tokenized and checked against the engine."""

    req: p.ChatCompletionRequest | p.CompletionRequest
    prompts: list[list[int]]
    params: SamplingParams
    echo: list[str] | None  # the prompts' texts, for a completion that echoes them


class _Handlers:
    """The handlers' shared state: the engine's online layer, the tokenizer, the served name, limits, metrics."""

    def __init__(
        self,
        runner: Streams | Replicas,
        tokenizer,
        model_name: str,
        default_max_tokens: int,
        max_body_bytes: int,
        reasoning: ReasoningParser | None = None,
    ):
        self.runner, self.tokenizer, self.model_name = runner, tokenizer, model_name
        self.default_max_tokens, self.max_body_bytes = default_max_tokens, max_body_bytes
        self.reasoning = reasoning
        self.texts = LogprobTexts(tokenizer)
        self.metrics = ServerMetrics(runner)
        self.created = p.now()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rlkv-prepare")

    # ------------------------------------------------------------------ endpoints
    async def chat(self, raw: Request) -> Response:
        return await self._serve(raw, chat=True)

    async def completions(self, raw: Request) -> Response:
        return await self._serve(raw, chat=False)

    async def models(self, raw: Request) -> p.ModelList:
        return p.ModelList(
            data=[p.ModelCard(id=self.model_name, created=self.created, max_model_len=self.runner.max_seq_len)]
        )

    async def health(self, raw: Request) -> Response:
        if (why := self.runner.status()) is not None:
            code = "engine_restarting" if self.runner.restarting is not None else "engine_unavailable"
            raise ApiError(503, str(why), type="service_unavailable_error", code=code)
        return JSONResponse(self.runner.health())

    async def metrics_text(self, raw: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ requests
    async def _serve(self, raw: Request, chat: bool) -> Response:
        arrival = time.perf_counter()
        body = await self._body(raw)
        ready = await asyncio.get_running_loop().run_in_executor(self.pool, self._prepare, body, chat)
        return await self._answer(raw, ready, chat, arrival)

    async def _body(self, raw: Request) -> bytes:
        """The request body, refused (413) as soon as it is known to exceed the limit: by its declared length
        before reading, else while reading."""
        declared = raw.headers.get("content-length", "")
        size, chunks = int(declared) if declared.isdigit() else 0, []
        if size <= self.max_body_bytes:
            size = 0
            async for chunk in raw.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    break
                chunks.append(chunk)
        if size > self.max_body_bytes:
            raise ApiError(
                413,
                f"the request body exceeds {self.max_body_bytes} bytes (the server's --max-body-bytes)",
                code="request_too_large",
            )
        return b"".join(chunks)

    def _prepare(self, body: bytes, chat: bool) -> _Prepared:
        """Parse, template, tokenize and check a request (in the pool: this is the work a request brings)."""
        req = _parse(p.ChatCompletionRequest if chat else p.CompletionRequest, body)
        self._check_model(req.model)
        if isinstance(req, p.ChatCompletionRequest):
            prompts = [self._chat_prompt(req)]
        else:
            prompts = [self._plain_prompt(x) for x in req.prompts]
        params = self._params(req, max(map(len, prompts)))
        for i, prompt_ids in enumerate(prompts):
            try:
                self.runner.check_request(prompt_ids, params)
            except RequestError as err:
                if len(prompts) > 1:
                    err = RequestError(f"prompt {i}: {err}", err.param)
                raise _api_error(err, chat) from None
        echo = None
        if isinstance(req, p.CompletionRequest) and req.echo:
            skip = req.skip_special_tokens
            echo = [
                x if isinstance(x, str) else self.tokenizer.decode(x, skip_special_tokens=skip) for x in req.prompts
            ]
        return _Prepared(req, prompts, params, echo)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _chat_prompt(self, req: p.ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "the model's tokenizer has no chat template: use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template's own checks (e.g. roles must alternate) raise jinja errors
            raise ApiError(400, f"the chat template rejected the messages: {err}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _plain_prompt(self, prompt: str | list[int]) -> list[int]:
        """A string gets the tokenizer's special tokens; token ids go as they are (checked against the vocabulary)."""
        return self.tokenizer(prompt).input_ids if isinstance(prompt, str) else prompt

    def _params(self, req, longest_prompt: int) -> SamplingParams:
        limit = req.token_limit
        if limit is None:
            limit = max(1, min(self.default_max_tokens, self.runner.max_seq_len - longest_prompt))
        if isinstance(req, p.ChatCompletionRequest):
            top, prompt = (req.top_logprobs or 0) if req.logprobs else 0, None
        else:
            top = req.logprobs or 0
            prompt = req.logprobs if req.echo and req.logprobs is not None else (0 if limit == 0 else None)
        try:
            return SamplingParams(
                max_tokens=limit,
                n=req.n,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=req.seed if req.seed is not None else random.getrandbits(31),
                stop=tuple(req.stops),
                stop_token_ids=tuple(req.stop_token_ids),
                ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens,
                repetition_penalty=req.repetition_penalty,
                frequency_penalty=req.frequency_penalty,
                presence_penalty=req.presence_penalty,
                top_logprobs=top,
                prompt_logprobs=prompt,
            )
        except ValueError as err:  # the schema holds every bound SamplingParams checks: a safety net
            raise ApiError(400, str(err)) from None

    async def _answer(self, raw: Request, ready: _Prepared, chat: bool, arrival: float) -> Response:
        req, params = ready.req, ready.params
        rid = p.request_id("chatcmpl" if chat else "cmpl")
        streams = []
        try:
            for i, prompt_ids in enumerate(ready.prompts):
                decoders = [Detokenizer(self.tokenizer, params.stop, req.skip_special_tokens) for _ in range(req.n)]
                key = rid if len(ready.prompts) == 1 else f"{rid}-{i}"
                streams.append(self.runner.generate(key, prompt_ids, params, decoders))
        except (RequestError, EngineStopped) as err:
            raise _api_error(err, chat) from None
        response = Answer(
            dict(id=rid, created=p.now(), model=self.model_name),
            ready.prompts,
            req.n,
            self.texts,
            logprobs=_logprobs(req),
            echo=ready.echo,
            reasoning=self.reasoning if chat else None,
            include_usage=req.include_usage,
            continuous_usage=req.continuous_usage,
        )
        outputs = self._observed(_merged(streams), arrival)
        if req.stream:
            events = response.chat_chunks(outputs) if chat else response.completion_chunks(outputs)
            self.metrics.count(raw, 200)
            return StreamingResponse(_sse(events), media_type="text/event-stream")
        whole = response.chat_response(outputs) if chat else response.completion_response(outputs)
        body = await _unless_disconnected(raw, whole, chat)
        self.metrics.count(raw, 200)
        return JSONResponse(body.model_dump(mode="json"))

    async def _observed(
        self, outputs: AsyncGenerator[tuple[int, RequestOutput], None], arrival: float
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """The outputs, timed: the first token's arrival and the last output's."""
        first = True
        async with aclosing(outputs):
            async for item in outputs:
                if first and item[1].new_token_ids:
                    self.metrics.ttft.observe(time.perf_counter() - arrival)
                    first = False
                yield item
        self.metrics.latency.observe(time.perf_counter() - arrival)


async def _merged(
    streams: list[AsyncGenerator[RequestOutput, None]],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """The outputs of the streams of a batch's prompts as (prompt index, output), as they come; leaving early (or
    an error in one) closes them all, which aborts their requests."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as stream:
            async for out in stream:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream):
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as err:  # the engine refused, failed on or lost the request: the whole batch fails
            queue.put_nowait((i, err))
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                live -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def _logprobs(req: p.ChatCompletionRequest | p.CompletionRequest) -> int | None:
    """How many top log-probs an answer gives per token (0: the token's own alone), None for no log-probs."""
    if isinstance(req, p.ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def _api_error(err: Exception, chat: bool) -> ApiError:
    """The HTTP answer to a request the engine refused, failed on, or could not take."""
    if isinstance(err, EngineStopped):
        return ApiError(503, str(err), type="service_unavailable_error")
    if isinstance(err, RequestFailed):
        return ApiError(500, str(err), type="internal_error")
    param = getattr(err, "param", None)
    return ApiError(400, str(err), param="messages" if chat and param == "prompt" else param)


async def _unless_disconnected(raw: Request, work, chat: bool):
    """Await `work`, cancelling it (which aborts its request) if the client disconnects first."""

    async def disconnected():
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ApiError(499, "the client disconnected", type="client_disconnected")
    try:
        return task.result()
    except (EngineStopped, RequestFailed, RequestError) as err:
        raise _api_error(err, chat) from None


async def _sse(events: AsyncGenerator[BaseModel, None]) -> AsyncGenerator[str, None]:
    """Server-sent events: `data: <json>` per chunk, an error event if the request fails midway, `data: [DONE]`."""
    async with aclosing(events):
        try:
            async for event in events:
                yield f"data: {event.model_dump_json()}\n\n"
        except (EngineStopped, RequestFailed, RequestError) as err:
            error = _api_error(err, chat=False)
            info = p.ErrorInfo(message=error.message, type=error.type, code=error.code)
            yield f"data: {p.ErrorResponse(error=info).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def _parse(model: type[Body], body: bytes) -> Body:
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        message, param = describe_validation(err)
        raise ApiError(400, message, param=param) from None


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the request bodies, which the handlers parse themselves (off the event loop)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = FastAPI.openapi(app)  # cached in app.openapi_schema, completed here
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (p.ChatCompletionRequest, p.CompletionRequest):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    return schema


def _body_of(model: type[BaseModel]) -> dict:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def create_app(
    engine: Engine | Streams | Replicas,
    tokenizer,
    model_name: str,
    default_max_tokens: int = 1024,
    max_body_bytes: int | None = None,
    api_key: str | None = None,
    protect_metrics: bool = False,
    reasoning_parser: str | None = None,
) -> FastAPI:
    """The app serving `engine` as `model_name`: an Engine (run in a thread of this process), an
    `EngineProcess` or `Replicas` of them; it runs while the app's lifespan does.

    `default_max_tokens`: a request's token limit when it names none (cut to the context left).
    `max_body_bytes`: the largest request body read (default: `default_max_body_bytes`). `api_key`: the
    bearer token /v1/... (and /metrics if `protect_metrics`) require; /health never does.
    `reasoning_parser`: "deepseek-r1" or "qwen3" splits chat answers' <think> ... </think> into
    `reasoning_content` (`rlkv.serve.reasoning`)."""
    runner = AsyncEngine(engine) if isinstance(engine, Engine) else engine
    reasoning = ReasoningParser(reasoning_parser, tokenizer) if reasoning_parser else None
    server = _Handlers(
        runner,
        tokenizer,
        model_name,
        default_max_tokens,
        max_body_bytes or default_max_body_bytes(runner.max_seq_len),
        reasoning,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.runner.start()
        gc.collect()
        gc.freeze()  # what lives now is never garbage: full collections need not walk it (as vLLM does)
        yield
        server.runner.join(timeout=30)
        server.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rlkv", summary="OpenAI-compatible API over rlkv's engine", lifespan=lifespan)
    app.state.runner = server.runner  # the signal hook shuts it down (rlkv.serve.server)
    app.add_api_route(
        "/v1/chat/completions", server.chat, methods=["POST"], openapi_extra=_body_of(p.ChatCompletionRequest)
    )
    app.add_api_route(
        "/v1/completions", server.completions, methods=["POST"], openapi_extra=_body_of(p.CompletionRequest)
    )
    app.add_api_route("/v1/models", server.models, methods=["GET"], response_model=p.ModelList)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    app.openapi = lambda: _openapi(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, key=api_key, protect_metrics=protect_metrics)

    async def api_error(raw: Request, err: ApiError) -> JSONResponse:
        server.metrics.count(raw, err.status)
        return err.response()

    async def http_error(raw: Request, err: HTTPException) -> JSONResponse:
        server.metrics.count(raw, err.status_code)
        return ApiError(err.status_code, str(err.detail), type="invalid_request_error").response()

    async def internal_error(raw: Request, err: Exception) -> JSONResponse:
        server.metrics.count(raw, 500)
        return ApiError(500, f"internal error: {type(err).__name__}: {err}", type="internal_error").response()

    # Starlette types a handler as taking any Exception; it calls each with the class it is registered for
    app.add_exception_handler(ApiError, api_error)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(HTTPException, http_error)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(Exception, internal_error)  # logged with its traceback by Starlette
    return app
