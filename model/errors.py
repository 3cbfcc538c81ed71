"""Typed refusals of what a caller asked of the model: the service maps each to a 4xx once.

Each carries a stable `reason` code (the HTTP error body's `error`)."""

from __future__ import annotations


class ModelRequestError(ValueError):
    reason = "bad_request"


class UnknownLayer(ModelRequestError, KeyError):
    reason = "unknown_layer"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ChannelOutOfRange(ModelRequestError):
    reason = "channel_out_of_range"


class ClassOutOfRange(ModelRequestError, IndexError):
    reason = "class_out_of_range"
