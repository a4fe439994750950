"""The fixtures of the client's tests: a test server, and a client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from clientkit import MeshServer

from clients import AsyncMeshClient


@pytest.fixture
def mesh() -> Iterator[MeshServer]:
    server = MeshServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def client(mesh: MeshServer) -> AsyncIterator[AsyncMeshClient]:
    async with AsyncMeshClient(mesh.address, metadata=[("x-client", "tests")]) as mesh_client:
        yield mesh_client
