-- rq-reconciler schema v1. Placeholders in braces are filled with quoted identifiers
-- from the config (and the jobs id column's own type) by `rq-reconciler migrate`.

CREATE TABLE IF NOT EXISTS {requests_table} (
    id            bigserial PRIMARY KEY,
    job_id        {id_type} NOT NULL REFERENCES {jobs_table} ({jobs_id}) ON DELETE CASCADE,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    requested_by  text,
    reason        text,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'claimed', 'done')),
    claimed_by    text,
    claimed_until timestamptz,
    outcome       text CHECK (outcome IS NULL OR outcome IN ('cancelled', 'already_finished', 'failed')),
    detail        jsonb,
    done_at       timestamptz
);

-- Open requests are few; this index keeps the claim query cheap however long history grows.
CREATE INDEX IF NOT EXISTS {requests_open_index} ON {requests_table} (id) WHERE state <> 'done';
CREATE INDEX IF NOT EXISTS {requests_job_index} ON {requests_table} (job_id);

CREATE OR REPLACE FUNCTION {trigger_fn}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify({channel_literal}, NEW.id::text);
    RETURN NEW;
END
$fn$;

DROP TRIGGER IF EXISTS {trigger_name} ON {requests_table};
CREATE TRIGGER {trigger_name} AFTER INSERT ON {requests_table}
    FOR EACH ROW EXECUTE FUNCTION {trigger_fn}();

-- One row per transition the daemon applied. job_id is text so that it fits any id type
-- and outlives the job row.
CREATE TABLE IF NOT EXISTS {events_table} (
    id          bigserial PRIMARY KEY,
    job_id      text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    from_status text NOT NULL,
    to_status   text NOT NULL,
    reason      text NOT NULL,
    rq_status   text,
    detail      jsonb,
    actor       text NOT NULL
);
CREATE INDEX IF NOT EXISTS {events_job_index} ON {events_table} (job_id, at);

-- When the daemon first saw an active row that has no started_at: min_age counts from here.
CREATE TABLE IF NOT EXISTS {first_seen_table} (
    job_id     text PRIMARY KEY,
    first_seen timestamptz NOT NULL DEFAULT now()
);
