"""OpenAI-style error bodies, `{"error": {"message", "type", "param", "code"}}`, and the
exception handlers that map every known failure to a 4xx (a 500 means a bug or a failed
engine step, never bad input)."""
from __future__ import annotations

import logging
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.runtime import RequestFailed
from .engine import AdapterConflict, ModelNotFound, QueueFull

log = logging.getLogger("bsharedrag.server")

ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
    500: "server_error", 503: "server_error",
}  # fmt: skip


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_error(errors: list) -> APIError:
    e = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}",
                        code="invalid_json")
    if not loc and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return APIError(400, "request body must be a JSON object (sent as Content-Type: application/json)",
                        code="invalid_json")
    where = ".".join(loc)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return APIError(400, f"{where}: {e['msg']}{more}" if where else f"{e['msg']}{more}",
                    param=loc[0] if loc else None, code="invalid_value")


def error_id() -> str:
    """A short id that ties a 500 to its line in the server log."""
    return uuid.uuid4().hex[:12]


def request_error(handle) -> APIError:
    """The API error of a request the engine failed alone (RequestFailed: 4xx when its own
    values caused it), or a 500 with an id that its log line carries."""
    err = handle.error
    if isinstance(err, RequestFailed) and err.status < 500:
        return APIError(err.status, str(err), code="invalid_value")
    eid = error_id()
    log.error("request %s failed in the engine (error id %s): %r", handle.id, eid, err)
    what = str(err) if isinstance(err, RequestFailed) else f"{type(err).__name__}; the server log has the details"
    return APIError(500, f"request failed in the engine (error id {eid}): {what}", code="internal_error")


def install_error_handlers(app: FastAPI, served_models) -> None:
    """served_models(): the names a 404 for an unknown model lists."""

    def handler(exc_type, to_api_error):
        async def handle(request: Request, exc):
            err = to_api_error(exc)
            return error_response(err.status, err.message, err.param, err.code, err.headers)

        app.add_exception_handler(exc_type, handle)

    handler(APIError, lambda e: e)
    handler(RequestValidationError, lambda e: _validation_error(e.errors()))
    handler(StarletteHTTPException, lambda e: APIError(
        e.status_code, e.detail if isinstance(e.detail, str) else str(e.detail),
        code="not_found" if e.status_code == 404 else None, headers=getattr(e, "headers", None)))
    handler(ModelNotFound, lambda e: APIError(
        404, f"The model `{e.args[0]}` does not exist; served models: {served_models()}", param="model",
        code="model_not_found"))
    handler(QueueFull, lambda e: APIError(429, f"server busy: {e}; retry later", code="queue_full",
                                          headers={"Retry-After": "1"}))
    handler(AdapterConflict, lambda e: APIError(409, str(e), param="name", code="adapter_exists"))
    handler(ValueError, lambda e: APIError(400, str(e), code="invalid_value"))

    async def internal(request: Request, exc: Exception):
        eid = error_id()
        log.error("unhandled error on %s (error id %s)", request.url.path, eid, exc_info=exc)
        return error_response(500, f"internal error {eid}: {type(exc).__name__}; the server log has the details",
                              code="internal_error")

    app.add_exception_handler(Exception, internal)
