"""haproxy (Debian's package) in front of replicas of the service, driven through its runtime API.

The backend has a fixed number of server slots, all in maintenance at first; a replica joins by
giving a slot its address and making it ready, and leaves by putting its slot back into
maintenance, which sends it no new request while the ones it holds finish. Nothing is reloaded,
so no connection is ever cut by the balancer itself.

Health checks are `GET /readyz` every 500 ms (the service answers 200 once its model is loaded
and warm): a replica that stops answering is out after two failed checks (~1 s). A request whose
connection is refused (a dead replica the checks have not caught yet) is retried on another
one; a request already sent is never retried -- a POST may have done its work -- so those in
flight on a replica that dies fail, as they would behind any balancer.

Every request is logged (one line, `LOG_FORMAT`) to haproxy.log: which slot served it, when it
started and ended, its status -- what the SIGKILL rehearsal counts in-flight requests from.
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from testkit.server import free_port, terminate

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BACKEND = "replicas"
# accept time (s, ms), handshake and idle time before the request, its active time (ms), then slot,
# status, termination state and retries
LOG_FORMAT = "%Ts %ms %Th %Ti %Ta %s %ST %ts %rc"

CONFIG = """\
global
    stats socket {socket} mode 600 level admin
    log stdout format raw local0 info

defaults
    mode http
    log global
    log-format "{log_format}"
    timeout connect 1s
    timeout client 60s
    # above the service's REQUEST_TIMEOUT_S (30 s): the service, not the balancer, ends a long request
    timeout server 60s
    timeout http-request 10s
    # a refused connection (a replica that just died) is retried, on another replica
    retries 2
    option redispatch 1
    # a new server connection per request: none idles on a replica that is draining or dead
    option http-server-close

frontend service
    bind 127.0.0.1:{port}
    default_backend {backend}

backend {backend}
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 500ms fastinter 250ms downinter 500ms rise 1 fall 2
    # X-Replica: rN sends a request to that replica (the SIGKILL rehearsal pins requests to its victim)
{pins}
{servers}
"""


@dataclass(frozen=True)
class LogRecord:
    """One request as haproxy logged it."""

    start: float  # when the request's first byte arrived (epoch seconds)
    end: float  # when its answer's last byte left (or it failed)
    slot: str  # the server that had it ("<NOSRV>": none)
    status: int  # -1: no answer at all
    termination: str  # "--": normal; e.g. "SH": the server closed before answering

    @property
    def failed(self) -> bool:
        """The service or the balancer failed it. (A 503 from the service is a refusal with Retry-After;
        "C.": the client gave up, as Locust does with the requests in flight when it stops.)"""
        if self.termination[0] == "C":
            return False
        return self.termination[0] != "-" or self.status < 0 or (self.status >= 500 and self.status != 503)


class Balancer:
    """haproxy on a free loopback port with `slots` server slots (r1, r2, ...)."""

    def __init__(self, workdir: Path, slots: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.slots = [f"r{i + 1}" for i in range(slots)]
        self.socket_path = workdir / "haproxy.sock"
        self.log_path = workdir / "haproxy.log"
        servers = "\n".join(f"    server {slot} 127.0.0.1:9 disabled" for slot in self.slots)
        pins = "\n".join(f"    use-server {slot} if {{ req.hdr(x-replica) -m str {slot} }}" for slot in self.slots)
        config = workdir / "haproxy.cfg"
        config.write_text(CONFIG.format(socket=self.socket_path, log_format=LOG_FORMAT, port=self.port,
                                        backend=BACKEND, pins=pins, servers=servers))
        check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(config)], check=False, capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects {config}:\n{check.stdout}{check.stderr}")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 10
        while not self.socket_path.exists():
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"haproxy did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def command(self, line: str) -> str:
        """One runtime API command; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers, by slot: status (UP, DOWN, MAINT, ...), scur (requests
        on it now), stot (requests it had), ..."""
        text = self.command("show stat -1 4 -1").lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row.get("pxname") == BACKEND}

    def attach(self, slot: str, port: int, timeout: float = 15) -> None:
        """Point `slot` at a (ready) replica on `port` and wait until its health check has it UP."""
        for line in (f"set server {BACKEND}/{slot} addr 127.0.0.1 port {port}",
                     f"set server {BACKEND}/{slot} state ready"):
            answer = self.command(line).strip()
            if answer and not any(word in answer.lower() for word in ("changed", "no need")):
                raise RuntimeError(f"haproxy: {line!r} -> {answer!r}")
        self.wait_status(slot, "UP", timeout)

    def detach(self, slot: str) -> None:
        """No new requests to `slot`; those it holds run to their end."""
        self.command(f"set server {BACKEND}/{slot} state maint")

    def set_weight(self, slot: str, percent: int) -> None:
        """The slot's weight, in percent of its configured one: 0, no balanced requests (those pinned to it
        by X-Replica still go); 100, its share again."""
        answer = self.command(f"set weight {BACKEND}/{slot} {percent}%").strip()
        if answer:
            raise RuntimeError(f"haproxy: set weight {slot} {percent}% -> {answer!r}")

    def wait_status(self, slot: str, status: str, timeout: float) -> float:
        """Seconds until the slot's status starts with `status` (UP, DOWN, MAINT)."""
        start = time.time()
        while not self.stats()[slot]["status"].startswith(status):
            if time.time() - start > timeout:
                raise TimeoutError(f"{slot} not {status} after {timeout}s: {self.stats()[slot]['status']}")
            time.sleep(0.05)
        return time.time() - start

    def wait_idle(self, slot: str, timeout: float) -> float:
        """Seconds until no request is on `slot` any more (its drain)."""
        start = time.time()
        while int(self.stats()[slot]["scur"]) > 0:
            if time.time() - start > timeout:
                raise TimeoutError(f"{slot} still has requests after {timeout}s")
            time.sleep(0.02)
        return time.time() - start

    def wait_busy(self, slot: str, requests: int, timeout: float) -> bool:
        """Wait until `slot` holds at least `requests` requests (True), or `timeout` passes (False)."""
        deadline = time.time() + timeout
        while int(self.stats()[slot]["scur"]) < requests:
            if time.time() > deadline:
                return False
            time.sleep(0.005)
        return True

    def serving(self) -> list[str]:
        """Slots the balancer sends requests to now."""
        return [slot for slot, row in self.stats().items() if row["status"].startswith("UP")]

    def records(self) -> list[LogRecord]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) != 9 or not fields[0].isdigit():
                continue  # haproxy's own messages
            accepted = int(fields[0]) + int(fields[1]) / 1000
            start = accepted + (max(0, int(fields[2])) + max(0, int(fields[3]))) / 1000
            end = start + max(0, int(fields[4])) / 1000
            records.append(LogRecord(start, end, fields[5].split("/")[-1], int(fields[6]), fields[7]))
        return records

    def get(self, path: str, timeout: float = 30) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=timeout)

    def stop(self) -> None:
        terminate(self.process, grace_s=10)
        self._log.close()
