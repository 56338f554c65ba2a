"""`ApiKeyMiddleware`: the server's API key (`rlkv serve --api-key`, or `RLKV_API_KEY`), as OpenAI's API takes one.

Requests to /v1/... (and /metrics, if asked) must carry `Authorization: Bearer <key>`; anything else
is answered 401 in OpenAI's error shape before the app sees it. /health stays open for load
balancers and supervisors. Keys are compared as SHA-256 digests with `hmac.compare_digest`, so the
time taken says nothing about how much of a guess was right, nor about the key's length.
"""

from __future__ import annotations

import hashlib
import hmac

from rlkv.serve.errors import ApiError


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class ApiKeyMiddleware:
    """Pure ASGI: checks the bearer token of protected paths, passes everything else through untouched."""

    def __init__(self, app, key: str, protect_metrics: bool = False):
        self.app, self._digest = app, _digest(key.encode())
        self._prefixes = ("/v1", "/metrics") if protect_metrics else ("/v1",)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self._prefixes) and not self._authorized(scope):
            error = ApiError(
                401,
                "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
            response = error.response()
            response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        return hmac.compare_digest(_digest(token.strip()), self._digest) and scheme.lower() == b"bearer"
