"""The embedded stack, as a new user meets it: several terminals' commands on one data folder.

Every command here is a real ``reembed`` process with neither REEMBED_REDIS_URL nor
REEMBED_CHROMA_URL set, so it uses the data folder's own redis-server, ``chroma run`` and
workers (``cli.stack``). A census thread samples the machine's processes throughout and records
every redis-server and Chroma server that ran for the folder: exactly one of each may ever run.
Afterwards the data is read with plain chromadb.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromadb
import httpx
import psutil
import pytest

from cli.services import free_port
from tests.conftest import M2V_MINILM, M2V_MPNET, SCIFACT, need

pytestmark = pytest.mark.integration

#: Every command here must end (or fail) well within this; a hang is a defect.
COMMAND_S = 240


def scifact(tmp_path: Path, n: int) -> Path:
    """The first ``n`` SciFact documents, as the user's corpus file."""
    path = tmp_path / f"scifact-{n}.jsonl"
    with open(need(SCIFACT) / "corpus.jsonl") as src, open(path, "w") as out:
        for _, line in zip(range(n), src, strict=False):
            out.write(line)
    return path


class Folder:
    """One data folder, the environment of its commands, and a census of its servers."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REEMBED_")}
        self.env.update(REEMBED_DATA_DIR=str(self.data), HF_HUB_OFFLINE="1", REEMBED_LOG_FORMAT="json")
        self.seen: dict[str, set[int]] = {"redis": set(), "chroma": set(), "workers": set()}
        self.most: dict[str, int] = {"redis": 0, "chroma": 0}
        self._stop = threading.Event()
        self._census: threading.Thread | None = None

    def run(self, *args: str, timeout: float = COMMAND_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def ok(self, *args: str) -> dict[str, Any]:
        done = self.run(*args, "--json")
        assert done.returncode == 0, (args, done.stderr[-2000:])
        return dict(json.loads(done.stdout))

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env)

    def processes(self) -> dict[str, list[int]]:
        """The folder's servers and workers running now (zombies are not running)."""
        found: dict[str, list[int]] = {"redis": [], "chroma": [], "workers": []}
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            cmd = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or not cmd:
                continue
            line = " ".join(cmd)
            if "redis-server" in cmd[0] and str(self.data) in line:
                found["redis"].append(proc.pid)
            elif "chroma" in line and " run " in line and str(self.data / "chroma") in line:
                found["chroma"].append(proc.pid)
            elif "celery" in line and "worker.app" in line:
                try:
                    if proc.environ().get("REEMBED_DATA_DIR") == str(self.data):
                        found["workers"].append(proc.pid)
                except psutil.Error:
                    pass
        return found

    def census(self) -> None:
        def sample() -> None:
            while not self._stop.is_set():
                now = self.processes()
                for name, pids in now.items():
                    self.seen[name].update(pids)
                for name in self.most:
                    self.most[name] = max(self.most[name], len(now[name]))
                time.sleep(0.1)

        self._census = threading.Thread(target=sample, daemon=True)
        self._census.start()

    def end_census(self) -> None:
        self._stop.set()
        if self._census:
            self._census.join()

    def assert_one_of_each(self) -> None:
        assert self.most == {"redis": 1, "chroma": 1}, f"servers at once: {self.most}"
        assert len(self.seen["redis"]) == 1 and len(self.seen["chroma"]) == 1, f"servers that ran: {self.seen}"

    def assert_nothing_left(self, within_s: float = 30) -> None:
        deadline = time.monotonic() + within_s
        while any(self.processes().values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(self.processes().values()), f"left running: {self.processes()}"
        assert not (self.data / "stack.json").exists(), (self.data / "stack.json").read_text()

    def collection(self, name: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """A collection read with plain chromadb, straight from the folder (nothing runs)."""
        raw = chromadb.PersistentClient(path=str(self.data / "chroma")).get_collection(name).get(
            include=["documents", "metadatas"])
        return {i: (t, m) for i, t, m in zip(raw["ids"], raw["documents"], raw["metadatas"], strict=True)}


@pytest.fixture()
def folder(tmp_path: Path) -> Iterator[Folder]:
    f = Folder(tmp_path)
    yield f
    f.end_census()
    for pids in f.processes().values():  # never leave a failed test's processes behind
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _exited(command: subprocess.Popen[str]) -> None:
    """Fails at once, with what it said, if a command that should still run has ended."""
    if command.poll() is not None:
        out, err = command.communicate()
        pytest.fail(f"{command.args[3:]} exited {command.returncode}: {err[-2000:]} {out[-500:]}")


def wait_until(predicate: Any, what: str, within_s: float = 120) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {within_s} s: {what}")


def test_two_terminals_share_one_stack(folder: Folder, tmp_path: Path) -> None:
    """migrate --wait in one terminal; status, pause, a second migrate, search and resume in
    another: each succeeds or is refused cleanly, and one Redis and one Chroma serve them all."""
    minilm, mpnet = str(need(M2V_MINILM)), str(need(M2V_MPNET))
    corpus = scifact(tmp_path, 1200)
    folder.ok("ingest", "docs", str(corpus), "--model", minilm, "--batch-size", "64")
    folder.assert_nothing_left()

    folder.census()
    # 600 batches of 2: long enough (seconds) that a `pause` from another terminal finds it running
    # even when each command takes seconds to start on a loaded machine (batches of 4 did not, once).
    migrate = folder.start("migrate", "docs", "--to", mpnet, "--batch-size", "2", "--wait", "--json")
    migration_id = wait_until(lambda: _latest(folder, "migrate") or _exited(migrate), "the migration starts")
    wait_until(lambda: folder.ok("status", migration_id)["done"] > 0, "the first batch is written")
    assert folder.ok("pause", migration_id)["state"] == "paused"
    second = folder.run("migrate", "docs", "--to", minilm)
    assert second.returncode == 2 and second.stderr.strip().startswith("reembed: error: "), second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    hits = folder.ok("search", "docs", "microstructural development of human newborn cerebral white matter")
    assert hits["results"], hits
    resume = folder.start("resume", migration_id, "--json")
    assert resume.wait(timeout=COMMAND_S) == 0, resume.communicate()[1][-2000:]
    assert migrate.wait(timeout=COMMAND_S) == 0, migrate.communicate()[1][-2000:]
    final = json.loads(migrate.communicate()[0])
    assert final["state"] == "live" and final["done"] == 1200, final
    folder.end_census()
    folder.assert_one_of_each()
    folder.assert_nothing_left()

    served = folder.collection(final["target_collection"])
    assert len(served) == 1200
    assert {m["model_fingerprint"] for _, m in served.values()} == {final["to_fingerprint"]}


def test_serve_add_and_search_share_the_folder(folder: Folder, tmp_path: Path) -> None:
    """With `serve` up, `add` from another shell writes through the same Chroma, and both the
    CLI and the HTTP search find the document at once; SIGTERM to serve leaves nothing behind."""
    folder.ok("ingest", "docs", str(scifact(tmp_path, 40)), "--model", str(need(M2V_MINILM)))
    folder.census()
    port = free_port()
    server = folder.start("serve", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(url + "/healthz"), "serve answers", 60)
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": "axo-1", "text": "axolotl limb regeneration blastema", "metadata": {"n": 1}}) + "\n")
    folder.ok("add", "docs", str(new))
    assert folder.ok("search", "docs", "axolotl regeneration", "--mode", "semantic")["results"][0]["id"] == "axo-1"
    answer = httpx.post(url + "/search", json={"alias": "docs", "q": "axolotl regeneration", "mode": "semantic"},
                        timeout=30).json()
    assert answer["results"][0]["id"] == "axo-1", answer
    assert httpx.get(url + "/aliases", timeout=10).status_code == 200
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) in (0, 128 + signal.SIGTERM), server.communicate()[1][-2000:]
    folder.end_census()
    folder.assert_one_of_each()
    folder.assert_nothing_left()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_signals_stop_what_a_command_started_and_sigkill_orphans_are_taken_over(folder: Folder,
                                                                               tmp_path: Path) -> None:
    """SIGTERM to an ingest stops its stack; `resume` finishes it. SIGKILL to a migrate leaves its
    stack running: the next command says so in one line, reuses it, and stops it when it ends;
    the lost batches come back at once, not after the visibility timeout (600 s)."""
    minilm, mpnet = str(need(M2V_MINILM)), str(need(M2V_MPNET))
    ingest = folder.start("ingest", "docs", str(scifact(tmp_path, 600)), "--model", minilm, "--batch-size", "4")
    ingest_id = wait_until(lambda: _latest(folder), "the ingest starts")
    wait_until(lambda: folder.ok("status", ingest_id)["done"] > 0, "the first batch is written")
    ingest.send_signal(signal.SIGTERM)
    assert ingest.wait(timeout=90) == 128 + signal.SIGTERM
    assert ingest.communicate()[1].strip().splitlines()[-1] == "reembed: error: stopped by SIGTERM"
    folder.assert_nothing_left()
    resumed = folder.ok("resume", ingest_id)
    assert resumed["state"] == "live" and resumed["done"] == 600, resumed
    folder.assert_nothing_left()

    migrate = folder.start("migrate", "docs", "--to", mpnet, "--batch-size", "4", "--json")
    migration_id = wait_until(lambda: _latest(folder, "migrate"), "the migration starts")
    wait_until(lambda: folder.ok("status", migration_id)["done"] > 0, "the first batch is written")
    before = folder.processes()
    migrate.send_signal(signal.SIGKILL)
    migrate.wait(timeout=10)
    assert folder.processes()["redis"] == before["redis"], "a SIGKILL cannot stop anything"
    folder.census()
    status = folder.run("status", migration_id, "--json")
    assert status.returncode == 0, status.stderr
    said = [line for line in status.stderr.splitlines() if line.startswith("reembed: ")]
    assert len(said) == 1 and "left running" in said[0] and f"pid {migrate.pid}" in said[0], status.stderr
    folder.end_census()  # it used the orphans; it started no second server
    assert folder.seen["redis"] == set(before["redis"]) and folder.seen["chroma"] == set(before["chroma"])
    folder.assert_nothing_left()  # the last user out stopped what the killed command left
    started = time.monotonic()
    final = folder.ok("resume", migration_id)
    assert final["state"] == "live" and final["done"] == 600, final
    assert time.monotonic() - started < 300, "resume waited for the visibility timeout"
    folder.assert_nothing_left()
    served = folder.collection(final["target_collection"])
    assert len(served) == 600


def _latest(folder: Folder, kind: str = "ingest") -> str | None:
    done = folder.run("status", "--json")
    if done.returncode != 0:
        return None
    answer = json.loads(done.stdout)
    for row in answer["aliases"] + answer["ingests"]:
        if row.get("kind") == kind:
            return str(row["migration_id"])
    return None


def test_what_used_to_hang_fails_within_seconds_with_the_reason(folder: Folder, tmp_path: Path) -> None:
    minilm = need(M2V_MINILM)
    corpus = scifact(tmp_path, 30)
    # --workers 0 on the folder's own Redis: nothing would ever read the queue.
    started = time.monotonic()
    done = folder.run("ingest", "docs", str(corpus), "--model", str(minilm), "--workers", "0")
    assert done.returncode == 5 and "--workers 0" in done.stderr.strip().splitlines()[-1], done.stderr
    assert time.monotonic() - started < 60
    assert "docs" not in json.dumps(folder.ok("status"))  # refused before anything was created

    # Metadata Chroma would refuse: caught by validation, naming the document and the key.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "ok", "text": "fine"}\n{"id": "nan-doc", "text": "t", "metadata": {"score": NaN}}\n')
    done = folder.run("ingest", "docs", str(bad), "--model", str(minilm))
    assert done.returncode == 2 and "nan-doc" in done.stderr and "'score'" in done.stderr, done.stderr
    bad.write_text(json.dumps({"id": "big-doc", "text": "t", "metadata": {"n": 2**64}}) + "\n")
    done = folder.run("ingest", "docs", str(bad), "--model", str(minilm))
    assert done.returncode == 2 and "big-doc" in done.stderr and "64-bit" in done.stderr, done.stderr

    # A model folder whose weights are truncated: the worker fails the ingest with the reason.
    broken = tmp_path / "broken-model"
    subprocess.run(["cp", "-r", str(minilm), str(broken)], check=True)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = folder.run("ingest", "broken", str(corpus), "--model", str(broken))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "cannot be loaded" in last and last.startswith("reembed: error: "), done.stderr
    folder.assert_nothing_left()

    # The data folder deleted under a running ingest: the command says so and stops its services.
    ingest = folder.start("ingest", "gone", str(scifact(tmp_path, 1500)), "--model", str(minilm),
                          "--batch-size", "4")
    wait_until(lambda: (folder.data / "stack.json").exists() and folder.processes()["workers"], "workers run", 90)
    time.sleep(3)
    left = folder.processes()
    print("running before the folder was deleted:", left)
    subprocess.run(["rm", "-rf", str(folder.data)], check=True)
    code = ingest.wait(timeout=60)
    err = ingest.communicate()[1]
    assert code != 0 and "deleted" in err.strip().splitlines()[-1], err[-2000:]
    for pids in left.values():
        for pid in pids:
            wait_until(lambda pid=pid: not _running(pid), f"pid {pid} of the deleted folder stops", 60)


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def test_up_keeps_the_stack_running_and_down_stops_it(folder: Folder, tmp_path: Path) -> None:
    """`reembed up` pins the stack: an ingest returns at once and the workers finish it after the
    command ended; `down` stops everything."""
    up = folder.ok("up", "--workers", "1")
    assert up["pinned"] and set(up["services"]) == {"redis", "chroma", "workers", "control"}, up
    started = folder.ok("ingest", "docs", str(scifact(tmp_path, 300)), "--model", str(need(M2V_MINILM)))
    assert started["state"] in ("running", "verifying", "live"), started
    assert folder.processes()["workers"], "the pinned workers stay after the command"
    wait_until(lambda: folder.ok("status", started["migration_id"])["state"] == "live", "the ingest ends", 120)
    shown = folder.ok("up", "--status")
    assert shown["services"]["redis"]["pid"] == up["services"]["redis"]["pid"], "a command started a second Redis"
    down = folder.ok("down")
    assert down["stopped"] == ["chroma", "control", "redis", "workers"], down
    folder.assert_nothing_left()
    assert folder.ok("down")["stopped"] == []


def test_on_shared_services_a_wait_without_workers_says_so_and_goes_on(
        settings: Any, control: Any, start_workers: Any, tmp_path: Path) -> None:
    """Shared Redis and Chroma: workers may be scaled from zero on the queue's length, so a
    `--wait` with none running says so at once on stderr and finishes when one starts."""
    from reembed.registry import MigrationState

    first = start_workers(1)
    record = control.ingest("shared", scifact(tmp_path, 60), str(need(M2V_MINILM)), batch_size=20)
    assert control.wait(record.id, timeout=120).state == MigrationState.LIVE
    first.stop()
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1"}
    waiting = subprocess.Popen([sys.executable, "-m", "cli.main", "migrate", "shared", "--to", str(need(M2V_MPNET)),
                                "--wait", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert waiting.stderr is not None
    said = ""
    deadline = time.monotonic() + 60
    while "no worker answers" not in said and time.monotonic() < deadline:
        said += waiting.stderr.readline()
    assert "no worker answers on REEMBED_REDIS_URL" in said, said
    start_workers(1)
    out, err = waiting.communicate(timeout=COMMAND_S)
    assert waiting.returncode == 0, err[-2000:]
    assert json.loads(out)["state"] == "live"


@pytest.mark.parametrize(("command", "how"), [("serve", signal.SIGHUP), ("serve", signal.SIGKILL),
                                               ("ingest", signal.SIGKILL)])
def test_every_long_command_leaves_nothing_behind(folder: Folder, tmp_path: Path, command: str,
                                                  how: signal.Signals) -> None:
    """SIGHUP stops what the command started; after a SIGKILL the next command takes the orphans
    over (one line) and stops them when it ends. Never a second server."""
    if command == "serve":
        folder.ok("ingest", "docs", str(scifact(tmp_path, 20)), "--model", str(need(M2V_MINILM)))
        port = free_port()
        proc = folder.start("serve", "--port", str(port))
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), "serve answers", 60)
    else:
        proc = folder.start("ingest", "docs", str(scifact(tmp_path, 1500)), "--model", str(need(M2V_MINILM)),
                            "--batch-size", "4")
        wait_until(lambda: _latest(folder), "the ingest starts")
    before = folder.processes()
    folder.census()
    proc.send_signal(how)
    code = proc.wait(timeout=90)
    if how == signal.SIGKILL:
        assert folder.processes()["redis"] == before["redis"]
        after = folder.run("status", "--json")
        assert after.returncode == 0 and "left running" in after.stderr and f"pid {proc.pid}" in after.stderr, \
            after.stderr
    else:  # uvicorn turns the signal into its graceful shutdown (and may raise SIGTERM again after it)
        allowed = {128 + how} | ({0, 128 + signal.SIGTERM} if command == "serve" else set())
        assert code in allowed, proc.communicate()[1][-2000:]
    folder.end_census()
    folder.assert_one_of_each()
    folder.assert_nothing_left()
