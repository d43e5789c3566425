"""A light BPS-Parsl site for one machine: run each job in a Parsl thread pool (no worker processes to start).

Use it in a BPS submit file instead of ``lsst.ctrl.bps.parsl.sites.Local``::

    computeSite: threads
    site:
      threads:
        class: diffim.rubin.bps_sites.Threads
        cores: 2

Each job is still a ``pipetask run-qbb`` subprocess, so the threads only wait on them; the saving is the
start-up of the HighThroughputExecutor's interchange and workers.
"""

from __future__ import annotations

from lsst.ctrl.bps.parsl.configuration import get_bps_config_value
from lsst.ctrl.bps.parsl.site import SiteConfig
from parsl.executors import ThreadPoolExecutor

__all__ = ["Threads"]


class Threads(SiteConfig):
    """Parsl ``ThreadPoolExecutor`` with ``site.<computeSite>.cores`` threads (default 1)."""

    def get_executors(self):
        cores = get_bps_config_value(self.site, "cores", int, default=1)
        return [ThreadPoolExecutor(label="threads", max_threads=cores)]

    def select_executor(self, job) -> str:
        return "threads"
