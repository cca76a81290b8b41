"""One local stack per data folder: its Redis, its one Chroma server and its workers, shared.

Every ``reembed`` command run without ``REEMBED_REDIS_URL`` / ``REEMBED_CHROMA_URL`` needs a
Redis and a Chroma server over the data folder. Two of either on one folder corrupt it or split
the queue, and a command that stops servers another command still uses kills that command. So
the services belong to the folder, not to a command:

* ``DATA_DIR/stack.json`` records each service's address, pid and start time (a pid the OS gave
  to another process since is not mistaken for ours), the commands using the stack (their pids)
  and whether ``reembed up`` pinned it.
* Everything that reads or changes the record holds ``flock(DATA_DIR/stack.lock)``; starting a
  service happens under it, so two commands never start two servers.
* A command *attaches* (starts what is missing, reuses what is alive, adds its pid) and
  *detaches* when it ends, on any signal included; the last one out stops everything, unless
  the stack is pinned. No daemon: a command killed with SIGKILL cannot detach, so the next
  command prunes its pid, reuses what it left running, and says so in one line.

Services are started in their own session (``start_new_session``), so a terminal's Ctrl-C goes
to the command alone, and the command decides what stops.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import structlog

from cli.processes import STOP_WAIT_S, Service, StackRecord, is_running, start_redis
from cli.services import ChromaServer, Workers
from reembed.errors import LocalStackError, WaitTimeoutError
from reembed.queue import QUEUE_BATCHES, QUEUE_CONTROL, restore_unacked_now
from reembed.settings import Settings

log = structlog.get_logger(__name__)

RECORD_FILE = "stack.json"
LOCK_FILE = "stack.lock"
#: Seconds a command waits for another one that holds the folder's lock (starting Chroma: ~3 s).
LOCK_WAIT_S = 120.0
#: The stack's services, in the order they are stopped.
STOP_ORDER = (("workers", "control"), ("chroma",), ("redis",))

class FolderStack:
    """This process's use of its data folder's stack (see the module docstring).

    ``say`` prints the one line a user should read (services left behind by a killed command).
    """

    def __init__(self, data_dir: Path, say: Callable[[str], None]) -> None:
        self.data_dir = data_dir
        self.record_path = data_dir / RECORD_FILE
        self.say = say
        self.me = str(os.getpid())
        self.attached = False
        #: The services as last seen under the lock: stopped from here if the folder is deleted.
        self.known: dict[str, Service] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[StackRecord]:
        """The record, under the folder's lock; written back when the block ends without error."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.data_dir / LOCK_FILE, "a+")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise LocalStackError(f"cannot use the data folder {self.data_dir}: {exc}; check REEMBED_DATA_DIR") from exc
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise WaitTimeoutError(
                            f"another reembed command has held {self.data_dir / LOCK_FILE} for {LOCK_WAIT_S:.0f} s; "
                            "see `reembed up --status`") from exc
                    time.sleep(0.05)
            record = StackRecord.read(self.record_path)
            yield record
            if record.services or record.users or record.pinned:
                record.write(self.record_path)
            else:
                self.record_path.unlink(missing_ok=True)
        finally:
            handle.close()

    def _prune(self, record: StackRecord) -> None:
        """Forget users that ended without detaching, and services that died; say so once."""
        gone = {pid: what for pid, what in record.users.items() if not is_running(pid)}
        for pid in gone:
            del record.users[pid]
        dead = [name for name, svc in record.services.items() if not svc.alive()]
        for name in dead:
            record.services[name].stop(wait_s=0)  # what is left of its group
            del record.services[name]
        alive = sorted(record.services)
        if gone and alive:
            who = ", ".join(f"pid {pid} ({what})" for pid, what in gone.items())
            self.say(f"reusing {', '.join(alive)} left running for {self.data_dir} by {who}, which ended "
                     "without stopping them")
        if dead:
            log.info("stack services found dead", services=dead, folder=str(self.data_dir))

    def attach(self, command: str, redis_needed: bool, chroma_needed: bool) -> dict[str, str]:
        """Start what is missing, reuse what runs; returns the settings that point at them."""
        changes: dict[str, str] = {}
        with self.locked() as record:
            self._prune(record)
            if redis_needed:
                if "redis" not in record.services:
                    record.services["redis"] = start_redis(self.data_dir)
                changes["redis_url"] = record.services["redis"].url
            if chroma_needed:
                if "chroma" not in record.services:
                    chroma = ChromaServer(self.data_dir / "chroma").start()
                    assert chroma.process is not None
                    record.services["chroma"] = Service.of(chroma.process, chroma.url)
                changes["chroma_url"] = record.services["chroma"].url
            record.users[self.me] = command
            self.attached = True
            self.known = dict(record.services)
        return changes

    def ensure_workers(self, settings: Settings, concurrency: int) -> bool:
        """The folder's workers: reused when alive, else started (``concurrency`` embedding
        processes and one control process). Returns whether they were started here."""
        with self.locked() as record:
            self._prune(record)
            if "workers" in record.services and "control" in record.services:
                running = record.services["workers"].concurrency
                if running != concurrency:
                    log.info("reusing the folder's workers", running=running, asked=concurrency)
                return False
            for name in ("workers", "control"):
                if name in record.services:
                    record.services.pop(name).stop()
            # No worker of this folder is alive, and only they see its Redis: what the last ones
            # took and never finished comes back now, not after the visibility timeout.
            restored = restore_unacked_now(settings)
            if restored:
                self.say(f"gave back {restored} task(s) that workers of {self.data_dir} took and never finished")
            logfile = self.data_dir / "worker.log"
            control = Workers(settings, 1, queues=QUEUE_CONTROL).start(logfile)
            workers = Workers(settings, concurrency, queues=QUEUE_BATCHES).start(logfile)
            assert control.process is not None and workers.process is not None
            record.services["control"] = Service.of(control.process, concurrency=1)
            record.services["workers"] = Service.of(workers.process, concurrency=concurrency)
            self.known = dict(record.services)
            return True

    def workers_alive(self) -> bool:
        record = StackRecord.read(self.record_path)
        return all(name in record.services and record.services[name].alive() for name in ("workers", "control"))

    def pinned(self) -> bool:
        return StackRecord.read(self.record_path).pinned

    def pin(self, pinned: bool) -> StackRecord:
        with self.locked() as record:
            record.pinned = pinned
            return record

    def detach(self) -> None:
        """Leave; the last user of an unpinned stack stops it. Signals wait until this is done."""
        if not self.attached:
            return
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            if not self.record_path.exists():  # the folder deleted under us: nobody can find them any more
                self._stop_all(StackRecord(dict(self.known)), wait_s=2)  # and nothing is left to finish
                self.attached = False
                return
            with self.locked() as record:
                record.users.pop(self.me, None)
                self._prune(record)
                if not record.users and not record.pinned:
                    self._stop_all(record)
            self.attached = False
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def stop(self, force: bool) -> tuple[list[str], dict[str, str]]:
        """``reembed down``: unpin; stop now if nobody uses the stack (or ``force``). Returns the
        services stopped and the commands that still use it."""
        with self.locked() as record:
            self._prune(record)
            record.pinned = False
            if force or not record.users:
                stopped = sorted(record.services)
                self._stop_all(record)
                record.users.clear()
                return stopped, {}
            return [], dict(record.users)

    def describe(self) -> dict[str, object]:
        """What ``reembed up --status`` prints: services with pid and address, users, pinned."""
        with self.locked() as record:
            self._prune(record)
            return {
                "data_dir": str(self.data_dir),
                "services": {name: {"pid": s.pid, "url": s.url, **({"processes": s.concurrency} if s.concurrency else {})}
                             for name, s in record.services.items()},
                "users": record.users, "pinned": record.pinned,
            }

    @staticmethod
    def _stop_all(record: StackRecord, wait_s: float = STOP_WAIT_S) -> None:
        """Workers first (both groups at once: each finishes its batch), then Chroma, then Redis."""
        for group in STOP_ORDER:
            services = [(name, record.services.pop(name)) for name in group if name in record.services]
            for _, service in services:
                service.terminate()
            for name, service in services:
                service.stop(wait_s)
                log.info("stopped", service=name, pid=service.pid)
        record.services.clear()


class LocalStack:
    """The services a command uses: configured ones as they are, the rest from the data folder's
    shared stack (``cli.stack``). Workers on the folder's Redis belong to the stack; workers on a
    configured Redis are this command's own and stop with it.

    Use as a context manager; on exit (any signal included) it detaches, and the last user of
    an unpinned folder stack stops it.
    """

    def __init__(self, settings: Settings, command: str = "reembed",
                 say: Callable[[str], None] | None = None) -> None:
        self.base = settings
        self.settings = settings
        self.command = command
        self.folder: FolderStack | None = None
        self.workers: Workers | None = None  # own workers (a configured Redis) only
        self.control: Workers | None = None
        self._say = say or (lambda line: print(f"reembed: {line}", file=sys.stderr, flush=True))

    @property
    def embedded(self) -> bool:
        """True when Redis is the data folder's own: only the folder's workers see its queue."""
        return not self.base.redis_url

    @property
    def pinned(self) -> bool:
        """True when ``reembed up`` keeps the folder's stack (and its workers) running."""
        return self.folder is not None and self.folder.pinned()

    @property
    def ephemeral(self) -> bool:
        """The work stops when the last command using the folder's stack ends: wait for it."""
        return self.embedded and not self.pinned

    def __enter__(self) -> LocalStack:
        if not self.base.redis_url or not self.base.chroma_url:
            self.folder = FolderStack(self.base.data_dir, self._say)
            try:
                changes = self.folder.attach(self.command, not self.base.redis_url, not self.base.chroma_url)
            except BaseException:
                self.close()
                raise
            self.settings = self.base.with_(**changes)
        return self

    def start_workers(self, concurrency: int) -> None:
        """``concurrency`` embedding processes on the batch queue, and one control process (pump,
        finalize) of its own, so feeding and finishing never wait behind a batch. On the folder's
        Redis, the folder's running workers are reused."""
        if self.embedded:
            assert self.folder is not None
            self.folder.ensure_workers(self.settings, concurrency)
        elif self.workers is None:
            logfile = self.base.data_dir / "worker.log"
            self.base.data_dir.mkdir(parents=True, exist_ok=True)
            self.control = Workers(self.settings, 1, queues=QUEUE_CONTROL).start(logfile)
            self.workers = Workers(self.settings, concurrency, queues=QUEUE_BATCHES).start(logfile)

    def no_worker(self) -> str | None:
        """Why nothing will work on this command's migration, or None: checked while waiting."""
        if not self.base.data_dir.exists() or (self.folder is not None and not self.folder.record_path.exists()):
            return f"the data folder {self.base.data_dir} (or its {RECORD_FILE}) was deleted while this command ran"
        if self.embedded:
            assert self.folder is not None
            if not self.folder.workers_alive():
                return (f"no worker runs for {self.base.data_dir} (only its own workers see its embedded Redis); "
                        "rerun without --workers 0, or start them with `reembed up --workers N`")
            return None
        own = [w for w in (self.workers, self.control) if w is not None]
        if own and any(w.process is None or w.process.poll() is not None for w in own):
            return f"this command's workers exited; see {self.base.data_dir / 'worker.log'}"
        return None

    def close(self) -> None:
        for started in (self.workers, self.control):
            if started:
                started.stop()
        self.workers = self.control = None
        if self.folder is not None:
            self.folder.detach()
            self.folder = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
