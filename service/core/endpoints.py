"""Every route the service answers, declared once.

The guards (service.http.guards), the metrics (service.core.metrics) and the OpenAPI
amendments (service.http.rewrites) read this table, so a new endpoint lands by
adding a line here and its handler -- not by editing lists in each of them.

Auth is closed by default: with API_KEY set, every path needs the key but the
ones declared `open` here (health, metrics, the spec and the pages and static
files that show it). A route someone forgets to declare is therefore served
only with the key, never without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    path: str
    method: str = "POST"
    open: bool = False  # served without the API key
    # Refused (503 + Retry-After) before its body is read while the model is full: endpoints that
    # run the model. Admission then charges each request its cost (service.runtime.pipeline.Pipeline.admitted).
    sheddable: bool = False
    cost: str = ""  # what admission charges one request, in single-image forward passes (for the spec)
    # The lane of the model it runs in, whose bound admission also holds it to (service.runtime.admission):
    # "batch" (its images go through the batcher) or "attribution" (one at a time on the machine).
    lane: str = ""
    prefix: bool = False  # also every path under it (mounted static files)
    admin: bool = False  # needs ADMIN_KEY (not API_KEY), and is off when none is set
    pattern: str = ""  # a regular expression the whole path must match instead (paths with parameters)
    metric: str = ""  # the metrics' endpoint label, where the path's first segment is not it

    @property
    def label(self) -> str:
        """The endpoint label of the service's metrics (cnn_images_processed_total{endpoint=...})."""
        return self.metric or self.path.strip("/").split("/")[0]

    def matches(self, path: str) -> bool:
        if self.pattern:
            return re.fullmatch(self.pattern, path) is not None
        return path == self.path or (self.prefix and path.startswith(self.path.rstrip("/") + "/"))


ENDPOINTS: tuple[Endpoint, ...] = (
    # inference: the model runs
    Endpoint("/classify", sheddable=True, lane="batch", cost="one forward pass per image"),
    Endpoint("/embed", sheddable=True, lane="batch", cost="one forward pass per image"),
    Endpoint("/feature_maps", sheddable=True, cost="one forward pass"),
    Endpoint("/gradcam", sheddable=True, lane="attribution", cost="three forward passes (Grad-CAM: a forward and a backward pass)"),
    Endpoint("/explain", sheddable=True, lane="attribution", cost="the method's forward passes (`forward_passes` in the answer)"),
    # the Open Inference Protocol (service.oip.app): infer needs the key and sheds like the others; health is open
    Endpoint("/v2/models/{name}[/versions/{version}]/infer", sheddable=True, lane="batch", metric="v2_infer",
             pattern=r"/v2/models/[^/]+(/versions/[^/]+)?/infer",
             cost="one forward pass per image (two with feature maps)"),
    Endpoint("/v2/health/live", "GET", open=True),
    Endpoint("/v2/health/ready", "GET", open=True),
    # introspection (service.http.introspection)
    Endpoint("/model", "GET"),
    Endpoint("/kernels", "GET"),
    Endpoint("/atlas", "GET"),
    # administration (service.control.moves): move every worker to another model version
    Endpoint("/admin/model", admin=True),
    # safe rollouts (service.control.rollout): a candidate in shadow or canary, judged, promoted or rolled back
    Endpoint("/admin/rollout", admin=True),
    Endpoint("/admin/rollout", "GET", admin=True),
    Endpoint("/admin/rollout", "DELETE", admin=True),
    # open: health probes, metrics, the spec and BentoML's page showing it, the inspector's files
    Endpoint("/livez", "GET", open=True),
    Endpoint("/readyz", "GET", open=True),
    Endpoint("/healthz", "GET", open=True),
    Endpoint("/metrics", "GET", open=True),
    Endpoint("/docs.json", "GET", open=True),
    Endpoint("/schema.json", "GET", open=True),
    Endpoint("/", "GET", open=True),
    Endpoint("/static_content", "GET", open=True, prefix=True),
    Endpoint("/ui", "GET", open=True, prefix=True),
)

INFERENCE: tuple[Endpoint, ...] = tuple(e for e in ENDPOINTS if e.sheddable)


def find(path: str) -> Endpoint | None:
    return next((endpoint for endpoint in ENDPOINTS if endpoint.matches(path)), None)


def lane_of(label: str) -> str:
    """The lane of the model an inference endpoint (by its label) runs in, "" for none: what the door
    holds its requests to, and what the endpoint's handler settles their share of (service.service)."""
    return next((endpoint.lane for endpoint in INFERENCE if endpoint.label == label), "")


def speaks_oip(path: str) -> bool:
    """A path of the Open Inference Protocol (service.oip.app), whose error bodies are its {"error": "..."}."""
    return path == "/v2" or path.startswith("/v2/")


def is_open(path: str) -> bool:
    """Served without the API key? Only what is declared open; anything else, declared or not, needs it."""
    endpoint = find(path)
    return endpoint is not None and endpoint.open


def is_admin(path: str) -> bool:
    endpoint = find(path)
    return endpoint is not None and endpoint.admin


def is_sheddable(method: str, path: str) -> bool:
    endpoint = find(path)
    return endpoint is not None and endpoint.sheddable and method == endpoint.method
