"""The worker's running service, for the parts BentoML builds apart from it.

The Open Inference Protocol's and the introspection routes (Starlette apps BentoML
mounts) and the guards (ASGI middleware BentoML instantiates) are built before the
service object exists. They are handed one `Running` when the service module is
imported (service.service), and the service fills it in once it has started; until
then -- and in the split layout's model worker, which serves no HTTP clients -- it is
empty, and they let requests through to BentoML (which answers 503 while not ready)
or answer "not ready" themselves.
"""

from __future__ import annotations

from typing import Any

from service.core.refusals import Refusal


class Running:
    def __init__(self) -> None:
        self.service: Any = None  # the worker's CNNService, once its __init__ is done

    @property
    def pipeline(self) -> Any:
        """The service's request pipeline (service.runtime.pipeline), or None before it has started."""
        return getattr(self.service, "pipeline", None)

    def refusal_response(self, endpoint: str | None, err: Exception, oip: bool = False):
        """The pipeline's answer to `err` (Pipeline.refusal_response: counted when `endpoint` is given); before
        the service has started, a refusal as it is (uncounted), anything else raised again."""
        if self.pipeline is not None:
            return self.pipeline.refusal_response(endpoint, err, oip)
        if isinstance(err, Refusal):
            return err.oip_response() if oip else err.response()
        raise err
