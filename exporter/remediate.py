"""Opt-in remediation: Alertmanager's webhook runs gc and malloc_trim on the alerted worker.

``serve --remediate gc,trim`` adds ``POST /alertmanager/webhook``. For each firing
``DaskWorkerMemoryHighNoDataToSpill`` in a notification, it finds the worker in the current
Snapshot (from the alert's ``worker`` and ``worker_name`` labels) and runs the chosen fixed
functions of ``worker_actions`` on that worker only, gc first, then trim: the diagnose
playbook's quick fix, unattended. Everything else in a notification is ignored.

Guards, each because an endpoint that runs things on workers must not be a lever:

* a bearer token read from a file (re-read when the file changes), compared in constant time
  (``hmac.compare_digest``); without it: 401 and nothing runs, and the body is not read;
* each worker (by ``worker_name``, which survives a restart) is acted on at most once per
  ``--remediate-interval``; an alert inside the interval is refused, logged and counted;
* ``--remediate-dry-run`` logs and counts what would run and runs nothing (no client either);
* hostile input is answered 4xx with one line: a wrong content type (415), a body over
  ``MAX_BODY`` (413), bad JSON or a payload that is not Alertmanager's (400);
* the alert's labels only *select* a worker of the Snapshot: the address acted on is always
  the one the scheduler reported, never a string from the request.

How it acts: for each batch it connects to the scheduler as an ordinary Dask client
(``distributed.Client``, named ``dask-memory-exporter-remediate`` in the scheduler's log), runs
the fixed functions with ``Client.run`` on the chosen workers, and closes the client. That is
the only time ``serve`` registers a client or runs code on workers; without ``--remediate`` it
never does. The functions travel by value (see ``worker_actions``), so workers need not have
this package installed.

Every outcome is logged and counted in ``dask_memory_remediations_total{action,result}``; the
RSS the actions gave back in ``dask_memory_remediation_reclaimed_bytes_total{action}``; the
webhook's answers in ``dask_memory_remediation_webhook_requests_total{code}``. The counters are
rendered with the rest of the exposition after each poll, and at once after actions ran (or
would have, in a dry run); refusals and rejected requests wait for the next poll, so that a
flood of them costs no renders.

What it does not do: choose which alerts deserve remediation (Alertmanager's route does, see
deploy/alertmanager/remediation.yaml), restart workers, or run anything but gc and trim.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import Metric as PromMetric
from prometheus_client.registry import Collector

from . import worker_actions
from .config import REMEDIATION_ACTIONS, ConfigError, Settings, read_secret_file
from .names import LABEL_WORKER, LABEL_WORKER_NAME, Metric
from .snapshot import Snapshot
from .source import WorkerInfo

__all__ = [
    "ALERT",
    "MAX_BODY",
    "REMEDIATIONS_TOTAL",
    "REMEDIATION_RECLAIMED_BYTES_TOTAL",
    "REMEDIATION_WEBHOOK_REQUESTS_TOTAL",
    "WEBHOOK_PATH",
    "AlertTarget",
    "IntervalGuard",
    "Outcome",
    "PayloadError",
    "RemediationStats",
    "Remediator",
    "TokenFile",
    "bearer_matches",
    "install",
    "parse_notification",
]

logger = logging.getLogger(__name__)
http_logger = logging.getLogger("dask_memory_exporter.http")  # rate-limited (server.py)

ALERT: Final = "DaskWorkerMemoryHighNoDataToSpill"
"""The one alert remediation acts on: unmanaged memory that spilling cannot free."""
WEBHOOK_PATH: Final = "/alertmanager/webhook"
MAX_BODY: Final = 1024 * 1024
"""Largest notification read (decompressed). The example route groups by worker, so a
notification carries one alert of about 1.5 KiB; 1 MiB also fits ~600 alerts ungrouped."""
MIN_TOKEN_LENGTH: Final = 16
CLIENT_NAME: Final = "dask-memory-exporter-remediate"
PARALLEL_WORKERS: Final = 8
"""Workers acted on at once in one batch: each action holds its worker's event loop briefly,
and a burst of alerts should not open hundreds of comms at once."""

ACTIONS: Final[Mapping[str, Callable[[], dict[str, Any]]]] = {
    "gc": worker_actions.collect_garbage,
    "trim": worker_actions.trim_allocator,
}
assert tuple(ACTIONS) == REMEDIATION_ACTIONS

# Results of one action on one worker (the ``result`` label).
SUCCESS: Final = "success"
FAILED: Final = "failed"
UNAVAILABLE: Final = "unavailable"  # malloc_trim where the C library is not glibc
DRY_RUN: Final = "dry_run"
REFUSED: Final = "refused"  # the worker was acted on less than the interval ago
UNKNOWN_WORKER: Final = "unknown_worker"  # no current worker matches the alert's labels
RESULTS: Final = (SUCCESS, FAILED, UNAVAILABLE, DRY_RUN, REFUSED, UNKNOWN_WORKER)
CODES: Final = (200, 400, 401, 413, 415)

LABEL_ACTION: Final = "action"
LABEL_RESULT: Final = "result"
LABEL_CODE: Final = "code"

REMEDIATIONS_TOTAL: Final = Metric(
    "dask_memory_remediations_total", "counter",
    "Remediation actions asked for by Alertmanager, by action (gc, trim) and result (success, "
    "failed, unavailable, dry_run, refused within the interval, unknown_worker).",
    labels=(LABEL_ACTION, LABEL_RESULT),
)  # fmt: skip
REMEDIATION_RECLAIMED_BYTES_TOTAL: Final = Metric(
    "dask_memory_remediation_reclaimed_bytes_total", "counter",
    "Worker RSS given back by remediation actions (RSS before minus after, at least 0).",
    unit="bytes", labels=(LABEL_ACTION,),
)  # fmt: skip
REMEDIATION_WEBHOOK_REQUESTS_TOTAL: Final = Metric(
    "dask_memory_remediation_webhook_requests_total", "counter",
    "Requests to the Alertmanager webhook, by HTTP status code of the answer.",
    labels=(LABEL_CODE,),
)  # fmt: skip


# --- the request ------------------------------------------------------------------------------


class PayloadError(ValueError):
    """A body that is not an Alertmanager webhook notification: 400, with this message."""


@dataclass(frozen=True, slots=True)
class AlertTarget:
    """The worker a firing alert names, as its labels give it (either may be missing)."""

    worker: str | None
    worker_name: str | None

    def describe(self) -> str:
        return f"{self.worker_name or '?'} ({self.worker or 'no address'})"


def parse_notification(body: bytes) -> tuple[list[AlertTarget], int]:
    """The workers of the firing remediation alerts in a webhook body, and how many alerts
    were ignored (other alerts, resolved ones).

    The format is Alertmanager's webhook payload, version 4 (``alerts``: a list of objects
    with ``status`` and string ``labels``). Anything else raises PayloadError.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise PayloadError(f"invalid JSON: {_short(str(e))}") from None
    if not isinstance(doc, dict):
        raise PayloadError("expected a JSON object (an Alertmanager notification)")
    version = doc.get("version", "4")
    if version != "4":
        raise PayloadError(f"unsupported notification version {_short(repr(version))}")
    alerts = doc.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError('expected "alerts", a list')
    targets: list[AlertTarget] = []
    ignored = 0
    for i, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise PayloadError(f"alerts[{i}]: expected an object")
        labels = alert.get("labels")
        status = alert.get("status")
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise PayloadError(f"alerts[{i}].labels: expected an object of strings")
        if not isinstance(status, str):
            raise PayloadError(f"alerts[{i}].status: expected a string")
        if status != "firing" or labels.get("alertname") != ALERT:
            ignored += 1
            continue
        targets.append(
            AlertTarget(labels.get(LABEL_WORKER) or None, labels.get(LABEL_WORKER_NAME) or None)
        )
    return targets, ignored


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def bearer_matches(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>``; constant time in the
    token's content (``hmac.compare_digest``). No token configured: never."""
    if not header or not token:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


TOKEN_OPTION: Final = "--remediate-token-file"


class TokenFile:
    """The bearer token, from a file; re-read when the file changes (a rotated Kubernetes
    Secret), checked with one ``stat`` per request.

    At start an unusable file is a ConfigError (exit 2). Later, a file that became unreadable
    or too short fails closed: no token, every request 401, and an error in the log.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None
        try:
            self._token = self._read()
        except ValueError as e:  # every message names the option and the file
            raise ConfigError(str(e)) from None

    def _read(self) -> str:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise ValueError(f"{TOKEN_OPTION} {self.path}: cannot read: {e.strerror}") from None
        token = read_secret_file(self.path, TOKEN_OPTION)
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise ValueError(
                f"{TOKEN_OPTION} {self.path}: the token must be at least {MIN_TOKEN_LENGTH} "
                "characters without spaces (e.g. openssl rand -hex 32)"
            )
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        return token

    @property
    def token(self) -> str | None:
        try:
            st = os.stat(self.path)
            changed = (st.st_ino, st.st_mtime_ns, st.st_size) != self._stamp
        except OSError:
            changed = True
        if changed:
            try:
                self._token = self._read()
                logger.info("remediation: token file %s re-read", self.path)
            except ValueError as e:
                if self._token is not None or self._stamp is not None:
                    logger.error("remediation: refusing every request: %s", e)
                self._token = None
                self._stamp = None
        return self._token


# --- the guards -------------------------------------------------------------------------------


class IntervalGuard:
    """At most one remediation per worker name per interval.

    ``claim`` is synchronous, so two notifications for one worker arriving together cannot
    both pass. A claim stands whatever the outcome: a worker whose actions fail is not retried
    before the interval is over. Entries older than the interval are dropped; only names of
    workers that were in a Snapshot are ever stored.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}

    def claim(self, name: str) -> float | None:
        """Claim ``name`` now; None if granted, else the seconds since the standing claim."""
        now = self.clock()
        self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        last = self._last.get(name)
        if last is not None:
            return now - last
        self._last[name] = now
        return None


def resolve(target: AlertTarget, snapshot: Snapshot) -> WorkerInfo | str:
    """The worker of the Snapshot that an alert names, or why there is none.

    With an address, the worker must be at that address now (and carry the alert's name, if
    given): an alert about a worker that has since restarted elsewhere is not about the fresh
    process. With a name only (labels dropped by relabelling), the one worker of that name.
    """
    workers = [w.info for w in snapshot.workers]
    if target.worker:
        for w in workers:
            if w.address == target.worker:
                if target.worker_name and w.name != target.worker_name:
                    return f"the worker at {target.worker} is now named {w.name!r}"
                return w
        return f"no worker at {target.worker} now (it left or restarted)"
    if target.worker_name:
        named = [w for w in workers if w.name == target.worker_name]
        if len(named) == 1:
            return named[0]
        return f"{len(named)} workers named {target.worker_name!r}"
    return "the alert has neither a worker nor a worker_name label"


# --- outcomes and counters --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one action for one alerted worker."""

    worker_name: str | None
    worker: str | None
    action: str
    result: str
    reclaimed: int = 0
    rss_before: int | None = None
    rss_after: int | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_name": self.worker_name,
            "worker": self.worker,
            "action": self.action,
            "result": self.result,
            "reclaimed_bytes": self.reclaimed,
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "detail": self.detail,
        }


class RemediationStats(Collector):
    """The remediation counters, a custom collector rendered with the exposition.

    Every label combination exists from the start at 0 (for the enabled actions), so that
    ``increase()`` sees the first remediation. Mutated on the event loop, read by the render
    thread: the dicts never change size, so reading them there is safe.
    """

    def __init__(self, actions: Sequence[str]) -> None:
        self.remediations = {(a, r): 0 for a in actions for r in RESULTS}
        self.reclaimed = dict.fromkeys(actions, 0)
        self.requests = dict.fromkeys(CODES, 0)

    def count(self, outcome: Outcome) -> None:
        self.remediations[(outcome.action, outcome.result)] += 1
        self.reclaimed[outcome.action] += outcome.reclaimed

    def request(self, code: int) -> None:
        self.requests[code] += 1

    def describe(self) -> list[PromMetric]:
        return []

    def collect(self) -> Iterator[PromMetric]:
        yield _counter(REMEDIATIONS_TOTAL, ((list(k), v) for k, v in self.remediations.items()))
        yield _counter(
            REMEDIATION_RECLAIMED_BYTES_TOTAL, (([a], v) for a, v in self.reclaimed.items())
        )
        yield _counter(
            REMEDIATION_WEBHOOK_REQUESTS_TOTAL, (([str(c)], v) for c, v in self.requests.items())
        )


def _counter(metric: Metric, samples: Iterator[tuple[list[str], int]]) -> CounterMetricFamily:
    fam = CounterMetricFamily(metric.family, metric.help, labels=list(metric.labels))
    for labels, value in samples:
        fam.add_metric(labels, value)
    return fam


# --- acting -----------------------------------------------------------------------------------

RunAction = Callable[[str, str], Awaitable[Mapping[str, Any]]]
"""Run action ``name`` (a key of ACTIONS) on the worker at ``address``; its answer."""
Connect = Callable[[], contextlib.AbstractAsyncContextManager[RunAction]]


def dask_client(settings: Settings) -> Connect:
    """A Dask client for one batch: connect, run the fixed functions, close.

    A client per batch rather than one kept open: remediation is rare (once per interval per
    worker), and a long-lived client would hold a comm and reconnect loops to a scheduler the
    exporter otherwise only polls.
    """

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[RunAction]:
        from distributed import Client

        client = await Client(
            settings.scheduler,
            asynchronous=True,
            security=settings.security(),
            timeout=settings.timeout,
            set_as_default=False,
            name=CLIENT_NAME,
        )

        async def run(address: str, action: str) -> Mapping[str, Any]:
            answers = await asyncio.wait_for(
                client.run(ACTIONS[action], workers=[address]), settings.timeout
            )
            return dict(answers[address])

        try:
            yield run
        finally:
            await client.close()

    return connect


def outcome_of(worker: WorkerInfo, action: str, answer: Mapping[str, Any]) -> Outcome:
    """An Outcome from a worker action's answer (``collect_garbage``, ``trim_allocator``)."""
    if answer.get("available") is False:
        return Outcome(
            worker.name, worker.address, action, UNAVAILABLE, detail=str(answer.get("reason"))
        )
    before, after = int(answer["rss_before"]), int(answer["rss_after"])
    detail = f"{answer['collected']} objects collected" if "collected" in answer else ""
    return Outcome(
        worker.name, worker.address, action, SUCCESS, max(0, before - after), before, after, detail
    )


class Remediator:
    """The webhook's logic: guards, then the actions on each alerted worker, then counting."""

    def __init__(
        self,
        settings: Settings,
        snapshot: Callable[[], Snapshot],
        *,
        connect: Connect | None = None,
        stats: RemediationStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.remediate_token_file is not None  # Settings checks it
        self.actions = tuple(settings.remediate)
        self.dry_run = settings.remediate_dry_run
        self.token = TokenFile(settings.remediate_token_file)
        self.guard = IntervalGuard(settings.remediate_interval, clock)
        self.snapshot = snapshot
        self.connect = connect or dask_client(settings)
        self.stats = stats or RemediationStats(self.actions)
        self.on_counted: Callable[[], Awaitable[None]] | None = None
        """Called after actions ran and were counted (the app re-renders the exposition)."""

    def each(self, target: AlertTarget, result: str, detail: str) -> list[Outcome]:
        return [
            Outcome(target.worker_name, target.worker, a, result, detail=detail)
            for a in self.actions
        ]

    async def remediate(self, targets: Sequence[AlertTarget]) -> list[Outcome]:
        """Guards, then actions; every outcome logged and counted."""
        snapshot = self.snapshot()
        outcomes: list[Outcome] = []
        chosen: list[WorkerInfo] = []
        for target in targets:
            found = resolve(target, snapshot)
            if isinstance(found, str):
                outcomes += self.each(target, UNKNOWN_WORKER, found)
                continue
            since = self.guard.claim(found.name)
            if since is not None:
                detail = f"acted on {since:.0f} s ago, interval {self.guard.interval:g} s"
                target = AlertTarget(found.address, found.name)
                outcomes += self.each(target, REFUSED, detail)
                continue
            chosen.append(found)
        if chosen and self.dry_run:
            for w in chosen:
                outcomes += self.each(AlertTarget(w.address, w.name), DRY_RUN, "nothing run")
        elif chosen:
            outcomes += await self._act(chosen)
        for o in outcomes:
            _log(o)
            self.stats.count(o)
        # Show what was done at once; refusals wait for the next poll's render, so that a
        # burst of them (Alertmanager retrying, a noisy route) costs no render each.
        acted = any(o.result not in (REFUSED, UNKNOWN_WORKER) for o in outcomes)
        if acted and self.on_counted is not None:
            await self.on_counted()
        return outcomes

    async def _act(self, workers: Sequence[WorkerInfo]) -> list[Outcome]:
        try:
            async with self.connect() as run:
                limit = asyncio.Semaphore(PARALLEL_WORKERS)

                async def one(w: WorkerInfo) -> list[Outcome]:
                    async with limit:
                        return await self._act_on(run, w)

                per_worker = await asyncio.gather(*(one(w) for w in workers))
        except Exception as e:  # the scheduler is unreachable, TLS refused...
            detail = f"cannot connect to the scheduler: {_error(e)}"
            return [
                o
                for w in workers
                for o in self.each(AlertTarget(w.address, w.name), FAILED, detail)
            ]
        return [o for outcomes in per_worker for o in outcomes]

    async def _act_on(self, run: RunAction, worker: WorkerInfo) -> list[Outcome]:
        """The actions in order on one worker; after a failure the rest are not tried."""
        outcomes: list[Outcome] = []
        for i, action in enumerate(self.actions):
            try:
                answer = await run(worker.address, action)
                outcomes.append(outcome_of(worker, action, answer))
            except Exception as e:  # the worker left, timed out, or the action raised
                detail = _error(e)
                outcomes.append(Outcome(worker.name, worker.address, action, FAILED, detail=detail))
                outcomes += [
                    Outcome(worker.name, worker.address, a, FAILED, detail=f"not tried: {detail}")
                    for a in self.actions[i + 1 :]
                ]
                break
        return outcomes


def _error(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "no answer in time"
    return _short(f"{type(e).__name__}: {e}", 200)


def _mib(v: int | None) -> str:
    return "?" if v is None else f"{v / 2**20:.1f} MiB"


def _log(o: Outcome) -> None:
    who = _short(f"worker {o.worker_name or '?'} ({o.worker or 'no address'})")
    if o.result == SUCCESS:
        logger.info(
            "remediation: %s on %s: freed %s (RSS %s -> %s)%s",
            o.action, who, _mib(o.reclaimed), _mib(o.rss_before), _mib(o.rss_after),
            f", {o.detail}" if o.detail else "",
        )  # fmt: skip
    elif o.result == DRY_RUN:
        logger.info("remediation (dry run): would run %s on %s", o.action, who)
    elif o.result in (REFUSED, UNKNOWN_WORKER):
        logger.info("remediation: %s on %s %s: %s", o.action, who, o.result, o.detail)
    else:
        logger.warning("remediation: %s on %s %s: %s", o.action, who, o.result, o.detail)


# --- the endpoint -----------------------------------------------------------------------------

REMEDIATOR = web.AppKey("remediator", Remediator)


def _answer(
    rem: Remediator, code: int, message: str, request: web.Request, **headers: str
) -> web.Response:
    """A client error: counted, and logged through the rate limit of bad requests (one line
    per kind per interval, ``server.RateLimitFilter``)."""
    rem.stats.request(code)
    # The code in the template: the rate limit keeps one line per code, not one for all.
    http_logger.warning(f"remediation webhook: {code} for %s: %s", request.remote, message)
    return web.json_response({"status": "error", "error": message}, status=code, headers=headers)


async def webhook(request: web.Request) -> web.Response:
    """``POST /alertmanager/webhook``: the token first, then the body, then the actions."""
    rem = request.app[REMEDIATOR]
    if not bearer_matches(request.headers.get("Authorization"), rem.token.token):
        return _answer(
            rem,
            401,
            "unauthorized",
            request,
            **{"WWW-Authenticate": 'Bearer realm="dask-memory-exporter"'},
        )
    if request.content_type != "application/json":
        return _answer(rem, 415, "expected Content-Type: application/json", request)
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _answer(rem, 413, f"body over {MAX_BODY} bytes", request)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_BODY:
            return _answer(rem, 413, f"body over {MAX_BODY} bytes", request)
    try:
        targets, ignored = parse_notification(bytes(body))
    except PayloadError as e:
        return _answer(rem, 400, str(e), request)
    rem.stats.request(200)  # counted first: remediate() re-renders the exposition
    outcomes = await rem.remediate(targets)
    return web.json_response(
        {
            "status": "ok",
            "dry_run": rem.dry_run,
            "ignored_alerts": ignored,
            "results": [o.to_json() for o in outcomes],
        }
    )


def install(app: web.Application, remediator: Remediator) -> None:
    """Add the webhook route to the app."""
    app[REMEDIATOR] = remediator
    app.router.add_post(WEBHOOK_PATH, webhook)
    logger.info(
        "remediation on: %s on a firing %s posted to %s, at most once per worker every %gs%s",
        ",".join(remediator.actions), ALERT, WEBHOOK_PATH, remediator.guard.interval,
        " (dry run: nothing is run)" if remediator.dry_run else "",
    )  # fmt: skip
