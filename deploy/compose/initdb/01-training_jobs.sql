-- The example application's jobs table (the seed's shape): created by the app's own
-- migrations in real life. rq-reconciler's tables come from `rq-reconciler migrate`.
CREATE TABLE training_jobs (
  id bigserial PRIMARY KEY,
  name text NOT NULL DEFAULT 'job',
  rq_job_id text,
  status text NOT NULL DEFAULT 'queued',
  error_message text,
  created_at timestamptz NOT NULL DEFAULT now(),
  started_at timestamptz,
  completed_at timestamptz
);
CREATE INDEX ON training_jobs (rq_job_id);
