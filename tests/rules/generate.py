"""Write the promtool unit tests tests/rules/alerts-test.yaml and recording-test.yaml.

The cases (input series, evaluation times, expected values) are written here by hand; only the
annotation texts are copied from the rules, with ``$labels``/``$value`` filled in by hand-computed
values. After changing an annotation or adding a case, run
``.venv/bin/python tests/rules/generate.py`` and review the diff of the
YAML files: they are the specification that tests/unit/test_rules.py runs with promtool.
Values are bytes; the limit is 1e9, so ratios read directly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dask_memory_exporter import heartbeat as hb
from dask_memory_exporter import names as n
from dask_memory_exporter.mixin import MixinConfig
from dask_memory_exporter.rules import (
    CLUSTER_PAUSED_WORKERS,
    CLUSTER_WORKERS,
    WORKER_LIVE_LIMIT_RATIO,
    WORKER_PROBE_SECONDS,
    WORKER_PROCESS_LIMIT_RATIO,
    WORKER_THRESHOLD_BYTES,
    add_runbook_links,
    alert_rules,
    cluster_sum,
)
from dask_memory_exporter.yamlio import Inline, dump

HERE = Path(__file__).resolve().parent
CONFIG = MixinConfig()
RULES = {r["alert"]: r for r in add_runbook_links(alert_rules(CONFIG), CONFIG.runbook_url_base)}
JOB = "dask-memory-exporter"
INSTANCE = "exporter:9787"
THRESHOLDS = (
    (n.THRESHOLD_TARGET, 0.6),
    (n.THRESHOLD_SPILL, 0.7),
    (n.THRESHOLD_PAUSE, 0.8),
    (n.THRESHOLD_TERMINATE, 0.95),
)

NO_DATA = "DaskWorkerMemoryHighNoDataToSpill"
PREDICTED = "DaskWorkerPausePredicted"
PAUSED = "DaskWorkerPaused"
NEAR_TERMINATION = "DaskWorkerNearTermination"
GROWING = "DaskWorkerUnmanagedMemoryGrowing"
STALE = "DaskWorkerHeartbeatStale"
BLOCKED = "DaskWorkerBlockedAbovePause"
SIDECAR = "sidecar-7:9787"
SCHEDULER_DOWN = "DaskMemoryExporterSchedulerDown"
EXPORTER_DOWN = "DaskMemoryExporterDown"
GPU_HIGH = "DaskWorkerGPUMemoryHigh"
GPU_PREDICTED = "DaskWorkerGPUMemoryExhaustionPredicted"

Labels = dict[str, str]


def worker(name: str, port: int, instance: str = INSTANCE) -> Labels:
    return {
        "instance": instance,
        "worker": f"tcp://10.0.0.{port % 100}:{port}",
        "worker_name": name,
    }


def selector(labels: Labels) -> str:
    """Braced selector of a series: ``job`` first (JOB unless ``labels`` has its own)."""
    return "{" + ", ".join(f'{k}="{v}"' for k, v in {"job": JOB, **labels}.items()) + "}"


def render_annotations(
    alert: str, labels: Labels, value: str | None, rules: dict[str, Any] = RULES
) -> Labels:
    """The annotations of ``alert`` (from ``rules``, by default the committed rules) as
    Prometheus renders them for an alert with ``labels`` and ``$value`` shown as ``value``."""
    out = {}
    for key, text in rules[alert]["annotations"].items():
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
        if "$value" in text:
            assert value is not None, f"{alert} shows $value: give the expected text"
            text = re.sub(r"\{\{ \$value \| humanize\w+ \}\}", value, text)
        out[key] = text
    return out


def expect(
    alert: str, labels: Labels, value: str | None = None, rules: dict[str, Any] = RULES
) -> dict[str, Any]:
    """An expected firing alert; ``value`` is $value as its annotation renders it. ``rules``
    (alert name -> rule) defaults to the rules generated from MixinConfig defaults."""
    full = {"job": JOB, **labels, **rules[alert]["labels"]}
    return {"exp_labels": full, "exp_annotations": render_annotations(alert, full, value, rules)}


def check(alert: str, at: str, *alerts: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": list(alerts)}


def series(
    labels: Labels,
    *,
    process: str,
    managed: str,
    unmanaged: str,
    recent: str,
    paused: str,
    limit: str | None = None,
    spilled: str | None = None,
    heartbeat: str | None = None,
    thresholds: tuple[tuple[str, float], ...] = THRESHOLDS,
) -> list[Inline]:
    """Input series of one worker; ``limit`` is e.g. ``1e9x10`` (thresholds follow it)."""
    out = []

    def add(metric: str, values: str, **extra: str) -> None:
        out.append(Inline(series=metric + selector({**labels, **extra}), values=values))

    add(n.WORKER_PROCESS_BYTES, process)
    add(n.WORKER_MANAGED_BYTES, managed)
    add(n.WORKER_UNMANAGED_BYTES, unmanaged)
    add(n.WORKER_UNMANAGED_RECENT_BYTES, recent)
    add(n.WORKER_PAUSED, paused)
    if spilled:
        add(n.WORKER_SPILLED_BYTES, spilled)
    if heartbeat:
        add(n.WORKER_HEARTBEAT_AGE_SECONDS, heartbeat)
    if limit:
        add(n.WORKER_LIMIT_BYTES, limit)
        _, rest = limit.split("x", 1)
        for threshold, ratio in thresholds:
            add(n.WORKER_THRESHOLD_RATIO, f"{ratio}x{rest}", threshold=threshold)
    return out


def gpu_series(
    labels: Labels,
    *,
    used: str,
    total: str,
    limit: str | None = None,
    rmm_used: str | None = None,
    rmm_pool: str | None = None,
) -> list[Inline]:
    """GPU input series of one worker (device memory from NVML, optionally dask-cuda's limit
    and an RMM pool)."""
    out = [
        Inline(series=hb.WORKER_GPU_MEMORY_USED_BYTES + selector(labels), values=used),
        Inline(series=hb.WORKER_GPU_MEMORY_TOTAL_BYTES + selector(labels), values=total),
    ]
    for metric, values in (
        (hb.WORKER_GPU_MEMORY_LIMIT_BYTES, limit),
        (hb.WORKER_GPU_RMM_USED_BYTES, rmm_used),
        (hb.WORKER_GPU_RMM_POOL_BYTES, rmm_pool),
    ):
        if values:
            out.append(Inline(series=metric + selector(labels), values=values))
    return out


def gpu_tests() -> list[dict[str, Any]]:
    """Device memory: 100e9 bytes per device, so ratios read directly in units of 1e9."""
    rising = worker("cuda-rising", 41001)
    pool = worker("cuda-pool", 41002)
    plateau = worker("cuda-plateau", 41003)
    limited = worker("cuda-limited", 41004)
    quiet = range(5, 61, 5)
    return [
        {
            "name": f"{GPU_PREDICTED} fires on steadily rising device memory after 10m, "
            f"{GPU_HIGH} once it is above 90% of the device for 5m; neither fires for an RMM "
            "pool reserved up front (NVML says 95% used, the pool is mostly free) nor for a "
            "flat plateau at 85% reached in one step",
            "interval": "1m",
            "input_series": [
                *gpu_series(rising, used="60e9+1e9x40", total="100e9x40"),
                *gpu_series(
                    pool,
                    used="2e9x4 95e9x56",
                    total="100e9x60",
                    rmm_used="0x4 20e9x56",
                    rmm_pool="0x4 93e9x56",
                ),
                *gpu_series(plateau, used="2e9x4 85e9x56", total="100e9x60"),
            ],
            "alert_rule_test": [
                check(GPU_PREDICTED, "10m"),
                # at 12m: 72e9 used, +60e9 within the hour: 132% of the device
                check(GPU_PREDICTED, "12m", expect(GPU_PREDICTED, rising, "132%")),
                check(GPU_HIGH, "34m"),
                # above 90% from 31m (91e9); at 37m 97e9 of 100e9
                check(GPU_HIGH, "37m", expect(GPU_HIGH, rising, "97%")),
            ],
        },
        {
            "name": f"{GPU_HIGH} and {GPU_PREDICTED} stay silent for an RMM pool and a flat "
            "plateau, from the moment the memory is reserved",
            "interval": "1m",
            "input_series": [
                *gpu_series(
                    pool,
                    used="2e9x4 95e9x56",
                    total="100e9x60",
                    rmm_used="0x4 20e9x56",
                    rmm_pool="0x4 93e9x56",
                ),
                *gpu_series(plateau, used="2e9x4 85e9x56", total="100e9x60"),
            ],
            "alert_rule_test": [
                *(check(GPU_HIGH, f"{t}m") for t in quiet),
                *(check(GPU_PREDICTED, f"{t}m") for t in quiet),
            ],
        },
        {
            "name": f"{GPU_HIGH} fires above dask-cuda's device memory limit where it is known",
            "interval": "1m",
            "input_series": gpu_series(limited, used="55e9x10", total="100e9x10", limit="50e9x10"),
            "alert_rule_test": [
                check(GPU_HIGH, "4m"),
                # 55e9 in use of a 50e9 limit
                check(GPU_HIGH, "6m", expect(GPU_HIGH, limited, "110%")),
            ],
        },
    ]


def alert_tests() -> list[dict[str, Any]]:
    tests = gpu_tests()

    leaky = worker("leaky", 40001)
    leaky_b = worker("leaky", 40001, "exporter-b:9787")
    spiller = worker("spiller", 40002)
    idle = worker("idle", 40003)
    nolimit = worker("nolimit", 40004)
    flat = {"managed": "0x10", "paused": "0x10", "limit": "1e9x10"}
    tests.append(
        {
            "name": f"{NO_DATA} fires after 1m for a worker above spill with nothing to spill; "
            "not for a worker that can spill down, an idle worker or a worker without a limit; "
            "a second exporter scraping the same scheduler gives its own alert",
            "interval": "30s",
            "input_series": [
                *series(leaky, process="750e6x10", unmanaged="700e6x10", recent="50e6x10", **flat),
                *series(
                    leaky_b, process="750e6x10", unmanaged="700e6x10", recent="50e6x10", **flat
                ),
                *series(
                    spiller,
                    process="750e6x10",
                    managed="450e6x10",
                    unmanaged="250e6x10",
                    recent="50e6x10",
                    paused="0x10",
                    spilled="2e9x10",
                    limit="1e9x10",
                ),
                *series(idle, process="70e6x10", unmanaged="70e6x10", recent="0x10", **flat),
                *series(
                    nolimit,
                    process="5e9x10",
                    managed="0x10",
                    unmanaged="5e9x10",
                    recent="0x10",
                    paused="0x10",
                ),
            ],
            "alert_rule_test": [
                check(NO_DATA, "0m"),
                check(NO_DATA, "30s"),
                # (750e6 - 0) / 1e9
                check(
                    NO_DATA, "2m", expect(NO_DATA, leaky, "75%"), expect(NO_DATA, leaky_b, "75%")
                ),
                check(PREDICTED, "4m"),
                check(PAUSED, "4m"),
                check(NEAR_TERMINATION, "4m"),
                check(GROWING, "4m"),
            ],
        }
    )

    # distributed.worker.memory.target: false -> the exporter omits it; Dask spills down to
    # the spill threshold instead, and so does the alert judge.
    no_target = worker("notarget", 40012)
    without_target = tuple(t for t in THRESHOLDS if t[0] != n.THRESHOLD_TARGET)
    tests.append(
        {
            "name": f"{NO_DATA} judges against the spill threshold when target is disabled",
            "interval": "30s",
            "input_series": [
                *series(
                    no_target,
                    process="750e6x10",
                    managed="0x10",
                    unmanaged="720e6x10",
                    recent="30e6x10",
                    paused="0x10",
                    limit="1e9x10",
                    thresholds=without_target,
                ),
                # 650e6 unmanaged: above target (0.6) but not above spill (0.7): silent
                *series(
                    worker("notarget-ok", 40013),
                    process="750e6x10",
                    managed="100e6x10",
                    unmanaged="640e6x10",
                    recent="10e6x10",
                    paused="0x10",
                    limit="1e9x10",
                    thresholds=without_target,
                ),
            ],
            "alert_rule_test": [check(NO_DATA, "2m", expect(NO_DATA, no_target, "75%"))],
        }
    )

    spiky = worker("spiky", 40005)
    tests.append(
        {
            "name": "A short task-heap spike of unmanaged recent memory that falls back "
            "fires nothing",
            "interval": "30s",
            "input_series": series(
                spiky,
                process="300e6x3 780e6 780e6 300e6x30",
                managed="0x35",
                unmanaged="298e6x35",
                recent="2e6x3 482e6 482e6 2e6x30",
                paused="0x35",
                limit="1e9x35",
                heartbeat="0.5x35",
            ),
            "alert_rule_test": [
                *(check(NO_DATA, t) for t in ("1m30s", "2m", "2m30s", "5m")),
                *(check(PREDICTED, t) for t in ("2m", "5m", "10m", "15m")),
                *(check(NEAR_TERMINATION, t) for t in ("2m", "5m")),
                check(GROWING, "17m"),
            ],
        }
    )

    # Unmanaged (old) grows 4e6 per minute (66.7 kB/s); process = unmanaged + 2e6 recent.
    # process crosses pause (800e6) between 174m and 175m, where paused turns 1.
    leak = worker("leak", 40006)
    tests.append(
        {
            "name": f"A steady unmanaged leak: {GROWING}, then {PREDICTED} 25m and {NO_DATA} 24m "
            f"before the pause, then {PAUSED} and {NEAR_TERMINATION}",
            "interval": "1m",
            "input_series": series(
                leak,
                process="102e6+4e6x200",
                managed="0x200",
                unmanaged="100e6+4e6x200",
                recent="2e6x200",
                paused="0x174 1x26",
                limit="1e9x200",
                heartbeat="0.5x200",
            ),
            "alert_rule_test": [
                check(GROWING, "15m30s"),
                # active from 1m; at 16m: 164e6 + 66.7e3/s * 4h = 1124e6
                check(GROWING, "16m", expect(GROWING, leak, "112.4%")),
                # active from 145m (682e6 + 66.7e3/s * 30m = 802e6); at 150m: 702e6 + 120e6
                check(PREDICTED, "149m30s"),
                check(PREDICTED, "150m", expect(PREDICTED, leak, "82.2%")),
                # above spill from 150m (702e6); at 151m: 706e6 of unmanaged memory
                check(NO_DATA, "150m30s"),
                check(NO_DATA, "151m", expect(NO_DATA, leak, "70.6%")),
                check(PAUSED, "175m30s"),
                check(PAUSED, "176m", expect(PAUSED, leak, "80.6%")),
                check(PREDICTED, "176m"),
                # above 0.95 - 0.05 from 200m (902e6)
                check(NEAR_TERMINATION, "199m30s"),
                check(NEAR_TERMINATION, "200m30s", expect(NEAR_TERMINATION, leak, "90.2%")),
            ],
        }
    )

    # Managed data fills to 600e6, then is spilled to 500e6 and refilled, every 30 s.
    spill = worker("spill", 40007)
    managed = [i * 50_000_000 for i in range(13)] + [500_000_000, 600_000_000] * 30
    last = len(managed) - 1
    tests.append(
        {
            "name": "A healthy worker whose managed data grows and is spilled around the spill "
            "threshold fires nothing",
            "interval": "30s",
            "input_series": series(
                spill,
                process=" ".join(str(m + 151_000_000) for m in managed),
                managed=" ".join(str(m) for m in managed),
                unmanaged=f"150e6x{last}",
                recent=f"1e6x{last}",
                paused=f"0x{last}",
                spilled=f"0+100e6x{last}",
                limit=f"1e9x{last}",
                heartbeat=f"0.5x{last}",
            ),
            "alert_rule_test": [
                check(alert, t)
                for alert in (NO_DATA, PREDICTED, GROWING, NEAR_TERMINATION)
                for t in ("5m", "10m", "20m", "30m")
            ],
        }
    )

    gone = worker("gone", 40008)
    tests.append(
        {
            "name": "The alerts of a worker that leaves resolve at once",
            "interval": "1m",
            "input_series": series(
                gone,
                process="102e6+4e6x159 stale",
                managed="0x159 stale",
                unmanaged="100e6+4e6x159 stale",
                recent="2e6x159 stale",
                paused="0x159 stale",
                limit="1e9x159 stale",
                heartbeat="0.5x159 stale",
            ),
            "alert_rule_test": [
                # at 155m: 722e6 + 120e6; 722e6 unmanaged; 720e6 + 960e6
                check(PREDICTED, "155m", expect(PREDICTED, gone, "84.2%")),
                check(NO_DATA, "155m", expect(NO_DATA, gone, "72.2%")),
                check(GROWING, "155m", expect(GROWING, gone, "168%")),
                check(PREDICTED, "160m"),
                check(NO_DATA, "160m"),
                check(GROWING, "160m"),
                check(STALE, "170m"),
            ],
        }
    )

    blocked = worker("blocked", 40009)
    tests.append(
        {
            "name": f"{STALE} fires when a worker's heartbeat is older than 1m for 1m",
            "interval": "30s",
            "input_series": series(
                blocked,
                process="200e6x15",
                managed="0x15",
                unmanaged="200e6x15",
                recent="0x15",
                paused="0x15",
                limit="1e9x15",
                heartbeat="0.5x4 30+30x10",
            ),
            "alert_rule_test": [
                check(STALE, "4m"),
                check(STALE, "4m30s", expect(STALE, blocked, "2m 30s")),
            ],
        }
    )

    # A worker sidecar (another instance, worker="") sees the blocked worker's live RSS and its
    # unanswered probe; the scheduler-mode exporter's figures are frozen at 500e6.
    stuck = worker("stuck", 40010)
    joined = {"worker_name": "stuck"}
    tests.append(
        {
            "name": f"{BLOCKED} fires when a sidecar's RSS is above pause while its event-loop "
            "probe waits more than 5 s, for 30s; not while the loop answers",
            "interval": "30s",
            "input_series": [
                *series(
                    stuck,
                    process="500e6x15",
                    managed="0x15",
                    unmanaged="500e6x15",
                    recent="0x15",
                    paused="0x15",
                    limit="1e9x15",
                ),
                # the recorded joins of the sidecar's series (tested in recording-test.yaml)
                Inline(series=WORKER_LIVE_LIMIT_RATIO + selector(joined), values="0.5x2 0.85x12"),
                Inline(series=WORKER_PROBE_SECONDS + selector(joined), values="0.01x4 30+30x10"),
            ],
            "alert_rule_test": [
                check(BLOCKED, "2m"),  # above pause, but the loop still answers
                check(BLOCKED, "2m30s"),  # blocked, not yet for 30s
                check(
                    BLOCKED,
                    "3m",
                    expect(BLOCKED, {"worker_name": "stuck"}, "85%"),
                ),
            ],
        }
    )

    target = {"instance": INSTANCE}
    other_up = Inline(series='up{job="other", instance="other:9100"}', values="0x24")
    tests.append(
        {
            "name": f"{SCHEDULER_DOWN} fires after 2m without a successful poll; "
            f"{EXPORTER_DOWN} after 5m of failed scrapes",
            "interval": "30s",
            "input_series": [
                Inline(series=n.SCHEDULER_UP + selector(target), values="1x4 0x20"),
                Inline(series="up" + selector(target), values="1x4 0x20"),
                other_up,
            ],
            "alert_rule_test": [
                check(SCHEDULER_DOWN, "4m"),
                check(SCHEDULER_DOWN, "4m30s", expect(SCHEDULER_DOWN, target)),
                check(EXPORTER_DOWN, "7m"),
                check(EXPORTER_DOWN, "7m30s", expect(EXPORTER_DOWN, target)),
            ],
        }
    )
    tests.append(
        {
            "name": f"{EXPORTER_DOWN} fires when no exporter target exists at all",
            "interval": "30s",
            "input_series": [
                Inline(series='up{job="other", instance="other:9100"}', values="1x20")
            ],
            "alert_rule_test": [
                check(EXPORTER_DOWN, "4m30s"),
                check(EXPORTER_DOWN, "5m", expect(EXPORTER_DOWN, {})),
            ],
        }
    )

    step = worker("step", 40010)
    creep = worker("creep", 40011)
    tests.append(
        {
            "name": f"{GROWING} and {PREDICTED} ignore a one-off step of unmanaged memory; "
            f"{GROWING} ignores a slow creep far below the target",
            "interval": "1m",
            "input_series": [
                *series(
                    step,
                    process="100e6x30 500e6x60",
                    managed="0x90",
                    unmanaged="100e6x30 500e6x60",
                    recent="0x90",
                    paused="0x90",
                    limit="1e9x90",
                ),
                *series(
                    creep,
                    process="150e6+360e3x90",
                    managed="0x90",
                    unmanaged="150e6+360e3x90",
                    recent="0x90",
                    paused="0x90",
                    limit="1e9x90",
                ),
            ],
            "alert_rule_test": [
                *(check(GROWING, f"{t}m") for t in (31, 35, 40, 45, 50, 60, 75, 90)),
                *(check(PREDICTED, f"{t}m") for t in (31, 35, 40, 45, 50)),
            ],
        }
    )
    return tests


def sample(name: str, labels: Labels, value: float) -> dict[str, Any]:
    return {
        "labels": name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
        "value": value,
    }


def recording_tests() -> list[dict[str, Any]]:
    a, b, nolimit = worker("a", 40001), worker("b", 40002), worker("nolimit", 40003)
    cluster = {"job": JOB, "instance": INSTANCE}

    def of(w: Labels) -> Labels:
        return {"job": JOB, **w}

    def total(metric: str, value: float) -> dict[str, Any]:
        return {
            "expr": cluster_sum(metric),
            "eval_time": "5m",
            "exp_samples": [sample(cluster_sum(metric), cluster, value)],
        }

    def one(record: str, value: float) -> dict[str, Any]:
        return {"expr": record, "eval_time": "5m", "exp_samples": [sample(record, cluster, value)]}

    return [
        {
            "name": "Cluster totals and per-worker ratios; a worker without a limit counts in the "
            "sums but not in the ratios",
            "interval": "1m",
            "input_series": [
                *series(
                    a,
                    process="600e6x10",
                    managed="300e6x10",
                    unmanaged="250e6x10",
                    recent="50e6x10",
                    paused="1x10",
                    spilled="1e9x10",
                    limit="1e9x10",
                ),
                *series(
                    b,
                    process="200e6+1e6x10",
                    managed="0x10",
                    unmanaged="100e6+1e6x10",
                    recent="100e6x10",
                    paused="0x10",
                    spilled="0x10",
                    limit="500e6x10",
                ),
                *series(
                    nolimit,
                    process="400e6x10",
                    managed="100e6x10",
                    unmanaged="300e6x10",
                    recent="0x10",
                    paused="0x10",
                    spilled="0x10",
                ),
                # worker a's sidecar: joined with the breakdown by worker_name
                Inline(
                    series=n.WORKER_RSS_BYTES
                    + selector({"instance": SIDECAR, "worker": "", "worker_name": "a"}),
                    values="700e6x10",
                ),
                Inline(
                    series=n.WORKER_EVENT_LOOP_PROBE_SECONDS
                    + selector({"instance": SIDECAR, "worker": "", "worker_name": "a"}),
                    values="0.02x10",
                ),
            ],
            "promql_expr_test": [
                # at 5m: a 600e6, b 205e6, nolimit 400e6
                total(n.WORKER_MANAGED_BYTES, 400e6),
                total(n.WORKER_UNMANAGED_BYTES, 655e6),
                total(n.WORKER_UNMANAGED_RECENT_BYTES, 150e6),
                total(n.WORKER_SPILLED_BYTES, 1e9),
                total(n.WORKER_LIMIT_BYTES, 1.5e9),
                one(CLUSTER_WORKERS, 3),
                one(CLUSTER_PAUSED_WORKERS, 1),
                {
                    "expr": WORKER_PROCESS_LIMIT_RATIO,
                    "eval_time": "5m",
                    "exp_samples": [
                        sample(WORKER_PROCESS_LIMIT_RATIO, of(a), 0.6),
                        sample(WORKER_PROCESS_LIMIT_RATIO, of(b), 0.41),
                    ],
                },
                {
                    "expr": WORKER_LIVE_LIMIT_RATIO,
                    "eval_time": "5m",
                    "exp_samples": [
                        sample(WORKER_LIVE_LIMIT_RATIO, {"job": JOB, "worker_name": "a"}, 0.7)
                    ],
                },
                {
                    "expr": WORKER_PROBE_SECONDS,
                    "eval_time": "5m",
                    "exp_samples": [
                        sample(WORKER_PROBE_SECONDS, {"job": JOB, "worker_name": "a"}, 0.02)
                    ],
                },
                {
                    "expr": WORKER_THRESHOLD_BYTES + '{worker_name="b"}',
                    "eval_time": "5m",
                    "exp_samples": [
                        sample(WORKER_THRESHOLD_BYTES, {**of(b), "threshold": t}, ratio * 500e6)
                        for t, ratio in THRESHOLDS
                    ],
                },
            ],
        }
    ]


HEADER = """\
# promtool unit tests: promtool test rules tests/rules/{name} (run by tests/unit/test_rules.py)
# on the generated {rules} (MixinConfig defaults).
# Written by tests/rules/generate.py: edit the cases there, regenerate, review the diff.
# Case names say what must happen. Values are bytes; the limit is 1e9 so that ratios read directly.
"""


def render() -> dict[str, str]:
    docs = {
        "alerts-test.yaml": ("dask-memory-alerts.yaml", "30s", alert_tests()),
        "recording-test.yaml": ("dask-memory-recording.yaml", "1m", recording_tests()),
    }
    out = {}
    for name, (rules, interval, tests) in docs.items():
        doc = {
            "rule_files": [f"../../deploy/prometheus/{rules}"],
            "evaluation_interval": interval,
            "tests": tests,
        }
        body = dump(doc)
        out[name] = HEADER.format(name=name, rules=f"deploy/prometheus/{rules}") + body
    return out


def main() -> None:
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(HERE / name)


if __name__ == "__main__":
    main()
