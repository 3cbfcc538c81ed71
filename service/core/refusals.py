"""Refusals: every bad input becomes a 4xx JSON body with a reason code, never a 500.

The one place error bodies are written: the endpoints raise (or model/ raises
its typed errors, model.errors), `refusal_for` maps what was raised to a
Refusal once, and a Refusal renders itself -- as a Starlette response, which
is also an ASGI app, so the guards in front of BentoML (service.http.guards) send
the very same bodies.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from model.errors import ModelRequestError


class Refusal(Exception):
    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}

    @classmethod
    def overloaded(cls, retry_after_s: int) -> Refusal:
        """503 + Retry-After: the model is at capacity (admission control, or the model service shed it)."""
        return cls(503, "overloaded", "the model is at capacity; retry shortly", {"Retry-After": str(retry_after_s)})

    @classmethod
    def model_unavailable(cls, retry_after_s: int, detail: str) -> Refusal:
        """503 + Retry-After: the split layout's model worker stopped mid-request and was not back within
        the latency budget (service.runtime.backend.RemoteBackend); BentoML is starting another."""
        return cls(503, "model_unavailable", detail, {"Retry-After": str(retry_after_s)})

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.reason, self.detail), status_code=self.status, headers=self.headers)

    def oip_response(self) -> JSONResponse:
        """The Open Inference Protocol's error body (service.oip.app): one message, reason code first."""
        return JSONResponse({"error": f"{self.reason}: {self.detail}"}, status_code=self.status, headers=self.headers)


def error_body(reason: str, detail: str) -> dict[str, str]:
    """The documented error body (schemas.ErrorBody): a stable reason code, and what was wrong for people."""
    return {"error": reason, "detail": detail}


def refusal_for(err: Exception, retry_after_s: int) -> Refusal | None:
    """The answer to an exception raised while serving a request; None for a real fault (a 500)."""
    from bentoml.exceptions import ServiceUnavailable

    if isinstance(err, Refusal):
        return err
    if isinstance(err, ModelRequestError):  # model/'s typed refusals: what was asked does not fit the model
        return Refusal(422, err.reason, str(err))
    if isinstance(err, ServiceUnavailable):  # the model service shed it: it would have missed the latency budget
        return Refusal.overloaded(retry_after_s)
    return None
