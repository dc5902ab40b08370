"""OpenAI error envelope and the exception handlers that map failures onto HTTP statuses.

User errors are always 4xx: the openai SDK retries every 5xx, so a bad request answered
with a 500 would be sent three times.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from afd.sampling_params import SamplingError
from afd.server.engine_client import EngineError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an HTTP status; raised anywhere in request handling."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST
    error_type: str = "BadRequestError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequestError(APIError):
    pass


class NotFoundError(APIError):
    status = HTTPStatus.NOT_FOUND
    error_type = "NotFoundError"


class AuthenticationError(APIError):
    status = HTTPStatus.UNAUTHORIZED
    error_type = "AuthenticationError"


class NotImplementedAPIError(APIError):
    status = HTTPStatus.NOT_IMPLEMENTED
    error_type = "NotImplementedError"


class InternalServerError(APIError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "InternalServerError"


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def error_response(err: APIError) -> JSONResponse:
    body = error_body(err.message, err.error_type, int(err.status), err.param)
    return JSONResponse(body, status_code=int(err.status))


def to_api_error(exc: BaseException) -> APIError:
    """Classify any exception raised while serving one request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SamplingError):
        return BadRequestError(str(exc), param=str(exc).split(" ", 1)[0])
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return BadRequestError(str(exc))
    if isinstance(exc, NotImplementedError):
        return NotImplementedAPIError(str(exc) or "not implemented")
    if isinstance(exc, EngineError):
        return InternalServerError(f"engine error: {exc}")
    logger.exception("internal error while serving a request", exc_info=exc)
    return InternalServerError(f"internal server error: {type(exc).__name__}")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    parts, param = [], None
    for err in errors:
        if err.get("type") == "json_invalid":  # its loc is a character offset, not a field
            where = err.get("loc", ("body", "?"))[-1]
            detail = (err.get("ctx") or {}).get("error") or err.get("msg", "")
            return f"the body is not valid JSON at character {where}: {detail}", None
        path = [str(x) for x in err.get("loc", ()) if x != "body"]
        loc = ".".join(path)
        param = param or (path[0] if path else None)
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    count = len(errors)
    noun = "error" if count == 1 else "errors"
    return f"{count} validation {noun}: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(BadRequestError(message, param=param))

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        name = status.phrase.replace(" ", "")  # BadRequest -> BadRequestError, as APIError's
        kind = name if name.endswith("Error") else name + "Error"
        return JSONResponse(
            error_body(str(exc.detail), kind, status.value), status_code=status.value
        )

    @app.exception_handler(Exception)
    async def _on_any(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))
