"""A bounded loopback load test: 200 requests, 20 at a time, some streamed, through the official async `openai`
client against the real app on the fake backend. Every answer must come back, to the request that asked."""

from __future__ import annotations

import asyncio

from openai import AsyncOpenAI

from moa_local.api import MoA
from moa_local.config.recipe import Recipe
from moa_local.engines.fake import FakeEngine, fake_pool
from moa_local.server.background import BackgroundServer
from moa_local.server.openai import create_app
from moa_local.server.settings import ServerSettings

TOTAL, AT_ONCE = 200, 20


async def _ask(client: AsyncOpenAI, gate: asyncio.Semaphore, i: int) -> tuple[int, str]:
    messages = [{"role": "user", "content": f"load question {i}"}]
    async with gate:
        if i % 3 == 0:
            stream = await client.chat.completions.create(model="fake", messages=messages, stream=True)  # type: ignore[arg-type]
            return i, "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        if i % 7 == 0:
            r = await client.chat.completions.create(model="gemma3-270m", messages=messages)  # type: ignore[arg-type]
        else:
            r = await client.chat.completions.create(model="fake", messages=messages)  # type: ignore[arg-type]
        return i, r.choices[0].message.content or ""


async def _load(url: str) -> list[tuple[int, str]]:
    gate = asyncio.Semaphore(AT_ONCE)
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        return await asyncio.gather(*[_ask(client, gate, i) for i in range(TOTAL)])


def test_200_requests_20_at_a_time_all_come_back_to_their_sender(fake_recipe: Recipe) -> None:
    pool = fake_pool(fake_recipe)
    app = create_app(MoA(fake_recipe, pool, backend="fake"), settings=ServerSettings())
    with BackgroundServer(app) as url:
        answers = asyncio.run(_load(url))
    assert len(answers) == TOTAL
    for i, text in answers:
        assert text.endswith(f"load question {i}" + ("" if i % 7 == 0 and i % 3 else " (synthesized 2 references)")), (i, text)
    gemma: FakeEngine = pool.engines["gemma3-270m"]  # type: ignore[assignment]
    served = gemma.submitted
    assert served == 2 * (TOTAL - len([i for i in range(TOTAL) if i % 7 == 0 and i % 3])) + len(
        [i for i in range(TOTAL) if i % 7 == 0 and i % 3]
    ), "each MoA request went through gemma3 twice, each single request once"
