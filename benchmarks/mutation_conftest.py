"""conftest.py for the mutation run (benchmarks/mutation.py copies it to the scratch root).

Mutants are checked by the fast tests only: a test that needs a Ray cluster (or the shards
made with one) is deselected here, by the fixtures it asks for, so a new slow test is left
out without editing a list. One torch thread: two mutants run side by side on a shared machine.
"""

from __future__ import annotations

import torch

SLOW_FIXTURES = {"ray_session", "shards", "shard_miniature", "cluster_local"}

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    slow = [item for item in items if SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if slow:
        items[:] = [item for item in items if item not in slow]
        config.hook.pytest_deselected(items=slow)
