"""OpenAI-style error answers: `ApiError` carries the status and the body fields; validation
errors of a request body become one readable line naming the field."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rlkv.serve.protocol import ErrorInfo, ErrorResponse, FieldError

_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(ErrorResponse(error=info).model_dump(mode="json"), status_code=self.status)


def _field_path(loc: tuple) -> list:
    """The field path of an error location, without pydantic's union-member tags ('str', 'list[int]', ...)."""
    return [
        part
        for part in loc
        if not (isinstance(part, str) and ("[" in part or part.lower() in _UNION_TAGS or part[:1].isupper()))
    ]


def describe_validation(err: ValidationError) -> tuple[str, str | None]:
    """(message, param) for a request body that failed validation."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}", None
    path = _field_path(first["loc"])
    cause = first.get("ctx", {}).get("error")
    if not path and isinstance(cause, FieldError):  # found across fields, blamed on one
        return str(cause), cause.param
    name = ".".join(str(part) for part in path) or "body"
    if first["type"] == "extra_forbidden":
        return f"{name}: unsupported field", name
    if first["type"] == "model_type" and not path:
        return "the request body must be a JSON object", None
    causes = {
        e["msg"].removeprefix("Value error, ") for e in err.errors() if _field_path(e["loc"])[: len(path)] == path
    }
    message = "; ".join(sorted(causes)) if len(causes) <= 3 else first["msg"]
    return f"{name}: {message}", name if path else None
