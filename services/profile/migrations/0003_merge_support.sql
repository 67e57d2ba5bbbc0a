-- Merging members re-points the duplicate's event ids to the survivor: find them by stored member.
CREATE INDEX event_ids_stored_member ON event_ids (stored_member_id);
