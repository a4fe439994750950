"""Fixtures that run real orchestrator and sidecar processes, and leave none behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from meshproc import Mesh, stop_all

pytestmark = pytest.mark.integration


@pytest.fixture
def make_mesh(tmp_path: Path) -> Iterator[Callable[..., Mesh]]:
    """Builds meshes for one test; each is stopped, and checked for orphans, afterwards."""
    meshes: list[Mesh] = []

    def make(**config: Any) -> Mesh:
        mesh = Mesh(tmp_path / f"mesh{len(meshes)}", **config)
        meshes.append(mesh)
        return mesh

    yield make
    stop_all(meshes)
