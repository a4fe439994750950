"""Unmounts a mesh's data images when the orchestrator dies without stopping them.

``python -m orchestrator.sandbox._reaper PID IMAGES DATA_ROOT``: started by the
orchestrator (``PID``) when it mounts its first data image, in a session of
its own. It waits for the orchestrator to exit, then unmounts every image in
``IMAGES`` that no live mesh holds (the lock file of each) from its data dir
under ``DATA_ROOT``, and frees its loop device. After a clean stop there is
nothing left to do; after a SIGKILL, an OOM kill or a crash, nothing stays
mounted. (Should the reaper be killed too, the next mesh on the same state dir
cleans up before it mounts.)
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
from pathlib import Path

from orchestrator.sandbox._image import release_abandoned


def main(argv: list[str]) -> int:
    """Waits for the orchestrator, then releases what it left mounted."""
    if len(argv) != 3 or not argv[0].isdigit():
        print("usage: python -m orchestrator.sandbox._reaper PID IMAGES DATA_ROOT", file=sys.stderr)
        return 2
    pid, images, data_root = int(argv[0]), Path(argv[1]), Path(argv[2])
    try:
        alive = os.pidfd_open(pid)
    except ProcessLookupError:
        alive = None
    if alive is not None and os.getppid() == pid:  # else it is gone already (or not ours)
        select.select([alive], [], [])  # readable once the process has exited
    for note in release_abandoned(images, data_root):
        with contextlib.suppress(OSError):  # the log may have gone with the orchestrator
            print(f"sidemesh data reaper: {note}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
