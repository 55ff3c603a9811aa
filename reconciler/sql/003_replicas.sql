-- rq-reconciler schema v3: replicas on several hosts, and cancels handed between them.
--
-- Every replica registers itself and the workers it can see on its own host (their pid
-- verified against the worker's birth), with a heartbeat. A replica that claims a cancel
-- for a job on a worker it cannot see hands the request to the live replica that lists
-- that worker, so the job gets the graceful stop on its own host.

CREATE TABLE IF NOT EXISTS {replicas_table} (
    instance     text PRIMARY KEY,
    hostname     text NOT NULL,
    host_id      text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    workers      text[] NOT NULL DEFAULT '{}'
);
REVOKE ALL ON {replicas_table} FROM PUBLIC;

-- The replica a pending request was handed to, and when: only that replica may claim it
-- until cancel.handover_seconds have passed; then anyone may (and falls back to stop-job).
ALTER TABLE {requests_table} ADD COLUMN IF NOT EXISTS handed_to text;
ALTER TABLE {requests_table} ADD COLUMN IF NOT EXISTS handed_at timestamptz;

-- Recently cancelled jobs are looked at again by each sweep (a job enqueued after its
-- cancel must not run): found through the requests that cancelled them.
CREATE INDEX IF NOT EXISTS {requests_done_index} ON {requests_table} (done_at)
    WHERE outcome = 'cancelled';
