"""OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}` for every failure; on Anthropic's
Messages API (/v1/messages...) Anthropic's, `{"type": "error", "error": {"type", "message"}}`.

Bad input must be a 4xx: the OpenAI SDK retries 5xx twice, so a 500 for a malformed request
triples the load. FastAPI's own 422 for validation errors is turned into a 400 here.
"""

from __future__ import annotations

import functools
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("glm4serve.api")

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                   503: "service_unavailable_error"}


# Anthropic's error types, by status (anthropic_body)
_ANTHROPIC_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                             404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                             429: "rate_limit_error", 503: "overloaded_error"}
ANTHROPIC_PATH = "/v1/messages"  # its routes: the path and those under it


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        # A lone surrogate echoed from the request (a model name) cannot be encoded as UTF-8:
        # escape it, or rendering this error would itself fail.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        other = "api_error" if self.status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_TYPE_BY_STATUS.get(self.status, other)
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str = "") -> JSONResponse:
        """The error in the envelope of the API that `path` (the request's) belongs to."""
        anthropic = path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")
        return JSONResponse(self.anthropic_body() if anthropic else self.body(), status_code=self.status,
                            headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def server_error(message: str = "internal server error") -> APIError:
    return APIError(500, message, "server_error", None, None)


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error, with the field path as `param` ("messages.0.role")."""
    errors = exc.errors()
    if not errors:
        return invalid_request("invalid request")
    # With unions (content: str | list[parts]) every branch reports; the deepest error is the
    # one that says what is actually wrong ("messages.0.content.0.type: Input should be 'text'").
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return invalid_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    ctx = first.get("ctx") or {}
    # Our cross-field checks (json_checks.invalid) name the offending field in ctx["param"].
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Drop pydantic's union-branch labels ("str", "list[int]", "function-after[...]") from the path.
    loc = [p for p in loc if not _is_union_tag(p)]
    param = ctx.get("param") or (".".join(loc) if loc else None)
    msg = first.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if param and not ctx.get("param"):
        msg = f"{param}: {msg}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return invalid_request(msg, param)


def _is_union_tag(part: str) -> bool:
    return (part in ("str", "int", "float", "bool") or "[" in part or part.startswith(("function-", "literal"))
            or part in _model_names())


@functools.cache
def _model_names() -> frozenset[str]:
    """The class names of pydantic's models: a union labels its model branches with them
    ("tool_choice.NamedToolChoice.function"). Taken at the first error, once every route's are made."""
    names, todo = set(), [BaseModel]
    while todo:
        for model in todo.pop().__subclasses__():
            names.add(model.__name__)
            todo.append(model)
    return frozenset(names)


class UnexpectedErrorMiddleware:
    """Answers an exception that escaped a route with the 500 envelope and keeps it here.

    Starlette's own last-resort handler sends the 500 and then re-raises, and uvicorn answers a
    re-raised exception by dropping the connection: a keep-alive client's next request on it
    would fail. Once a response has started (a stream broke midway) the exception goes on up:
    closing the connection is then the only way to tell the client the body is incomplete."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await server_error().response(scope.get("path", ""))(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Call before adding any other middleware: the catch-all must sit innermost, below the gate's
    request counting and CORS headers, so a 500 passes through them like any other answer."""
    app.add_middleware(UnexpectedErrorMiddleware)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        kind = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in kind.lower():  # `curl -d` without -H sends a form
            came = f"this one came as {kind!r}" if kind else "this one has no Content-Type"
            return invalid_request(f"the request body must be JSON, sent with Content-Type: application/json ({came})"
                                   ).response(request.url.path)
        return validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response(
            request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # For an exception in a middleware above UnexpectedErrorMiddleware.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return server_error().response(request.url.path)
