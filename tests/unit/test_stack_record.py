"""The folder stack's record and process identity (real processes, no services)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli.processes import Service, StackRecord
from cli.stack import FolderStack


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def test_a_service_is_alive_only_while_it_is_the_process_that_was_recorded() -> None:
    process = sleeper()
    service = Service.of(process, "tcp://x")
    assert service.alive()
    assert not Service(service.pid, service.started - 100).alive(), "a reused pid must not pass for ours"
    service.stop(wait_s=5)
    assert not service.alive() and process.poll() is not None


def test_the_record_round_trips_and_an_unreadable_one_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    record = StackRecord({"redis": Service(1, 2.0, "redis://x", 0)}, {"42": "reembed migrate"}, pinned=True)
    record.write(path)
    assert StackRecord.read(path) == record
    path.write_text("{not json")
    assert StackRecord.read(path) == StackRecord()


def test_a_dead_user_is_pruned_and_its_services_reported_once(tmp_path: Path) -> None:
    said: list[str] = []
    process = sleeper()
    try:
        folder = FolderStack(tmp_path, said.append)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        with folder.locked() as record:
            record.services["chroma"] = Service.of(process, "http://127.0.0.1:1")
            record.users[str(gone.pid)] = "reembed migrate"
        with folder.locked() as record:
            folder._prune(record)
            assert record.users == {} and "chroma" in record.services
        assert len(said) == 1 and f"pid {gone.pid} (reembed migrate)" in said[0] and "chroma" in said[0]
        stopped, users = folder.stop(force=False)
        assert stopped == ["chroma"] and users == {} and process.poll() is not None
        assert not (tmp_path / "stack.json").exists()
    finally:
        process.kill()
        process.wait()
