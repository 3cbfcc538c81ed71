"""Move a running service to another model version: `python -m training serve-version`.

    python -m training serve-version cnn-classifier:<version> --url http://127.0.0.1:3000
    python -m training serve-version --watch cnn-classifier --url http://127.0.0.1:3000

The service does the move (service/control/: every worker loads, verifies,
checks and warms the version beside the old one, then swaps; any refusal
sends every worker back). This command asks for it (POST /admin/model, with
the admin key from --admin-key or ADMIN_KEY) and prints what each worker
serves. The service takes one move at a time (another call meanwhile gets 409
`move_in_progress`); this command then waits its turn (up to 10 minutes).
Rollback is the same command with the previous version: the store keeps
every version, so nothing is downloaded.

--watch follows the store's `latest` of a model name: a deployment that
publishes by registering (`python -m training register RUN`) moves the
service to each new version as it appears.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx


WAIT_TURN_S = 600.0  # how long a move waits while another one runs (the service answers 409 move_in_progress)


def move(url: str, tag: str, admin_key: str | None, wait_turn_s: float = WAIT_TURN_S) -> tuple[bool, dict]:
    """(moved, the service's answer) for one move to `tag`; while another move runs, asks again
    every second (up to `wait_turn_s`): the service takes one move at a time and does not queue them."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    deadline = time.monotonic() + wait_turn_s
    said = False
    while True:
        response = httpx.post(f"{url.rstrip('/')}/admin/model", json={"tag": tag}, headers=headers, timeout=600)
        try:
            body = response.json()
        except ValueError:
            body = {"error": f"HTTP {response.status_code}", "detail": response.text[:500]}
        if body.get("error") != "move_in_progress" or time.monotonic() > deadline:
            return response.status_code == 200, body
        if not said:
            print(f"waiting: {body.get('detail')}", file=sys.stderr)
            said = True
        time.sleep(1.0)


def report(moved: bool, body: dict) -> None:
    if moved:
        print(f"serving {body['tag']} on {len(body['workers'])} worker(s)")
    else:
        print(f"refused ({body.get('error')}): {body.get('detail')}", file=sys.stderr)
    for worker in body.get("workers", []):
        line = f"  worker {worker['pid']} ({worker['role']}): {worker['tag']} [{worker['state']}]"
        print(line + (f" {worker['error']}" if worker.get("error") else ""), file=sys.stdout if moved else sys.stderr)


def latest_tag(name: str) -> str:
    """The full tag of the store's latest version of `name` (BENTOML_HOME's store, as `register` writes it)."""
    from model.store import resolve

    return resolve(f"{name}:latest")[1]


def watch(name: str, url: str, admin_key: str | None, interval_s: float, moves: int | None) -> int:
    """Move the service to each new `latest` of `name` in the store; `moves` stops after that many."""
    served = None
    done = 0
    while moves is None or done < moves:
        tag = latest_tag(name)
        if tag != served:
            moved, body = move(url, tag, admin_key)
            report(moved, body)
            served = tag if moved else served
            done += 1
        time.sleep(interval_s)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training serve-version", description=__doc__.split("\n\n")[0])
    parser.add_argument("tag", help="name:version to serve (with --watch: the model name to follow)")
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running service")
    parser.add_argument("--admin-key", default=os.environ.get("ADMIN_KEY"), help="default: $ADMIN_KEY")
    parser.add_argument("--watch", action="store_true", help="follow the store's latest version of the name")
    parser.add_argument("--interval", type=float, default=5.0, help="--watch: seconds between looks at the store")
    parser.add_argument("--moves", type=int, default=None, help="--watch: stop after this many moves")
    args = parser.parse_args(argv)
    if args.watch:
        return watch(args.tag.split(":")[0], args.url, args.admin_key, args.interval, args.moves)
    moved, body = move(args.url, args.tag, args.admin_key)
    report(moved, body)
    return 0 if moved else 1
