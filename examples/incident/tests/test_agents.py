from app.routes import agents, agents_fixed


async def test_list_agents():
    assert await agents.list_agents() == ["alpha", "beta", "gamma"]


async def test_list_agents_fixed():
    assert await agents_fixed.list_agents() == ["alpha", "beta", "gamma"]
