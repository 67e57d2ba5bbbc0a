-- Events are claimed on their own primary key (member credited, event id): the separate registry of
-- event ids cost one more indexed insert per event on the hot path. A merged duplicate's events keep
-- their old member in original_member_id; look-ups by it use this small partial index.
DROP TABLE event_ids;
CREATE INDEX events_original_member ON events (original_member_id, event_id) WHERE original_member_id IS NOT NULL;
