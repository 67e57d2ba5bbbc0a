-- The outbox's primary key holds member_id, like every other key of the schema, so the outbox
-- distributes with its member (Citus, distribution column member_id; libs/distribution.py checks
-- the catalogue). id stays first: the relay finds a claimed row by it, and one index serves both.
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE outbox ADD CONSTRAINT outbox_pkey PRIMARY KEY (id, member_id);
