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


class Running:
    def __init__(self) -> None:
        self.service: Any = None  # the worker's CNNService, once its __init__ is done

    @property
    def pipeline(self) -> Any:
        """The service's request pipeline (service.runtime.pipeline), or None before it has started."""
        return getattr(self.service, "pipeline", None)
