"""The search process's bound on queries in flight: past it, 503 with Retry-After, at once."""

from __future__ import annotations

import asyncio

import httpx

from search.admission import RETRY_AFTER_S, Admission
from starlette.types import Receive, Scope, Send


def test_past_the_bound_a_search_is_refused_at_once_and_admitted_again_after() -> None:
    release = asyncio.Event()
    entered = 0
    refused: list[int] = []

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal entered
        entered += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = Admission(slow, limit=2, on_refused=lambda: refused.append(1))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = [asyncio.create_task(client.get("/search")) for _ in range(2)]
            while entered < 2:
                await asyncio.sleep(0.001)
            third = await asyncio.wait_for(client.get("/search"), timeout=5)  # answered while two are held
            assert third.status_code == 503 and third.headers["retry-after"] == str(RETRY_AFTER_S)
            assert "REEMBED_SEARCH_MAX_IN_FLIGHT" in third.json()["detail"]
            release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert (await client.get("/search")).status_code == 200  # room again
            assert (await client.get("/healthz")).status_code == 200  # other paths are never counted

    asyncio.run(scenario())
    assert refused == [1] and entered == 4  # the refused one never reached the app
