"""Open a run of either method. `cluster/` is the only place that knows both."""
from __future__ import annotations

from core.store import Store
from core.stored_run import run_method

METHODS = ("sisa", "erase")


def open_run(store: Store, run: str, executor=None, pool=None):
    """The run object (SisaRun or EraseRun) for the method that made `run`; `executor`
    runs SISA shard work, `pool` ERASE partition work (None: in this process)."""
    if run_method(store, run) == "erase":
        from erase.run import EraseRun

        return EraseRun.open(store, run, pool)
    from sisa.run import SisaRun

    return SisaRun.open(store, run, executor)
