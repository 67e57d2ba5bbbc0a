-- Reads of a case show whether its outcome has reached rewards: the outbox is looked up by case.
CREATE INDEX outbox_case ON outbox (case_id) WHERE delivered_at IS NULL;
-- ListLabels and the case's member context by member, newest first.
CREATE INDEX labels_member ON labels (member_id, created_at, seq);
-- The case's member context: active list entries naming a subject, whatever their kind.
CREATE INDEX list_entries_subject ON list_entries (subject_type, value) WHERE removed_at IS NULL;
