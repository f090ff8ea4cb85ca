"""The FastAPI app: OpenAI routes under /v1, Anthropic's /v1/messages and vLLM's /invocations (behind the
optional API key), and the operations routes (/health, /ping, /metrics, /tokenize, /detokenize, /version)
beside them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from glm4serve import __version__
from glm4serve.engine.client import EngineClient
from glm4serve.model.tokenizer import Tokenizer

from .adapters import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest, load_lora_adapter, unload_lora_adapter
from .anthropic import count_tokens, create_message
from .anthropic_request import CountTokensRequest, MessagesRequest
from .chat import chat_completions
from .completions import completions
from .conversations import (
    AddItemsRequest,
    ConversationStore,
    CreateConversationRequest,
    UpdateConversationRequest,
    list_page,
    new_items,
)
from .errors import APIError, install_error_handlers, invalid_request, validation_error
from .background import BackgroundResponses
from .gate import OPEN_PATHS, RETRY_AFTER_DRAINING, Gate, GateMiddleware
from .limits import check_chat_limits, check_completion_limits
from .logprobs import token_text_and_bytes
from .metrics import CONTENT_TYPE, Metrics
from .replies import ModelCard, ModelList
from .response_store import ResponseStore
from .responses import count_input_tokens, create_response, find_stored
from .responses_request import ResponsesRequest
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving import ServingContext
from .settings import ServerSettings
from .stats_log import StatsLog
from .streaming import StreamEnd, sse_response

log = logging.getLogger("glm4serve.api")

PAGE_SIZE, MAX_PAGE_SIZE = 20, 100  # the items of a list route's page, by default and at most (OpenAI's)


def create_app(engine: EngineClient | None, tokenizer: Tokenizer, settings: ServerSettings, model_name: str,
               max_model_len: int) -> FastAPI:
    """`engine` may be None while the model loads (/health answers 503 until
    `app.state.serving.engine` is set)."""
    app = FastAPI(title="glm4serve", version=__version__, lifespan=_stats_logged if not settings.disable_log_stats
                  else None)
    gate = Gate.from_settings(settings)
    response_store = ResponseStore(settings.response_store_memory)
    ctx = ServingContext(engine=engine, tokenizer=tokenizer, settings=settings, model_name=model_name,
                         max_model_len=max_model_len, metrics=Metrics(lambda: _stats(ctx), model_name),
                         response_store=response_store,
                         conversations=ConversationStore(settings.conversation_store_memory),
                         background=BackgroundResponses(gate, response_store, settings.sse_ping_seconds),
                         loras=dict(settings.lora_modules))
    app.state.serving = ctx
    install_error_handlers(app)
    app.state.gate = gate  # the server's SIGTERM handler sets gate.draining
    app.add_middleware(GateMiddleware, gate=gate, metrics=ctx.metrics)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    log.info("routes %s", "other than the probes' and /metrics take only requests with the API key"
             if settings.api_key else "are open (no API key)")
    ctx.metrics.admitted.set_function(lambda: gate.num_generating)
    if settings.cors_allowed_origins:  # added last: outermost, so refusals carry CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allowed_origins,
                           allow_methods=["*"], allow_headers=["*"])
    for router in (_generation_routes(ctx), _stored_response_routes(ctx), _conversation_routes(ctx),
                   _model_routes(ctx), _ops_routes(ctx, gate), _token_routes(ctx)):
        app.include_router(router)
    return app


def _generation_routes(ctx: ServingContext) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v1/chat/completions")
    async def _chat(body: ChatCompletionRequest, request: Request):
        check_chat_limits(body, ctx.settings)
        return await chat_completions(ctx, body, request)

    @routes.post("/v1/completions")
    async def _completions(body: CompletionRequest, request: Request):
        check_completion_limits(body, ctx.settings)
        return await completions(ctx, body, request)

    @routes.post("/v1/responses")
    async def _responses(body: ResponsesRequest, request: Request):
        return await create_response(ctx, body, request)

    @routes.post("/v1/responses/input_tokens")
    async def _count_input_tokens(body: ResponsesRequest):
        return await count_input_tokens(ctx, body)

    @routes.post("/v1/messages")
    async def _messages(body: MessagesRequest, request: Request):
        return await create_message(ctx, body, request)

    @routes.post("/v1/messages/count_tokens")
    async def _count_message_tokens(body: CountTokensRequest):
        return await count_tokens(ctx, body)

    @routes.post("/invocations")
    async def _invocations(request: Request):
        """vLLM's route for SageMaker, which sends every request there: a body with `messages` is a chat completion
        request, one with `prompt` a completion request."""
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep for the parser
            raise invalid_request(f"request body is not valid JSON: {e}") from None
        kind = next((k for k in ("messages", "prompt") if isinstance(body, dict) and k in body), None)
        if kind is None:
            raise invalid_request("/invocations takes a chat completion request (with messages) or a completion "
                                  "request (with prompt)")
        try:
            parsed = (ChatCompletionRequest if kind == "messages" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            raise validation_error(RequestValidationError(e.errors())) from None
        return await (_chat if kind == "messages" else _completions)(parsed, request)

    return routes


def _stored_response_routes(ctx: ServingContext) -> APIRouter:
    v1 = APIRouter(prefix="/v1/responses")

    @v1.post("/compact", include_in_schema=False)  # else a 405, the path of a stored response's GET
    async def _compact():
        raise APIError(404, "POST /v1/responses/compact is not served here: its compaction items are OpenAI's "
                            "own. Continue with previous_response_id or conversation, or send the context as input.",
                       "invalid_request_error", code="not_found")

    @v1.get("/{response_id}")
    async def _get_response(response_id: str, stream: bool = False, starting_after: int = Query(-1, ge=-1)):
        job = ctx.background.get(response_id)
        if stream and job is not None:
            return sse_response(ctx.background.follow(job, starting_after), ctx.settings, StreamEnd(done=None))
        if job is not None and not job.done:
            return JSONResponse(job.snapshot())
        stored = find_stored(ctx, response_id)
        if stream:
            raise APIError(400, "stream=true replays a background response's events, and this response is not "
                                "one whose events are still kept", "invalid_request_error", "stream")
        return JSONResponse(stored.response)

    @v1.delete("/{response_id}")
    async def _delete_response(response_id: str):
        job = ctx.background.get(response_id)
        if job is not None:
            await ctx.background.drop(job)
        else:
            find_stored(ctx, response_id)
        ctx.response_store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @v1.get("/{response_id}/input_items")
    async def _input_items(response_id: str, limit: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None):
        job = ctx.background.running(response_id)
        items = job.builder.input_items if job is not None else find_stored(ctx, response_id).input_items
        return list_page(items, limit, order, after, "response")

    @v1.post("/{response_id}/cancel")
    async def _cancel_response(response_id: str):
        job = ctx.background.running(response_id)
        if job is not None:
            return JSONResponse(await ctx.background.cancel(job))
        stored = find_stored(ctx, response_id)
        if stored.response.get("background"):  # it ended before: as it is
            return JSONResponse(stored.response)
        raise APIError(400, "Only background responses can be cancelled.", "invalid_request_error")

    return v1


def _conversation_routes(ctx: ServingContext) -> APIRouter:
    v1 = APIRouter(prefix="/v1/conversations")
    store = ctx.conversations

    @v1.post("")
    async def _create(body: CreateConversationRequest | None = None):
        body = body or CreateConversationRequest()
        return store.create(body.metadata or {}, new_items(body.items or [], ctx.response_store)).resource

    @v1.get("/{conversation_id}")
    async def _get(conversation_id: str):
        return store.find(conversation_id).resource

    @v1.post("/{conversation_id}")
    async def _update(conversation_id: str, body: UpdateConversationRequest):
        conversation = store.find(conversation_id)
        store.update(conversation, body.metadata or {})
        return conversation.resource

    @v1.delete("/{conversation_id}")
    async def _delete(conversation_id: str):
        store.delete(store.find(conversation_id).id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @v1.post("/{conversation_id}/items")
    async def _add_items(conversation_id: str, body: AddItemsRequest):
        conversation = store.find(conversation_id)
        items = new_items(body.items, ctx.response_store)
        if not items:
            raise invalid_request("No item to add: reasoning items, and calls of tools this server does not run, "
                                  "are dropped.", "items")
        store.add(conversation, items)
        return list_page(items, len(items), "asc", None, "conversation")

    @v1.get("/{conversation_id}/items")
    async def _items(conversation_id: str, limit: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
                     order: Literal["asc", "desc"] = "desc", after: str | None = None):
        return list_page(store.find(conversation_id).items, limit, order, after, "conversation")

    @v1.get("/{conversation_id}/items/{item_id}")
    async def _item(conversation_id: str, item_id: str):
        return store.find(conversation_id).item(item_id)

    @v1.delete("/{conversation_id}/items/{item_id}")
    async def _delete_item(conversation_id: str, item_id: str):
        conversation = store.find(conversation_id)
        store.delete_item(conversation, item_id)
        return conversation.resource

    return v1


def _model_routes(ctx: ServingContext) -> APIRouter:
    """The served model under each of its names, its LoRA adapters, and their loading."""
    v1 = APIRouter(prefix="/v1")

    def model_cards() -> list[ModelCard]:
        base = [ModelCard(id=name, created=ctx.created, max_model_len=ctx.max_model_len,
                          root=ctx.settings.model or ctx.model_name)
                for name in (ctx.model_name, *ctx.settings.model_aliases)]
        return base + [ModelCard(id=name, created=ctx.created, max_model_len=ctx.max_model_len, root=path,
                                   parent=ctx.model_name) for name, path in ctx.loras.items()]

    @v1.get("/models")
    async def _models():
        return ModelList(data=model_cards()).model_dump()

    @v1.get("/models/{model_id:path}")  # hub ids have a slash: THUDM/glm-4-9b-chat
    async def _model(model_id: str):
        card = next((c for c in model_cards() if c.id == model_id), None)
        if card is None:
            raise ctx.unknown_model(model_id)
        return card.model_dump()

    @v1.post("/load_lora_adapter")
    async def _load_lora_adapter(body: LoadLoRAAdapterRequest):
        return await load_lora_adapter(ctx, body)

    @v1.post("/unload_lora_adapter")
    async def _unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        return await unload_lora_adapter(ctx, body)

    return v1


def _ops_routes(ctx: ServingContext, gate: Gate) -> APIRouter:
    """What probes, scrapers and deploy tools read."""
    ops = APIRouter()

    @ops.get("/health")
    @ops.head("/health", include_in_schema=False)  # probes that want the status alone; one operation in the schema
    async def _health():
        if gate.draining:
            return APIError(503, "shutting down", "service_unavailable_error",
                            headers={"Retry-After": RETRY_AFTER_DRAINING}).response()
        if ctx.engine is None or not ctx.engine.is_alive:
            what = "loading model" if ctx.engine is None else "the engine loop has stopped"
            return APIError(503, what, "service_unavailable_error").response()
        replicas = ctx.engine.replica_stats()
        if replicas:  # several engines: up while one is, and how many
            return {"status": "ok", "replicas_up": len(replicas), "replicas": ctx.settings.num_replicas}
        return {"status": "ok"}

    @ops.get("/ping")
    @ops.head("/ping", include_in_schema=False)
    async def _ping():
        return {"status": "ok"}

    @ops.get("/metrics")
    async def _metrics():
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @ops.get("/version")
    async def _version():
        return {"version": __version__}

    return ops


def _token_routes(ctx: ServingContext) -> APIRouter:
    tokens = APIRouter()

    @tokens.post("/tokenize")
    async def _tokenize(body: TokenizeRequest):
        ctx.check_model(body.model)
        if body.prompt is not None:
            ids = await ctx.encode(body.prompt)
            if body.add_special_tokens:
                ids = ctx.tokenizer.with_prefix(ids)
        else:
            tools = [t.as_given() for t in body.tools] if body.tools else None
            ids = await ctx.chat_prompt_ids(body, tools)
        # JSONResponse straight away: FastAPI's jsonable_encoder walks a list in Python, seconds
        # of a blocked event loop for the millions of ids a multi-MB prompt has
        strs = None
        if body.return_token_strs:  # a Python loop over every token: off the event loop
            strs = await asyncio.to_thread(lambda: [token_text_and_bytes(ctx.tokenizer, t)[0] for t in ids])
        return JSONResponse({"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
                             "token_strs": strs})

    @tokens.post("/detokenize")
    async def _detokenize(body: DetokenizeRequest):
        ctx.check_model(body.model)
        ctx.check_token_ids(body.tokens, "tokens")
        return {"prompt": ctx.tokenizer.decode(body.tokens)}

    return tokens


@contextlib.asynccontextmanager
async def _stats_logged(app: FastAPI):
    """vLLM's periodic stats line (stats_log.py) while the app serves."""
    ctx = app.state.serving
    task = asyncio.create_task(StatsLog(ctx.metrics.token_totals, lambda: _stats(ctx)).run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _stats(ctx: ServingContext):
    if ctx.engine is None:
        return None
    try:
        return ctx.engine.replica_stats() or ctx.engine.stats()
    except Exception:  # a scrape must not fail because the engine is in trouble
        log.exception("engine.stats() failed")
        return None


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` (or `x-api-key: <key>`, as Anthropic's clients send it) on every route but
    the probes' and the scraper's (gate.OPEN_PATHS,
    which send no key; a route added later is guarded from the start), checked before anything reads
    the request (a body that is not even JSON gets the 401 too, as vLLM answers), and before the gate's
    limits."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in OPEN_PATHS and not self._authorized(scope):
            refusal = APIError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>` or "
                                    "`x-api-key: <key>`).",
                               "authentication_error", code="invalid_api_key")
            await refusal.response(path)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key):
            return True
        # Anthropic's clients send the key as x-api-key
        return secrets.compare_digest(headers.get(b"x-api-key", b"").strip(), self.api_key)
