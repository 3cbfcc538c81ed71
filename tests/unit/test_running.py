"""The worker's Running handle before the service has started: what the routes BentoML builds apart answer."""

from __future__ import annotations

import json

import pytest

from service.core.refusals import Refusal
from service.core.running import Running


def test_before_start_a_refusal_is_answered_as_it_is_and_a_fault_is_raised():
    running = Running()
    assert running.pipeline is None
    answer = running.refusal_response("v2_infer", Refusal(503, "not_ready", "the model is still loading"), oip=True)
    assert answer.status_code == 503 and json.loads(answer.body) == {"error": "not_ready: the model is still loading"}
    rest = running.refusal_response(None, Refusal(404, "unknown_model", "no such model"))
    assert json.loads(rest.body) == {"error": "unknown_model", "detail": "no such model"}
    with pytest.raises(KeyError):
        running.refusal_response(None, KeyError("a fault, not a refusal"))
