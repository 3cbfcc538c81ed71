"""What the door learns of an endpoint's requests: how much a byte of body takes (service.runtime.admission)."""

from __future__ import annotations


class BodyRate:
    """What a request to an endpoint takes (units, or its share of a lane) per byte of its body: the
    ratio of sums over the last few parsed requests, Σ taken / Σ bytes, so that each request counts by
    its size. (The average of each request's own ratio followed the smallest bodies: three 31-byte
    junk bodies of one image each made the door expect 147 images in the next 11.6 KB body, the
    batches' lane took one request at a time, and a burst of 24 single-image requests waited out its
    line: 503s in CI's `make test`.)"""
    DECAY = 0.8  # per request: the sums remember about the last five

    def __init__(self) -> None:
        self._sums: dict[str, tuple[float, float]] = {}  # endpoint -> (Σ taken, Σ bytes), decayed

    def learn(self, label: str, taken: float, body_bytes: int) -> None:
        taken_sum, bytes_sum = self._sums.get(label, (0.0, 0.0))
        self._sums[label] = (self.DECAY * taken_sum + taken, self.DECAY * bytes_sum + body_bytes)

    def estimate(self, label: str, body_bytes: int | None) -> float:
        """What a body of `body_bytes` takes; 1 (one image, one pass) where nothing is learned yet."""
        if label not in self._sums or not body_bytes:
            return 1.0
        taken, body = self._sums[label]
        return max(1.0, taken / max(body, 1.0) * body_bytes)

    def per_byte(self) -> dict[str, float]:
        """Per endpoint: what a byte of body takes."""
        return {label: taken / max(body, 1.0) for label, (taken, body) in self._sums.items()}

    def per_mb(self) -> dict[str, float]:
        """Per endpoint: what a megabyte of body takes (GET /model shows it)."""
        return {label: round(per_byte * 1_000_000, 2) for label, per_byte in self.per_byte().items()}
