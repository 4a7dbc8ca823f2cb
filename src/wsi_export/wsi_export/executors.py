"""Where an export's block jobs (blocks.py) run, a local thread pool or a dask.distributed cluster, and the
order their results are consumed in: the file order, with a bounded number of jobs in flight."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .blocks import BlockJob, BlockResult, run_block_job
from .errors import ExportCancelled, ExportOptionsError


class LocalExecutor:
    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsi-export")
        self.parallelism = workers

    def submit(self, job: BlockJob) -> Any:
        return self._pool.submit(run_block_job, job)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DistributedExecutor:
    """Jobs go to the cluster; their zarr arrays must live on storage the workers can reach."""

    def __init__(self, scheduler_address: str, timeout_s: float):
        from distributed import Client
        try:
            self._client = Client(scheduler_address, set_as_default=False, timeout=timeout_s)
        except (OSError, TimeoutError) as error:
            raise ExportOptionsError(f"cannot connect to dask scheduler {scheduler_address!r}: "
                                     f"{error}") from error
        self.parallelism = max(1, sum(self._client.nthreads().values()))

    def submit(self, job: BlockJob) -> Any:
        return self._client.submit(run_block_job, job, pure=False)

    def close(self) -> None:
        self._client.close()


def default_local_workers() -> int:
    """Two job threads per core (at most 8): a core stays busy while one of its threads waits on a
    file or is preempted by another process; each thread holds about 40 MB of block buffers."""
    return min(2 * (os.cpu_count() or 1), 8)


def check_not_cancelled(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise ExportCancelled("export cancelled by the caller; no output was left under the final name")


@dataclass(frozen=True)
class PlannedJob:
    job: BlockJob
    depends_on: tuple[int, ...]  # plan indices of the earlier jobs that write this job's input pixels


def ordered_results(executor: Any, plan: list[PlannedJob], window: int,
                     should_cancel: Callable[[], bool] | None) -> Iterator[BlockResult]:
    """Results in plan order with at most `window` jobs submitted but not yet consumed (this bounds
    memory). A job is submitted as soon as the jobs writing its input have completed, so the start of
    a level overlaps the end of the level above instead of waiting for it to drain."""
    submitted: dict[int, Any] = {}
    next_submit = next_yield = 0
    try:
        while next_yield < len(plan):
            while next_submit < len(plan) and next_submit - next_yield < window:
                check_not_cancelled(should_cancel)
                for dependency in plan[next_submit].depends_on:
                    if dependency >= next_yield:
                        submitted[dependency].result()
                submitted[next_submit] = executor.submit(plan[next_submit].job)
                next_submit += 1
            result = submitted.pop(next_yield).result()
            next_yield += 1
            check_not_cancelled(should_cancel)
            yield result
    finally:
        for future in submitted.values():
            future.cancel()
