"""Refusals: every bad input becomes a 4xx JSON body with a reason code, never a 500."""

from __future__ import annotations

from starlette.responses import JSONResponse


class Refusal(Exception):
    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.reason, "detail": self.detail}, status_code=self.status,
                            headers=self.headers)
