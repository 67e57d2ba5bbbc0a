-- A request id is scoped to the member its request names (the request's top-level member_id; ''
-- for requests about no single member): the key row then lives with the member's rows, so a
-- member's mutation commits on one shard of a database distributed by member_id. The same id sent
-- for another member is another request; for the same member with another payload it is still
-- refused (REQUEST_ID_REUSED).
ALTER TABLE idempotency_keys ADD COLUMN member_id text NOT NULL DEFAULT '';
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (member_id, method, request_id);
