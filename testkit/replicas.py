"""Replicas of the service on one machine: `bentoml serve` processes behind haproxy, every one
scraped by Prometheus -- what a Kubernetes Deployment does (deploy/kubernetes), done by hand, so
that a rollout and a crash can be rehearsed under load and counted.

A rolling replacement (`Fleet.roll`) follows the Deployment's maxUnavailable: 0 strategy: start
the new replica, wait until it is ready, put it in the balancer, take the old one out (no new
requests), wait until the requests it holds are answered, then SIGTERM it and wait for its exit.
`Fleet.kill` is the crash: SIGKILL of a replica's whole process tree, then the replica is
brought back on the same address, as a restarted pod would be.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import psutil
from urllib3 import encode_multipart_formdata

from testkit.aggregation import check_aggregation
from testkit.balancer import BACKEND, Balancer
from testkit.images import shapes
from testkit.prometheus import JOB, Prometheus
from testkit.server import ROOT, ServerProcess


@dataclass
class RollResult:
    slot: str  # the old replica's
    new_slot: str
    start_s: float  # new replica: start until ready
    drain_s: float  # old replica: out of the balancer until its last request was answered
    exit_s: float  # old replica: SIGTERM until every process exited


@dataclass
class KillResult:
    slot: str
    killed_at: float  # epoch seconds: SIGKILL sent ...
    dead_at: float  # ... and every process of the replica gone
    in_flight: int  # requests haproxy had sent the replica and not seen answered, while it was killed
    failed: list = field(default_factory=list)  # haproxy's records of the requests that failed
    down_s: float = 0.0  # kill until the balancer's health checks took it out
    alert_instances: list = field(default_factory=list)  # what CNNServiceDown's expression returned
    restart_s: float = 0.0  # restart until ready and back in the balancer
    whole: bool = False  # every replica UP in the balancer and scraped (up == 1) again
    uploads: list = field(default_factory=list)  # outcomes of the slow uploads pinned to it (slow_upload)

    SLACK_S = 0.1  # haproxy reads its clock once per event-loop turn

    def during_kill(self, record) -> bool:
        """Was this request on the replica while it was being killed?"""
        return (record.slot == self.slot and record.start <= self.dead_at + self.SLACK_S
                and record.end >= self.killed_at - self.SLACK_S)

    def problems(self, errors: int) -> list[str]:
        """What breaks the promise of a SIGKILL: more failures (`errors`, the load's count, and the
        failed uploads) than requests in flight on the killed replica, a failure of any other request,
        or a service that is not whole again."""
        problems = []
        errors += sum(outcome != "200" for outcome in self.uploads)
        if errors > self.in_flight:
            problems.append(f"{errors} failed requests, but only {self.in_flight} were in flight on {self.slot}")
        problems += [f"a request failed that was not in flight on {self.slot} at the kill: {record}"
                     for record in self.failed if not self.during_kill(record)]
        if not self.whole:
            problems.append("the service is not whole after the restart")
        return problems


class Fleet:
    """`replicas` replicas of the service behind one balancer, scraped by one Prometheus; one spare
    balancer slot, for the new replica of a rolling replacement."""

    def __init__(self, env: dict[str, str], workdir: Path, replicas: int, server_env: dict[str, str] | None = None):
        self.workdir = workdir
        self.env = {**env, **(server_env or {})}
        self.balancer = Balancer(workdir, replicas + 1)
        self.prometheus = Prometheus(workdir)
        self.servers: dict[str, ServerProcess] = {}  # slot -> the replica in it
        self._numbers = itertools.count(1)  # of the replicas' logs
        with ThreadPoolExecutor(replicas) as pool:  # in parallel: start-up is mostly waiting on imports
            starts = [pool.submit(self._start) for _ in range(replicas)]
        try:
            for slot, start in zip(self.balancer.slots, starts):
                self._attach(slot, start.result())
        except BaseException:
            for start in starts:
                if start.exception() is None:
                    start.result().stop()
            self.close()
            raise

    # ----- replicas ------------------------------------------------------------

    def _start(self, port: int | None = None) -> ServerProcess:
        server = ServerProcess(self.env, self.workdir / f"replica{next(self._numbers)}.log", port=port)
        server.wait_ready(timeout=180)  # stops the server itself when it fails
        return server

    def _attach(self, slot: str, server: ServerProcess) -> None:
        self.balancer.attach(slot, server.port)
        self.servers[slot] = server
        self._update_targets()

    def _update_targets(self) -> None:
        self.prometheus.set_targets({slot: f"127.0.0.1:{s.port}" for slot, s in self.servers.items()})

    def instances(self) -> dict[str, str]:
        """slot -> the instance label Prometheus gives the replica in it."""
        return {slot: f"127.0.0.1:{server.port}" for slot, server in self.servers.items()}

    def serve_only(self, slots: list[str]) -> None:
        """The balancer sends requests to these replicas only (the others stay up, idle)."""
        for slot, server in self.servers.items():
            if slot in slots:
                self.balancer.attach(slot, server.port)
            else:
                self.balancer.detach(slot)
                self.balancer.wait_idle(slot, timeout=60)

    def roll(self, slot: str) -> RollResult:
        """Replace the replica in `slot` by a new one, without losing a request."""
        new_slot = next(s for s in self.balancer.slots if s not in self.servers)
        started = time.time()
        new = self._start()
        start_s = time.time() - started
        self._attach(new_slot, new)
        old = self.servers.pop(slot)
        self.balancer.detach(slot)
        drain_s = self.balancer.wait_idle(slot, timeout=60)
        self._update_targets()
        stopping = time.time()
        old.stop()  # SIGTERM to its process group; waits for the exit
        return RollResult(slot, new_slot, start_s, drain_s, time.time() - stopping)

    def kill(self, slot: str) -> KillResult:
        """SIGKILL the replica in `slot`; wait until the balancer and the CNNServiceDown alert's
        expression see it; bring it back on its port. (The load keeps running throughout.)"""
        server = self.servers[slot]
        instance = f"127.0.0.1:{server.port}"
        # Every process of the replica, as the kernel kills a container's cgroup: bentoml's workers run
        # in sessions of their own, so killing the supervisor's process group would leave them serving.
        supervisor = psutil.Process(server.process.pid)
        tree = [supervisor, *supervisor.children(recursive=True)]
        # The case that costs: requests certainly in flight on it (the load's are, now and then). While
        # the uploads take their places the load goes elsewhere, so that the balancer's count of requests
        # on the replica counts the uploads alone; then the load comes back to it for the kill.
        self.balancer.set_weight(slot, 0)
        self.balancer.wait_idle(slot, timeout=60)
        with ThreadPoolExecutor(SLOW_UPLOADS) as pool:
            killed = threading.Event()  # the uploads' last pieces wait for the kill: in flight for certain
            uploads = [pool.submit(slow_upload, self.balancer.url, slot, 5.0, killed) for _ in range(SLOW_UPLOADS)]
            placed = self.balancer.wait_busy(slot, SLOW_UPLOADS, timeout=60)
            self.balancer.set_weight(slot, 100)
            if not placed:
                killed.set()
                raise TimeoutError(f"the {SLOW_UPLOADS} slow uploads did not reach {slot} within 60 s")
            time.sleep(0.3)
            killed_at = time.time()
            for process in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
            dead_at = wait_gone(tree)
            killed.set()
            result = KillResult(slot, killed_at, dead_at, 0)
            result.uploads = [upload.result() for upload in uploads]
        server.process.wait()
        self.balancer.wait_status(slot, "DOWN", timeout=15)
        result.down_s = time.time() - killed_at
        down = self.prometheus.wait_for(f'up{{job="{JOB}"}} == 0', bool, timeout=15)
        result.alert_instances = sorted(r["metric"]["instance"] for r in down)
        server.stop()  # closes its log, removes its private home
        restarting = time.time()
        self.servers[slot] = self._start(port=server.port)
        self.balancer.wait_status(slot, "UP", timeout=30)
        result.restart_s = time.time() - restarting
        scraped = self.prometheus.wait_for(f'up{{job="{JOB}"}} == 1', lambda r: len(r) == len(self.servers), 15)
        result.whole = (sorted(self.balancer.serving()) == sorted(self.servers)
                        and {r["metric"]["instance"] for r in scraped} == set(self.instances().values())
                        and instance in self.instances().values())
        result.in_flight = sum(map(result.during_kill, self.balancer.records()))
        result.failed = self.failed_since(killed_at - 60)
        return result

    def failed_since(self, moment: float) -> list:
        """haproxy's records of the requests that started after `moment` and failed."""
        return [r for r in self.balancer.records() if r.failed and r.start >= moment]

    def metrics(self) -> dict[str, str]:
        """Each live replica's own /metrics text, by instance."""
        return {f"127.0.0.1:{s.port}": httpx.get(f"{s.url}/metrics", timeout=10).text for s in self.servers.values()}

    def aggregation(self):
        """The dashboard's and the alerts' sums against the replicas' own counters
        (testkit.aggregation), with the load stopped."""
        with self._quiet():
            time.sleep(2)  # the last answers and health checks counted
            fetched = time.time()
            metrics = self.metrics()
            self.prometheus.scraped_since(fetched + 0.5)
            return check_aggregation(self.prometheus, metrics)

    @contextlib.contextmanager
    def _quiet(self):
        """No health checks meanwhile: BentoML counts each /readyz in bentoml_service_request_total, so
        with them the counters never hold still long enough to compare."""
        for slot in self.servers:
            self.balancer.command(f"disable health {BACKEND}/{slot}")
        try:
            yield
        finally:
            for slot in self.servers:
                self.balancer.command(f"enable health {BACKEND}/{slot}")

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        self.prometheus.stop()
        self.balancer.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        self.close()


SLOW_UPLOADS = 2  # requests pinned to the replica that is killed


def slow_upload(url: str, slot: str, seconds: float = 5.0, finish: threading.Event | None = None) -> str:
    """POST /classify through the balancer to the replica in `slot` (haproxy's use-server on
    X-Replica), its body arriving over `seconds` -- a slow client's upload, in flight on that replica
    meanwhile. With `finish`, the last piece waits for it to be set (at most a minute): in flight for
    certain until then, however slow the machine. Its outcome: the status code, or the error's name."""
    image = shapes(1)[0]
    body, content_type = encode_multipart_formdata([("images", (image.name, image.data, image.content_type))])
    pieces = 20
    step = -(-len(body) // pieces)

    def trickle():
        for start in range(0, len(body), step):
            if finish is not None and start + step >= len(body):
                finish.wait(60)
            yield body[start:start + step]
            time.sleep(seconds / pieces)

    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "X-Replica": slot}
    try:
        return str(httpx.post(f"{url}/classify", content=trickle(), headers=headers, timeout=30).status_code)
    except httpx.HTTPError as err:
        return type(err).__name__


def wait_gone(processes: list[psutil.Process], timeout: float = 10) -> float:
    """When every process had exited (a zombie has: it only waits for its parent to reap it)."""
    deadline = time.time() + timeout
    for process in processes:
        while time.time() < deadline:
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.001)
    return time.time()


# ----- load ---------------------------------------------------------------------

class Load:
    """Locust (loadtests/locustfile.py: its traffic mix and body checks) against the balancer, from
    start() until stop(); the outcome counts from the locustfile's summary."""

    def __init__(self, host: str, reports: Path, name: str, users: int, wait: str = "0.05,0.3", weights: str = ""):
        from testkit.locust import locust_command

        self.scenario = {"_name": name, "users": users, "spawn_rate": users, "duration": "30m", "wait": wait,
                         "weights": weights}
        self.reports = reports
        command, env = locust_command(self.scenario, host, reports)
        self._log = open(reports / f"{name}_locust.log", "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> dict:
        """Stop the load (SIGTERM: Locust writes its reports and exits); {"ok", "shed", "error",
        "requests", "seconds", "rps", "endpoints"}."""
        from testkit.locust import locust_results

        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self._log.close()
        summary, aggregated = locust_results(self.scenario, self.reports)
        totals = {k: sum(e.get(k, 0) for e in summary["endpoints"].values()) for k in ("ok", "shed", "error")}
        requests = sum(totals.values())
        return {**totals, "requests": requests, "seconds": summary["seconds"],
                "rps": requests / summary["seconds"], "locust_failures": int(aggregated["Failure Count"]),
                "endpoints": summary["endpoints"]}


def requests_all_succeed(url: str, count: int) -> bool:
    """`count` sequential /classify requests through `url`, every one 200."""
    image = shapes(1)[0]
    files = [("images", (image.name, image.data, image.content_type))]
    return all(httpx.post(f"{url}/classify", files=files, timeout=30).status_code == 200 for _ in range(count))

