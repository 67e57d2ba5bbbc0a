-- The last applied run is read on every online score (a member's current tier is that run's plus
-- the online changes since): an index in the query's order answers it from its first entry
-- instead of sorting every succeeded applied run, a number that grows with each cycle.
CREATE INDEX evaluation_runs_last_applied ON evaluation_runs (as_of DESC, finished_at DESC)
    WHERE NOT dry_run AND state = 3;
