"""Prometheus metrics: what an operator graphs and alerts on."""

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter("relay_deliveries_total", "Webhook deliveries by outcome", ["outcome"])
DUPLICATES = Counter("relay_duplicates_total", "Deliveries whose webhook-id was already stored")
REJECTS = Counter("relay_rejects_total", "Refused deliveries by error code", ["code"])
INGEST_SECONDS = Histogram(
    "relay_ingest_seconds",
    "Time from request to durable commit",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SUBSCRIBERS = Gauge("relay_subscribers", "Connected WebSocket subscribers")
MESSAGES_SENT = Counter("relay_messages_sent_total", "WebSocket messages sent to subscribers")
SLOW_CLIENT_CLOSES = Counter(
    "relay_slow_client_closes_total", "Subscribers closed with 1013 because they fell behind"
)
UPSTREAM_REQUESTS = Counter(
    "relay_upstream_requests_total", "Attempts at Replicate's API by outcome (ok or error code)", ["outcome"]
)
RECONCILED = Counter("relay_reconciled_total", "Predictions checked by reconcile, by result", ["result"])
