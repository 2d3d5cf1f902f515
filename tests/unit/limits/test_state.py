"""proxy.limits.state: the state config's refusals and the memory backend, in process.

The Redis backend, against a real redis-server, is tests/e2e/test_limits_redis.py.
"""

from __future__ import annotations

import pytest

from proxy.config import StateConfig
from proxy.limits.limiter import CONCURRENCY, CREDENTIAL, LimitKey, LimitSpec
from proxy.limits.state import MemoryState, StateBackend, open_state


@pytest.mark.parametrize("kwargs", [dict(backend="etcd"), dict(failure_policy="maybe")])
def test_state_config_refuses(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        StateConfig(**kwargs)


async def test_memory_state_is_a_backend() -> None:
    async with open_state(StateConfig(max_keys=10, max_signatures=10)) as state:
        assert isinstance(state, MemoryState) and isinstance(state, StateBackend)
        keys = [LimitKey(CREDENTIAL, "app", LimitSpec(max_concurrent=1))]
        first = await state.acquire(keys, 0.0)
        refused = await state.acquire(keys, 0.0)
        assert first.allowed and (refused.allowed, refused.limit) == (False, CONCURRENCY)
        await state.release(first.lease)
        assert (await state.acquire(keys, 0.0)).allowed
        assert await state.check_and_add_signature("sig", 100.0, 0.0)
        assert not await state.check_and_add_signature("sig", 100.0, 1.0)
        assert state.healthy()
