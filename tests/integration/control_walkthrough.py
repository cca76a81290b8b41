"""A migration driven only over the control API, by a client that knows nothing of reembed.

Run as its own process with the Python standard library only (the test checks that no reembed
module was imported): ``python control_walkthrough.py URL ADMIN_KEY READ_KEY CORPUS FROM TO``.
Prints one JSON object: what it saw, for the test to check.
"""

import json
import sys
import time
import urllib.error
import urllib.request


def call(method, url, key, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait(base, key, migration_id, states, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        status, body = call("GET", f"{base}/migrations/{migration_id}", key)
        assert status == 200, body
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.3)


def main():
    base, admin, read, corpus, from_model, to_model = sys.argv[1:7]
    seen = {}
    status, body = call("POST", f"{base}/aliases/walk/ingests", admin, {"file": corpus, "model": from_model})
    assert status == 202, body
    seen["ingest"] = wait(base, read, body["migration_id"], {"live", "failed"})
    status, body = call("POST", f"{base}/aliases/walk/migrations", admin, {"to_model": to_model, "cutover": "manual"})
    assert status == 202, body
    migration_id = body["migration_id"]
    seen["complete"] = wait(base, read, migration_id, {"complete", "failed"})
    seen["refused_cutover"] = call("POST", f"{base}/aliases/walk/cutover", read)
    status, seen["cutover"] = call("POST", f"{base}/aliases/walk/cutover", admin, {"search_wait_s": 0})
    assert status == 200, seen["cutover"]
    seen["search"] = call("GET", f"{base}/search?alias=walk&q=cell+biology&k=3", read)[1]
    status, seen["rollback"] = call("POST", f"{base}/aliases/walk/rollback", admin)
    assert status == 200, seen["rollback"]
    seen["history"] = call("GET", f"{base}/aliases/walk/history", read)[1]
    seen["events"] = call("GET", f"{base}/events?after=0-0&limit=1000", read)[1]
    seen["migration_id"] = migration_id
    seen["imported_reembed"] = sorted(m for m in sys.modules if m.split(".")[0] in
                                      ("reembed", "producer", "search", "worker", "cli"))
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
