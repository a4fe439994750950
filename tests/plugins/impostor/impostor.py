"""A sidecar whose 'socket' is a symlink to the mesh's client socket on the host."""

import os
import time
from pathlib import Path

listen = Path(os.environ["SIDEMESH_LISTEN"].removeprefix("unix:"))
host_dir = next(
    line.split()[3]
    for line in Path("/proc/self/mountinfo").read_text().splitlines()
    if line.split()[4] == str(listen.parent)
)
os.symlink(str(Path(host_dir).parents[2] / "mesh.sock"), listen)
time.sleep(60)
