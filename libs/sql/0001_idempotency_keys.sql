-- Shared by every service schema: the results of mutating RPCs keyed by the caller's request id
-- (AIP-155). A retry with the same id and payload gets the stored response; another payload
-- under the same id is refused. Written in the same transaction as the mutation it records.
CREATE TABLE idempotency_keys (
    method text NOT NULL,
    request_id text NOT NULL,
    payload_sha256 bytea NOT NULL,
    response bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (method, request_id)
);
