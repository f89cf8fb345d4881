"""For tests that stop a `dataflux run` subprocess mid-run: wait until it has committed clips."""
import json
import time


def wait_for_committed(manifest: str, n: int, proc, deadline_s: float = 180) -> bool:
    """True once the run's manifest lists at least n finished clips; False if the process ended (or the deadline
    passed) first."""
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(manifest, encoding="utf-8") as fh:
                if len(json.load(fh)["done"]) >= n:
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return False
