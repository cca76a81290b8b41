"""The processes behind the embedded defaults: `chroma run` and Celery workers.

Several worker processes must never write to one embedded Chroma directory (vectors went
missing from the index when tried), so even on one machine everything talks to a Chroma
*server*: ``chroma run`` over ``DATA_DIR/chroma``, the same on-disk format an embedded client
writes. Which command starts, shares and stops them is ``cli.stack``'s business.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import structlog

from reembed.errors import ConfigError, StoreUnavailableError
from reembed.queue import QUEUE_BATCHES, QUEUE_CONTROL
from reembed.settings import Settings

log = structlog.get_logger(__name__)

#: Seconds to wait for `chroma run` to answer its heartbeat (it takes ~2 s here).
CHROMA_START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chroma_executable() -> str:
    """The `chroma` CLI of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "chroma"
    found = str(beside) if beside.exists() else shutil.which("chroma")
    if not found:
        raise ConfigError("the `chroma` command is not installed: pip install chromadb")
    return found


class ChromaServer:
    """A `chroma run` child process over a directory, on a free loopback port."""

    def __init__(self, path: Path, port: int | None = None) -> None:
        self.path = path
        self.chosen_port = port is None  # a port we picked may be taken meanwhile: pick another
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, attempts: int = 3) -> ChromaServer:
        """Start and wait until *this* server answers: a heartbeat from another process that took
        the port meanwhile (the port is free when picked, not reserved) does not count; then a
        new port is picked, when this object picked the first."""
        for attempt in range(attempts):
            if self._start_once():
                return self
            if not self.chosen_port or attempt == attempts - 1:
                break
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        raise StoreUnavailableError(f"`chroma run` could not serve on {self.url}: the port is taken; see "
                                    f"{self.path.parent / 'chroma.log'}")

    def _start_once(self) -> bool:
        """True once this process serves the heartbeat; False if it exited with the port taken."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / "chroma.log", "ab") as logfile:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [chroma_executable(), "run", "--path", str(self.path), "--host", "127.0.0.1", "--port",
                 str(self.port)],
                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + CHROMA_START_TIMEOUT_S
        import httpx

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self._port_taken():
                    return False
                raise StoreUnavailableError(
                    f"`chroma run` exited with {self.process.returncode}; see {self.path.parent / 'chroma.log'}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/api/v2/heartbeat", timeout=1).status_code == 200 and self._listening():
                    log.info("chroma started", url=self.url, path=str(self.path))
                    return True
            time.sleep(0.1)
        self.stop()
        raise StoreUnavailableError(f"`chroma run` did not answer on {self.url} within {CHROMA_START_TIMEOUT_S} s")

    def _listening(self) -> bool:
        """Whether our child (not another process) listens on the port."""
        assert self.process is not None
        try:
            parent = psutil.Process(self.process.pid)
            connections = [c for p in (parent, *parent.children(recursive=True))
                           for c in p.net_connections(kind="tcp")]
        except psutil.Error:
            return False
        return any(c.laddr and c.laddr.port == self.port and c.status == psutil.CONN_LISTEN for c in connections)

    def _port_taken(self) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", self.port))
            except OSError:
                return True
        return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Workers:
    """`celery -A worker.app worker` as a child process, for the embedded defaults and tests."""

    def __init__(self, settings: Settings, concurrency: int = 1, name: str | None = None,
                 queues: str = f"{QUEUE_BATCHES},{QUEUE_CONTROL}") -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.name = name or f"reembed-{os.getpid()}-{free_port()}@%h"
        self.queues = queues
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, logfile: Path | None = None) -> Workers:
        env = {**os.environ, **self.settings.to_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        out = open(logfile, "ab") if logfile else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=prefork",
             f"--concurrency={self.concurrency}", "-Q", self.queues, "-n", self.name,
             "--without-gossip", "--without-mingle", "-E"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if not isinstance(out, int):
            out.close()  # the child holds its own copy of the descriptor
        return self

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (finish the current batch), then kill what is left of the group."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
