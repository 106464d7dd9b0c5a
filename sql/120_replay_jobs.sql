-- Admin replay jobs (POST /admin/replay). The process that runs one keeps its row current (the
-- report so far, a heartbeat) and reads `cancel_requested` back, so every instance and worker
-- answers GET /admin/replay/{job} and takes a cancel (service/ops/replay_jobs.py).
CREATE TABLE replay_jobs (
    id               text        PRIMARY KEY,
    status           text        NOT NULL DEFAULT 'running'
                                 CHECK (status IN ('running', 'done', 'failed', 'canceled')),
    error            text,
    report           jsonb       NOT NULL,
    cancel_requested boolean     NOT NULL DEFAULT false,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    heartbeat_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX replay_jobs_finished ON replay_jobs (finished_at) WHERE finished_at IS NOT NULL;

GRANT SELECT, INSERT, UPDATE, DELETE ON replay_jobs TO relay_app;
