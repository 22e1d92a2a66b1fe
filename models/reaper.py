"""A watcher that outlives the kinoray process which started a local Ray cluster, and stops
what is left of that cluster once the process is gone, however it ended (SIGKILL included).

Ray ties its head processes (GCS, raylet) to their parent with PR_SET_PDEATHSIG, but the
raylet's agents (dashboard agent, runtime-env agent) are not tied to it and outlive a SIGKILLed
driver. The watcher records the driver's process tree every POLL_S while the driver lives;
when it is gone, each recorded process that still runs (same pid, same start time) gets
SIGTERM, then SIGKILL after GRACE_S.

Run as `python -m kinoray.models.reaper PID`, in a session of its own (see `start`).
"""

from __future__ import annotations

import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 5.0


def start(pid: int) -> None:
    """Watch process `pid` from a detached process (not killed with `pid`'s process group)."""
    subprocess.Popen(
        [sys.executable, "-m", "kinoray.models.reaper", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def watch(pid: int) -> int:
    """Block until `pid` exits, then stop the processes it left; returns how many were left."""
    import psutil

    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    import os

    seen: dict[int, float] = {}
    me = os.getpid()  # a child of the driver too
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    left = []
    for child_pid, started in seen.items():
        try:
            process = psutil.Process(child_pid)
            if process.create_time() == started:
                left.append(process)
        except psutil.NoSuchProcess:
            continue
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(left)


if __name__ == "__main__":
    sys.exit(0 if watch(int(sys.argv[1])) >= 0 else 1)
