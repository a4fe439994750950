"""Fixtures of the data plane's tests: upstreams, the internal server, a data plane."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest
from dataplanekit import Decider, Internal, Mesh, Upstream, make_dataplane, temp_dir


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    directory = temp_dir()
    a = Upstream("a", f"unix:{directory}/a.sock")
    b = Upstream("b", "127.0.0.1:0", slowness=0.0)
    internal = Internal(f"unix:{directory}/internal.sock")
    for server in (a, b, internal):
        await server.start()
    decider = Decider()
    plane = make_dataplane(decider, internal.address, worker_threads=2)
    plane.set_upstream("a", a.address)
    plane.set_upstream("b", b.address)
    tcp = plane.listen("127.0.0.1:0", listener_id="clients")
    unix = plane.listen(f"unix:{directory}/mesh.sock", listener_id="clients")
    callback = plane.listen(f"unix:{directory}/files.sock", listener_id="cb-files", caller="files")
    yield Mesh(plane, decider, a, b, internal, tcp, unix, callback, directory)
    plane.stop(0.0)
    for server in (a, b, internal):
        await server.stop()
    shutil.rmtree(directory, ignore_errors=True)
