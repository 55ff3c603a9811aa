-- rq-reconciler schema v4: orphans queued again ([orphans] requeue).
--
-- One row per RQ job that lost its worker mid-run: how often it was queued again, by
-- cause, and the run ("<worker>@<started_at>") of the last requeue. A requeue is claimed
-- here before it is made in Redis, by a guarded upsert that only one replica can win per
-- run: a restart or a second replica forgets no count and never requeues one run twice.

CREATE TABLE IF NOT EXISTS {requeues_table} (
    rq_id        text PRIMARY KEY,
    requeues     integer NOT NULL DEFAULT 0,
    disruptions  integer NOT NULL DEFAULT 0,
    last_attempt text,
    last_cause   text,
    last_at      timestamptz,
    claimed_by   text
);
REVOKE ALL ON {requeues_table} FROM PUBLIC;
