-- rq-reconciler schema v1. Placeholders in braces are filled with quoted identifiers
-- from the config by `rq-reconciler migrate`.

-- job_id has the jobs id column's own type, read from the catalog when this runs: the
-- script is written from the config alone (`migrate --print-sql` needs no connection).
DO $rqr_requests$
DECLARE
    id_type text;
BEGIN
    IF to_regclass({requests_table_literal}) IS NULL THEN
        SELECT format_type(a.atttypid, a.atttypmod) INTO id_type FROM pg_attribute a
        WHERE a.attrelid = {jobs_table_literal}::regclass AND a.attname = {jobs_id_literal}
          AND NOT a.attisdropped;
        IF id_type IS NULL THEN
            RAISE EXCEPTION 'jobs table % has no column % (jobs.table / jobs.id_column)',
                {jobs_table_literal}, {jobs_id_literal};
        END IF;
        EXECUTE format($rqr_create$
CREATE TABLE {requests_table} (
    id            bigserial PRIMARY KEY,
    job_id        %s NOT NULL REFERENCES {jobs_table} ({jobs_id}) ON DELETE CASCADE,
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
)$rqr_create$, id_type);
    END IF;
END
$rqr_requests$;

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
