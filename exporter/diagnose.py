"""``diagnose``: the unmanaged-memory playbook of docs/runbooks.md, run as one command.

For each selected worker, in this order:

1. unmanaged memory, old and recent, from the scheduler's heartbeats (``identity``, decoded by
   ``scheduler.py`` and folded into ``memory.MemoryModel`` over a short sampling window);
2. its executing tasks, 3. what ``gc.collect()`` gives back, 4. what glibc's ``malloc_trim(0)``
   then gives back, and 5. whether ``MALLOC_TRIM_THRESHOLD_`` is set: the fixed functions of
   ``worker_actions.py``, run through ``Client.run``;
6. a verdict (``assess``): task heap, garbage not yet collected, memory the allocator kept, or
   a probable leak, each with the next step.

Unmanaged *old* is what stayed over a window. The scheduler keeps its own minimum over
``recent-to-old-time`` (30 s) in ``WorkerState.memory``, but only ``run_on_scheduler`` (code run
on the scheduler) and the debugging ``dump_state`` (every task, not type stable) return it. So,
as the exporter does, we mirror the scheduler's sliding minimum from heartbeats, over
``--sample-time`` (5 s by default): "old" here is the minimum over the sampled seconds. That is
never below the scheduler's figure and equals it when unmanaged memory did not dip during the
scheduler's longer window: memory that stays, which is what a diagnosis after an alert is
about. ``--sample-time 30s`` samples Dask's whole window.

This module is the client side: it may import the rest of the package. The worker side lives
in ``worker_actions.py``, which may not. The actions are per worker and independent
(``collect_garbage`` and ``trim_allocator`` each report RSS before and after), so remediation
can run just one of them on one worker. ``run_action`` runs one through a ``Client``; ``serve``
never holds a Client, and can send the same function through its scheduler ``rpc``'s
``broadcast`` handler, which is what ``Client.run`` does underneath.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from dask.utils import format_bytes, parse_timedelta

from . import worker_actions
from .config import ConfigError, load_settings
from .memory import MemoryBreakdown, MemoryModel
from .scheduler import DecodeError, SchedulerPoll, WorkerInfo, decode_identity

__all__ = [
    "LEAK_LIMIT_SHARE",
    "LEAK_MIN_BYTES",
    "SIGNIFICANT_BYTES",
    "SIGNIFICANT_SHARE",
    "TASK_HEAP_SHARE",
    "Finding",
    "WorkerFacts",
    "assess",
    "run_action",
    "run_diagnose",
]

MiB = 2**20

SIGNIFICANT_BYTES = 32 * MiB
"""An action must free at least this much RSS to count as a cause.

Below it, a change in RSS is within a worker's ordinary churn (comm buffers, the system
monitor's samples, pymalloc arenas coming and going): it explains nothing worth acting on.
"""

SIGNIFICANT_SHARE = 0.2
"""... and at least this share of the unmanaged memory it started from.

Freeing a fifth of the unmanaged memory is a cause worth fixing; a smaller share next to a
large remainder leaves the remainder as the story (usually a leak).
"""

TASK_HEAP_SHARE = 0.5
"""With tasks executing, unmanaged memory is "task heap" when at least half of it is recent.

Task heaps appear while tasks run and go when they finish, so they sit in the recent part;
memory that already stayed over the window is something else.
"""

LEAK_MIN_BYTES = 256 * MiB
"""Unmanaged memory that survives gc and trim is a probable leak only above this many bytes...

A healthy worker keeps its interpreter, distributed and the libraries its tasks import:
about 60 MiB for a bare worker, 200-300 MiB with pandas and pyarrow loaded. That stays after
gc and trim too and is not a leak.
"""

LEAK_LIMIT_SHARE = 0.2
"""... and above this share of the worker's memory limit.

On a large worker a few hundred MiB that stay are harmless; a fifth of the limit is a third of
what the target threshold (60%) allows, where it starts to push managed data to disk.
"""

Verdict = Literal["task-heap", "garbage", "allocator", "leak", "ok"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One cause, why we think so, and what to do about it."""

    verdict: Verdict
    reason: str
    next_step: str


@dataclass(frozen=True, slots=True)
class GcResult:
    """What ``worker_actions.collect_garbage`` reported."""

    rss_before: int
    rss_after: int
    collected: int

    @property
    def freed(self) -> int:
        return max(0, self.rss_before - self.rss_after)


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What ``worker_actions.trim_allocator`` reported; ``reason`` set when not available."""

    available: bool
    rss_before: int = 0
    rss_after: int = 0
    reason: str | None = None

    @property
    def freed(self) -> int:
        return max(0, self.rss_before - self.rss_after)


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    """Everything the verdict looks at for one worker (plain numbers: ``assess`` is pure)."""

    name: str
    address: str
    memory_limit: int | None
    memory: MemoryBreakdown
    executing: int | None
    gc: GcResult
    trim: TrimResult
    trim_threshold: str | None

    @property
    def unmanaged_before(self) -> int:
        """Unmanaged memory when the actions started: fresh RSS minus managed data."""
        return max(0, self.gc.rss_before - self.memory.managed)

    @property
    def unmanaged_after(self) -> int:
        """Unmanaged memory after gc and (where available) trim."""
        rss = self.trim.rss_after if self.trim.available else self.gc.rss_after
        return max(0, rss - self.memory.managed)

    @property
    def old_remaining(self) -> int:
        """Old unmanaged memory that is still there after both actions."""
        return min(self.memory.unmanaged_old, self.unmanaged_after)


def significant(freed: int, unmanaged: int) -> bool:
    """Whether an action that freed ``freed`` bytes of ``unmanaged`` explains something."""
    return freed >= SIGNIFICANT_BYTES and freed >= SIGNIFICANT_SHARE * unmanaged


def leak_threshold(memory_limit: int | None) -> int:
    """Remaining old unmanaged bytes from which we call it a probable leak."""
    if not memory_limit:
        return LEAK_MIN_BYTES
    return max(LEAK_MIN_BYTES, int(LEAK_LIMIT_SHARE * memory_limit))


def _b(n: int) -> str:
    return str(format_bytes(n))


def _task_heap(f: WorkerFacts) -> Finding | None:
    m = f.memory
    heap = max(SIGNIFICANT_BYTES, TASK_HEAP_SHARE * m.unmanaged)
    if not f.executing or m.unmanaged_recent < heap:
        return None
    return Finding(
        "task-heap",
        f"{f.executing} task(s) executing and {_b(m.unmanaged_recent)} of "
        f"{_b(m.unmanaged)} unmanaged memory is recent",
        "let the tasks finish and run diagnose again; if it recurs, use smaller chunks or "
        "partitions, fewer threads per worker, or more memory per worker",
    )


def _garbage(f: WorkerFacts) -> Finding | None:
    if not significant(f.gc.freed, f.unmanaged_before):
        return None
    return Finding(
        "garbage",
        f"gc.collect() freed {_b(f.gc.freed)} ({f.gc.collected} objects unreachable)",
        "garbage in reference cycles was waiting for the collector: look for cycles in the "
        "task code (closures over large objects, stored exceptions and their frames) and for "
        "code that disables gc; the worker log's 'full garbage collections took' warns of it",
    )


def _allocator(f: WorkerFacts) -> Finding | None:
    if not f.trim.available or not significant(f.trim.freed, f.unmanaged_after + f.trim.freed):
        return None
    var = worker_actions.TRIM_THRESHOLD_VARIABLE
    if f.trim_threshold is None:
        step = (
            f"start this worker with {var}=65536 in its environment (the nanny sets it; this "
            "worker lacks it, e.g. started without a nanny or with old settings), or use jemalloc"
        )
    else:
        step = (
            f"{var}={f.trim_threshold} is set but freed memory stayed fragmented: use jemalloc "
            "(LD_PRELOAD) or fewer malloc arenas (MALLOC_ARENA_MAX=2), or trim periodically"
        )
    return Finding(
        "allocator",
        f"malloc_trim(0) freed {_b(f.trim.freed)} that glibc kept after it was freed",
        step,
    )


def _leak(f: WorkerFacts) -> Finding | None:
    threshold = leak_threshold(f.memory_limit)
    if f.old_remaining < threshold:
        return None
    return Finding(
        "leak",
        f"{_b(f.old_remaining)} of old unmanaged memory stays after gc and trim "
        f"(probable leak from {_b(threshold)})",
        "find what holds it with tracemalloc or memray on this worker (module-level caches, "
        "growing lru_caches, C extensions); meanwhile recycle workers with "
        "dask worker --lifetime 2h --lifetime-stagger 10m --lifetime-restart",
    )


def assess(facts: WorkerFacts) -> list[Finding]:
    """Every cause that applies, in the playbook's order; the first is the verdict.

    Never empty: with no cause, one ``ok`` finding.
    """
    found = [
        x
        for x in (_task_heap(facts), _garbage(facts), _allocator(facts), _leak(facts))
        if x is not None
    ]
    if found:
        return found
    return [
        Finding(
            "ok",
            f"{_b(facts.unmanaged_after)} unmanaged after gc and trim, below "
            f"{_b(leak_threshold(facts.memory_limit))}; nothing else to reclaim",
            "nothing to do on this worker",
        )
    ]


def facts_from(info: WorkerInfo, memory: MemoryBreakdown, result: Mapping[str, Any]) -> WorkerFacts:
    """Combine the scheduler's view and ``worker_actions.diagnose_worker``'s answer."""
    gc = result["gc"]
    trim = result["trim"]
    executing = result.get("executing")
    threshold = result.get("malloc_trim_threshold")
    return WorkerFacts(
        name=info.name,
        address=info.address,
        memory_limit=info.memory_limit,
        memory=memory,
        executing=int(executing) if executing is not None else None,
        gc=GcResult(int(gc["rss_before"]), int(gc["rss_after"]), int(gc["collected"])),
        trim=TrimResult(
            available=True, rss_before=int(trim["rss_before"]), rss_after=int(trim["rss_after"])
        )
        if trim.get("available")
        else TrimResult(available=False, reason=str(trim.get("reason", "not available"))),
        trim_threshold=str(threshold) if threshold is not None else None,
    )


# --- running it -------------------------------------------------------------------------------


class Progress:
    """One self-overwriting status line on stderr, only when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[K{text}")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


async def sample_memory(
    identity: Callable[[], Awaitable[Mapping[str, Any]]],
    duration: float,
    interval: float = 0.25,
    progress: Progress | None = None,
) -> tuple[SchedulerPoll, dict[str, MemoryBreakdown]]:
    """Poll the scheduler's ``identity`` for ``duration`` seconds and fold it into the model.

    The model adds a sample only when a worker's heartbeat time changes, so polling faster
    than heartbeats costs a round trip and nothing else. Returns the last poll and each
    worker's breakdown, "old" being the minimum over the sampled heartbeats.
    """
    model = MemoryModel(recent_to_old_time=duration + 60)
    start = time.monotonic()
    while True:
        poll = decode_identity(await identity())
        memory = model.update({a: w.reading for a, w in poll.workers.items()})
        elapsed = time.monotonic() - start
        if elapsed >= duration:
            return poll, memory
        if progress is not None:
            progress.show(f"sampling scheduler heartbeats {elapsed:.1f}/{duration:.1f} s")
        await asyncio.sleep(min(interval, duration - elapsed))


async def run_action(
    client: Any, address: str, action: Callable[..., dict[str, Any]], timeout: float
) -> dict[str, Any]:
    """Run one fixed function of ``worker_actions`` on one worker and return its answer."""
    answers = await asyncio.wait_for(client.run(action, workers=[address]), timeout)
    return dict(answers[address])


def select_workers(poll: SchedulerPoll, wanted: Sequence[str]) -> list[WorkerInfo]:
    """The workers named (by name or address) in ``wanted``, or all; ValueError if unknown."""
    workers = sorted(poll.workers.values(), key=lambda w: (w.name, w.address))
    if not wanted:
        return workers
    by_key = {w.name: w for w in workers} | {w.address: w for w in workers}
    unknown = [w for w in wanted if w not in by_key]
    if unknown:
        known = ", ".join(w.name for w in workers[:10]) + (", …" if len(workers) > 10 else "")
        raise ValueError(f"unknown worker {unknown[0]!r} (known: {known or 'none'})")
    picked = {by_key[w].address: by_key[w] for w in wanted}
    return list(picked.values())


@dataclass(frozen=True, slots=True)
class Outcome:
    """One worker's row: facts and findings, or the error that prevented them."""

    info: WorkerInfo
    facts: WorkerFacts | None
    findings: list[Finding]
    error: str | None = None


async def diagnose_workers(
    client: Any,
    workers: Sequence[WorkerInfo],
    memory: Mapping[str, MemoryBreakdown],
    timeout: float,
    progress: Progress,
) -> list[Outcome]:
    """Run the actions on every worker in parallel; one failing worker never hides others."""

    async def one(info: WorkerInfo) -> Outcome:
        try:
            result = await run_action(client, info.address, worker_actions.diagnose_worker, timeout)
            facts = facts_from(info, memory[info.address], result)
        except asyncio.TimeoutError:
            return Outcome(info, None, [], f"no answer within {timeout:g} s")
        except Exception as e:
            return Outcome(info, None, [], f"{type(e).__name__}: {e}")
        return Outcome(info, facts, assess(facts))

    tasks = [asyncio.ensure_future(one(w)) for w in workers]
    progress.show(f"diagnosing {len(tasks)} worker(s): 0 done")
    for done, fut in enumerate(asyncio.as_completed(tasks), start=1):
        await fut
        progress.show(f"diagnosing {len(tasks)} worker(s): {done} done")
    progress.done()
    return [t.result() for t in tasks]


# --- output -----------------------------------------------------------------------------------


def to_json(scheduler: str, sample_time: float, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """The machine-readable report (``--json``)."""
    return {
        "scheduler": scheduler,
        "sample_seconds": sample_time,
        "workers": [_outcome_json(o) for o in outcomes],
    }


def _outcome_json(o: Outcome) -> dict[str, Any]:
    out: dict[str, Any] = {"name": o.info.name, "address": o.info.address}
    f = o.facts
    if f is None:
        return out | {"error": o.error, "verdict": None}
    m = f.memory
    trim: dict[str, Any] = {"available": f.trim.available}
    if f.trim.available:
        trim |= {
            "rss_before_bytes": f.trim.rss_before,
            "rss_after_bytes": f.trim.rss_after,
            "freed_bytes": f.trim.freed,
        }
    else:
        trim["reason"] = f.trim.reason
    first = o.findings[0]
    return out | {
        "memory_limit_bytes": f.memory_limit,
        "memory": {
            "process_bytes": m.process,
            "managed_bytes": m.managed,
            "unmanaged_old_bytes": m.unmanaged_old,
            "unmanaged_recent_bytes": m.unmanaged_recent,
        },
        "executing_tasks": f.executing,
        "gc": {
            "rss_before_bytes": f.gc.rss_before,
            "rss_after_bytes": f.gc.rss_after,
            "freed_bytes": f.gc.freed,
            "collected_objects": f.gc.collected,
        },
        "trim": trim,
        "malloc_trim_threshold": f.trim_threshold,
        "unmanaged_after_bytes": f.unmanaged_after,
        "verdict": first.verdict,
        "reason": first.reason,
        "next_step": first.next_step,
        "findings": [
            {"verdict": x.verdict, "reason": x.reason, "next_step": x.next_step} for x in o.findings
        ],
        "error": None,
    }


TABLE_HEADER = (
    "WORKER",
    "PROCESS",
    "MANAGED",
    "UNMANAGED OLD",
    "RECENT",
    "TASKS",
    "GC FREED",
    "TRIM FREED",
    worker_actions.TRIM_THRESHOLD_VARIABLE,
    "VERDICT",
)


def _row(o: Outcome) -> tuple[str, ...]:
    f = o.facts
    if f is None:
        return (o.info.name, *(["-"] * (len(TABLE_HEADER) - 2)), "error")
    m = f.memory
    return (
        f.name,
        _b(m.process),
        _b(m.managed),
        _b(m.unmanaged_old),
        _b(m.unmanaged_recent),
        "?" if f.executing is None else str(f.executing),
        f"{_b(f.gc.freed)} ({f.gc.collected} obj)",
        _b(f.trim.freed) if f.trim.available else "n/a",
        f.trim_threshold if f.trim_threshold is not None else "unset",
        o.findings[0].verdict,
    )


def render_table(scheduler: str, sample_time: float, outcomes: Sequence[Outcome]) -> str:
    """The readable report: one row per worker, then each worker's findings and next steps."""
    rows = [TABLE_HEADER, *(_row(o) for o in outcomes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    lines = [
        f"scheduler {scheduler}; unmanaged old = minimum over {sample_time:g} s of heartbeats",
        "",
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    for o in outcomes:
        if o.facts is None:
            lines.append(f"{o.info.name}: error: {o.error}")
            continue
        if not o.facts.trim.available:
            lines.append(f"{o.info.name}: malloc_trim {o.facts.trim.reason}")
        for x in o.findings:
            lines.append(f"{o.info.name}: {x.verdict}: {x.reason}.")
            lines.append(f"    next: {x.next_step}.")
    return "\n".join(lines)


# --- command ----------------------------------------------------------------------------------


class DiagnoseUsageError(ValueError):
    """Bad input to ``diagnose`` (unknown worker, bad duration, bad or unreachable address)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``diagnose``."""
    p.add_argument("--scheduler", help="scheduler address (default: $DASK_SCHEDULER_ADDRESS)")
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="NAME",
        help="worker name or address; repeat for several (default: every worker)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--sample-time",
        default="5s",
        help="how long to sample heartbeats for unmanaged old/recent; 0: one sample, so "
        "everything counts as old (default: 5s)",
    )
    p.add_argument(
        "--timeout",
        default="10s",
        help="time allowed to connect, and for each worker's actions (default: 10s)",
    )
    for opt in ("tls-ca-file", "tls-cert", "tls-key"):
        p.add_argument(f"--{opt}", help=f"{opt.replace('-', ' ')} for a tls:// scheduler")


def _seconds(option: str, value: str) -> float:
    try:
        seconds = float(parse_timedelta(value))
    except (ValueError, KeyError, TypeError):
        raise DiagnoseUsageError(f"{option}: invalid duration {value!r}") from None
    if seconds < 0:
        raise DiagnoseUsageError(f"{option}: must not be negative")
    return seconds


async def _diagnose(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from distributed import Client

    try:
        settings = load_settings(
            {
                "scheduler": args.scheduler,
                "timeout": args.timeout,
                "tls_ca_file": args.tls_ca_file,
                "tls_cert": args.tls_cert,
                "tls_key": args.tls_key,
            }
        )
    except ConfigError as e:
        raise DiagnoseUsageError(str(e)) from None
    if not settings.scheduler:
        raise DiagnoseUsageError("no scheduler address: pass --scheduler")
    sample_time = _seconds("--sample-time", args.sample_time)
    address = settings.scheduler
    progress = Progress(err)
    progress.show(f"connecting to {address}")
    try:
        client = await Client(
            address,
            timeout=settings.timeout,
            asynchronous=True,
            security=settings.security(),
            set_as_default=False,
        )
    except (OSError, asyncio.TimeoutError, ValueError) as e:
        progress.done()
        raise DiagnoseUsageError(f"cannot connect to scheduler {address}: {e}") from None
    try:

        async def identity() -> Mapping[str, Any]:
            return dict(
                await asyncio.wait_for(
                    client.scheduler.identity(n_workers=-1), timeout=settings.timeout
                )
            )

        try:  # fail fast on a typo, before sampling
            selected = select_workers(decode_identity(await identity()), args.worker)
        except ValueError as e:
            progress.done()
            raise DiagnoseUsageError(str(e)) from None
        poll, memory = await sample_memory(identity, sample_time, progress=progress)
        workers = [poll.workers[w.address] for w in selected if w.address in poll.workers]
        outcomes = await diagnose_workers(client, workers, memory, settings.timeout, progress)
        outcomes += [
            Outcome(w, None, [], "left the cluster while heartbeats were sampled")
            for w in selected
            if w.address not in poll.workers
        ]
    finally:
        await client.close()
    if args.json:
        print(json.dumps(to_json(address, sample_time, outcomes), indent=2), file=out)
    else:
        print(render_table(address, sample_time, outcomes), file=out)
    return 1 if any(o.error for o in outcomes) else 0


def run_diagnose(args: argparse.Namespace, prog: str = "dask-memory-exporter") -> int:
    """Entry point of ``diagnose``: 0 when every worker answered, 1 when some did not, 2 on
    bad input (one line on stderr)."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(_diagnose(args, sys.stdout, sys.stderr))
    except DiagnoseUsageError as e:
        print(f"{prog} diagnose: error: {e}", file=sys.stderr)
        return 2
    except DecodeError as e:
        print(f"{prog} diagnose: error: unusable scheduler answer: {e}", file=sys.stderr)
        return 1
