"""Roll a candidate version out to a running service, stage by stage: `python -m training rollout`.

    python -m training rollout cnn-classifier:<version> --shadow 10% --canary 5%,25%,50% \\
        --gates min_requests=200,min_agreement=0.95 --url http://127.0.0.1:3000

Each stage is one POST /admin/rollout (admin key from --admin-key or ADMIN_KEY): shadow first (that
share of requests also computed by the candidate, off the answer path), then each canary share (that
share of clients answered by the candidate). The service judges each stage against the gates on its
live traffic; this command prints its numbers as they come and starts the next stage when one has
passed. The last stage, once passed, promotes the candidate (the service's move). Any failed gate,
or a worker that cannot load the candidate, rolls back: every worker serves its version alone, and
this command exits 1 with the reason. Gates: service.control.rollout.Gates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx

FINAL = ("promoted", "rolled_back")


def share(text: str) -> float:
    """'10%' or '0.1' -> 0.1."""
    value = float(text.strip().rstrip("%")) / (100 if text.strip().endswith("%") else 1)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a share is in (0, 100%], not {text!r}")
    return value


def gates(text: str) -> dict:
    """'min_requests=200,min_agreement=0.95' -> {"min_requests": 200, "min_agreement": 0.95}."""
    found = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        number = float(value)
        found[name.strip()] = int(number) if name.strip() == "min_requests" else number
    return found


def stages(shadow: float | None, canary: list[float]) -> list[tuple[str, float]]:
    planned = ([("shadow", shadow)] if shadow else []) + [("canary", s) for s in canary]
    if not planned:
        raise SystemExit("give --shadow, --canary or both")
    return planned


class Service:
    def __init__(self, url: str, admin_key: str | None):
        self.url = url.rstrip("/") + "/admin/rollout"
        self.headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}

    def start(self, body: dict) -> tuple[int, dict]:
        response = httpx.post(self.url, json=body, headers=self.headers, timeout=600)
        return response.status_code, _json(response)

    def state(self) -> dict:
        return _json(httpx.get(self.url, headers=self.headers, timeout=60))


def _json(response: httpx.Response) -> dict:
    try:
        return response.json()
    except ValueError:
        return {"error": f"HTTP {response.status_code}", "detail": response.text[:500]}


def progress(state: dict) -> str:
    found = state.get("numbers", {})
    if state.get("mode") == "shadow":
        agreement = found.get("agreement")
        what = (f"{found.get('compared', 0)} images compared, agreement "
                f"{'-' if agreement is None else f'{agreement:.3f}'}, {found.get('shadow_dropped', 0)} dropped")
    else:
        what = (f"{found.get('candidate_requests', 0)} requests on the candidate, "
                f"p99 {found.get('candidate_p99_s')} s against {found.get('served_p99_s')} s")
    return f"stage {state.get('stage')} {state.get('mode')} {state.get('share', 0):.0%}: {state.get('state')}; {what}"


def run_stage(service: Service, body: dict, poll_s: float, timeout_s: float) -> dict:
    """One stage to its end: passed, promoted or rolled back (or still running at `timeout_s`)."""
    status, state = service.start(body)
    if status != 200:
        return {**state, "state": state.get("state", "refused")}
    deadline, last = time.monotonic() + timeout_s, ""
    while state.get("state") == "running" or state.get("state") == "promoting":
        if time.monotonic() > deadline:
            return {**state, "state": "timed_out"}
        line = progress(state)
        if line != last:
            print(line, flush=True)
            last = line
        time.sleep(poll_s)
        state = service.state()
    print(progress(state), flush=True)
    return state


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("tag", help="the candidate, name:version in the model store")
    parser.add_argument("--shadow", type=share, default=None, help="a shadow stage's share of requests (10%%)")
    parser.add_argument("--canary", type=lambda t: [share(s) for s in t.split(",")], default=[],
                        help="canary stages' shares of clients, in order (5%%,25%%,50%%)")
    parser.add_argument("--gates", type=gates, default={}, help="name=value,... (service.control.rollout.Gates)")
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running service")
    parser.add_argument("--admin-key", default=os.environ.get("ADMIN_KEY"), help="default: $ADMIN_KEY")
    parser.add_argument("--stage-timeout", type=float, default=1800.0, help="seconds a stage may take")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the rollout")
    args = parser.parse_args(argv)
    planned = stages(args.shadow, args.canary)
    service = Service(args.url, args.admin_key)
    for number, (mode, part) in enumerate(planned, 1):
        body = {"candidate": args.tag, "mode": mode, "share": part, "gates": args.gates,
                "promote": number == len(planned)}
        state = run_stage(service, body, args.poll, args.stage_timeout)
        if state.get("state") not in ("passed", "promoted"):
            if state.get("state") == "timed_out":
                service_stop(args.url, service.headers)
            why = state.get("reason") or state.get("detail")
            verb = "refused" if state.get("error") and state.get("state") == "refused" else "rolled back"
            print(f"{verb} ({state.get('error') or state.get('state')}): {why}", file=sys.stderr)
            return 1
    print(f"promoted {state.get('candidate')}: every worker serves it")
    return 0


def service_stop(url: str, headers: dict) -> None:
    """A stage that never reached a verdict (too little traffic) is stopped, not left split."""
    httpx.delete(url.rstrip("/") + "/admin/rollout", headers=headers, timeout=60)
