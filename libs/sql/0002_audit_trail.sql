-- Shared by every service schema: the append-only, hash-chained audit trail (libs/audit.py).
-- One chain per service. A record is written in the same transaction as the change it records;
-- the single chain-head row is locked while appending, so sequences have no gaps and each record
-- links to its predecessor's hash. Not keyed by member: on distributed PostgreSQL this is a
-- coordinator-local table (few rows: operator actions and reads of unmasked PII).
CREATE TABLE audit_events (
    sequence bigint PRIMARY KEY CHECK (sequence > 0),
    audit_event_id text NOT NULL UNIQUE,
    occurred_at timestamptz NOT NULL,
    service text NOT NULL,
    actor text NOT NULL,
    on_behalf_of text NOT NULL,
    action text NOT NULL,
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    member_id text NOT NULL,
    request_id text NOT NULL,
    trace_id text NOT NULL,
    before_json text NOT NULL,
    after_json text NOT NULL,
    previous_hash text NOT NULL,
    hash text NOT NULL
);
CREATE INDEX audit_events_occurred_at ON audit_events (occurred_at DESC, sequence DESC);
CREATE INDEX audit_events_actor ON audit_events (actor, sequence DESC);
CREATE INDEX audit_events_action ON audit_events (action, sequence DESC);
CREATE INDEX audit_events_member ON audit_events (member_id, sequence DESC) WHERE member_id <> '';
CREATE INDEX audit_events_resource ON audit_events (resource_type, resource_id, sequence DESC);

CREATE TABLE audit_chain_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    sequence bigint NOT NULL,
    hash text NOT NULL
);
INSERT INTO audit_chain_head (singleton, sequence, hash) VALUES (true, 0, repeat('0', 64));

-- Append-only: the product never updates or deletes a record. The trigger stops accidents and
-- ordinary roles; the hash chain is what detects a deliberate edit by someone who can disable it.
CREATE FUNCTION audit_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
