"""Whether a process is still alive: stale checkpoint temporaries are those of dead processes, and a
rank waiting on its node's other ranks fails naming one that died."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie (killed, not yet reaped by its parent: a rank started by Lightning's
    launcher, whose parent is rank 0) counts as dead: it will never do anything again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (not Linux), or the process just went
        return True
