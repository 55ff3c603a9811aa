-- rq-reconciler schema v2: who may cancel is a database privilege.
--
-- Our tables belong to the role that runs `migrate` and nobody else gets anything by
-- default; an application role gets exactly what `rq-reconciler migrate --print-grants
-- ROLE` prints (INSERT of job_id, requested_by, reason; SELECT of the outcome columns),
-- so it can ask for a cancel but never write state, outcome or claimed_by.
--
-- Like v1, every statement here is safe to run again: `migrate` runs all of them on each
-- upgrade. REVOKE ... FROM PUBLIC takes back only what PUBLIC holds (e.g. through
-- ALTER DEFAULT PRIVILEGES ... TO PUBLIC), never a grant made to a role.

REVOKE ALL ON {requests_table}, {events_table}, {first_seen_table} FROM PUBLIC;

DO $owner_only$
DECLARE
    seq text;
BEGIN
    FOREACH seq IN ARRAY ARRAY[pg_get_serial_sequence({requests_table_literal}, 'id'),
                               pg_get_serial_sequence({events_table_literal}, 'id')] LOOP
        IF seq IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC', seq);
        END IF;
    END LOOP;
END
$owner_only$;

-- A trigger function runs whenever its trigger fires, whoever inserted: EXECUTE is
-- checked only when the trigger is created, and calling it directly is refused anyway.
-- It needs no SECURITY DEFINER either: pg_notify() asks for no privilege.
REVOKE ALL ON FUNCTION {trigger_fn}() FROM PUBLIC;

-- Who asked, when the application does not say: the database role it connected as.
ALTER TABLE {requests_table} ALTER COLUMN requested_by SET DEFAULT current_user;
