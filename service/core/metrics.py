"""Prometheus metrics: what an operator graphs and alerts on.

With `relay serve --workers N` each worker writes its samples under PROMETHEUS_MULTIPROC_DIR and
`/metrics` merges them, so every worker answers with the totals of all of them.
"""

from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

DELIVERIES = Counter("relay_deliveries_total", "Webhook deliveries by outcome", ["outcome"])
DUPLICATES = Counter("relay_duplicates_total", "Deliveries whose webhook-id was already stored")
REJECTS = Counter("relay_rejects_total", "Refused deliveries by error code", ["code"])
INGEST_SECONDS = Histogram(
    "relay_ingest_seconds",
    "Time from request to durable commit",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SUBSCRIBERS = Gauge("relay_subscribers", "Connected WebSocket subscribers", multiprocess_mode="livesum")
MESSAGES_SENT = Counter("relay_messages_sent_total", "WebSocket messages sent to subscribers")
SLOW_CLIENT_CLOSES = Counter(
    "relay_slow_client_closes_total", "Subscribers closed with 1013 because they fell behind"
)
UPSTREAM_REQUESTS = Counter(
    "relay_upstream_requests_total", "Attempts at Replicate's API by outcome (ok or error code)", ["outcome"]
)
RECONCILED = Counter("relay_reconciled_total", "Predictions checked by reconcile, by result", ["result"])
LISTENER_RECONNECTS = Counter(
    "relay_listener_reconnects_total", "Times the fan-out LISTEN connection was re-established"
)
REPLAY_DELIVERIES = Counter(
    "relay_replay_deliveries_total",
    "Replayed events by outcome: delivered, retried, failed (to a URL), fanout (to subscribers)",
    ["outcome"],
)
SPEND_USD = Gauge(
    "relay_spend_usd", "Estimated spend this UTC month (RELAY_PRICES)", multiprocess_mode="mostrecent"
)
BUDGET_USD = Gauge("relay_budget_usd", "RELAY_BUDGET, USD per month", multiprocess_mode="mostrecent")

DESTINATION_EVENTS = Counter(
    "relay_destination_events_total",
    "Destination sends by outcome: sent (2xx), failed (an attempt), exhausted (retries spent)",
    ["destination", "outcome"],
)
DESTINATION_LAG_EVENTS = Gauge(
    "relay_destination_lag_events",
    "Events a destination has not received yet (log past its cursor, plus owed)",
    ["destination"],
    multiprocess_mode="livemax",
)
DESTINATION_LAG_SECONDS = Gauge(
    "relay_destination_lag_seconds",
    "Age of the oldest event a destination has not received yet",
    ["destination"],
    multiprocess_mode="livemax",
)


def exposition(multiprocess_dir: Path | None) -> bytes:
    """The Prometheus text of this process, or of all workers sharing `multiprocess_dir`."""
    if multiprocess_dir is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    # prometheus_client leaves its multiprocess helpers unannotated (the rest of it is typed).
    multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def forget_process(multiprocess_dir: Path | None, pid: int) -> None:
    """Drop an exiting worker's live gauges (subscribers) from the merged view."""
    if multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]


# Output archive
ARCHIVE_FILES = Counter("relay_archive_files_total", "Output files stored in the archive")
ARCHIVE_BYTES = Counter("relay_archive_bytes_total", "Bytes of output files stored in the archive")
ARCHIVE_FAILURES = Counter(
    "relay_archive_failures_total", "Archive downloads that ended failed, by reason", ["reason"]
)
ARCHIVE_RETRIES = Counter("relay_archive_retries_total", "Archive download attempts that will be retried")
ARCHIVE_QUEUE = Gauge(
    "relay_archive_queue_depth", "Archive jobs pending (all instances)", multiprocess_mode="mostrecent"
)
ARCHIVE_OLDEST = Gauge(
    "relay_archive_oldest_pending_seconds",
    "Age of the oldest pending archive job (all instances)",
    multiprocess_mode="mostrecent",
)
