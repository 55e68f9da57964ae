"""The dashboard poller that turned one leaking endpoint into an outage: it calls GET /agents
every few seconds, and each call strands one pooled connection until the pool is exhausted."""

import asyncio

from app.routes.agents import list_agents


async def poll(times: int, interval: float = 0.0) -> list[list[str]]:
    results = []
    for _ in range(times):
        results.append(await list_agents())
        await asyncio.sleep(interval)
    return results
