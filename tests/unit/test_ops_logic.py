"""Operations logic: the --watch progress display, Prometheus exposition, compose file vs settings."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cli.watch import bar, line, watch
from reembed.settings import FIELDS, PREFIX

ROOT = Path(__file__).resolve().parents[2]


def test_progress_bar_shows_done_failed_and_rest() -> None:
    assert bar(0, 0, 100, width=10) == "[..........]"
    assert bar(50, 0, 100, width=10) == "[#####.....]"
    assert bar(50, 20, 100, width=10) == "[#####xx...]"
    assert bar(100, 0, 100, width=10) == "[##########]"
    assert bar(5, 0, 0, width=4) == "[####]"  # never divides by zero
    text = line({"alias": "docs", "done": 250, "failed": 0, "skipped": 0, "total": 1000, "docs_per_s": 12.5,
                 "eta_s": 60, "state": "running"})
    assert "25.0%" in text and "250/1,000" in text and "12.5 docs/s" in text and "ETA 60 s" in text


def test_watch_redraws_until_every_migration_has_ended() -> None:
    frames = iter([
        [{"migration_id": "m1", "alias": "a", "done": 10, "failed": 0, "total": 100, "state": "running"},
         {"migration_id": "m0", "alias": "b", "done": 5, "failed": 0, "total": 5, "state": "live"}],
        [{"migration_id": "m1", "alias": "a", "done": 60, "failed": 1, "total": 100, "state": "running"}],
        [{"migration_id": "m1", "alias": "a", "done": 99, "failed": 1, "total": 100, "state": "live"}],
    ])
    out = io.StringIO()
    final = watch(lambda: next(frames), out, interval=0, tty=True)
    assert [r["state"] for r in final] == ["live"]
    text = out.getvalue()
    assert text.count("\x1b[1F\x1b[J") == 2  # redrawn in place twice, one line each time
    assert "alias" not in text.split("\n")[0] and " b " not in text  # only migrations seen running
    assert "100.0%" in text.splitlines()[-1]


def test_compose_file_matches_the_settings_module() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "chroma", "worker", "worker-gpu", "control", "search", "flower"} <= set(services)
    known = {PREFIX + f.name for f in FIELDS}
    for name, service in services.items():
        env = service.get("environment") or {}
        reembed_vars = {k for k in env if k.startswith(PREFIX)}
        assert reembed_vars <= known, (name, reembed_vars - known)  # only real settings
        assert "healthcheck" in service, f"{name} has no health check"
        for port in service.get("ports", []):  # loopback unless the user changes it
            assert str(port).startswith("127.0.0.1:") or "${" in str(port), (name, port)
    for name in ("worker", "worker-gpu", "control", "search"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile" or services[name].get("image") == \
            services["worker"].get("image")
        env = services[name]["environment"]
        assert env["REEMBED_REDIS_URL"].startswith("redis://redis:6379")
        assert env["REEMBED_CHROMA_URL"] == "http://chroma:8000"
    assert "--appendonly" in " ".join(services["redis"]["command"]) and "yes" in services["redis"]["command"]
    assert any(v.startswith("redis-data:") for v in services["redis"]["volumes"])
    assert any(v.startswith("chroma-data:") for v in services["chroma"]["volumes"])
    assert {"redis-data", "chroma-data"} <= set(compose["volumes"])
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["REEMBED_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert services["flower"]["profiles"] == ["flower"]
    assert "-Q" in services["worker"]["command"] and "reembed.batches" in services["worker"]["command"]
    assert "reembed.control" in services["control"]["command"]
    assert "container_name" not in services["worker"]  # `--scale worker=N` needs unnamed containers


def _compose() -> str | None:
    beside = ROOT / ".venv" / "bin" / "docker-compose"
    return str(beside) if beside.exists() else shutil.which("docker-compose")


@pytest.mark.skipif(_compose() is None, reason="docker compose is not installed (scripts/install.sh fetches it)")
def test_compose_file_is_valid_for_docker_compose() -> None:
    for profiles in ([], ["--profile", "gpu", "--profile", "flower"]):
        result = subprocess.run([_compose(), "-f", str(ROOT / "docker-compose.yml"), *profiles, "config", "--quiet"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0, result.stderr
