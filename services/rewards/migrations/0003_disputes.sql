-- Member disputes (SubmitDispute, ResolveDispute). Keyed by member first, like every per-member
-- table, so the schema still distributes by member; the one open dispute per member and subject is
-- a unique key that holds member_id too.

CREATE TABLE disputes (
    member_id text NOT NULL,
    dispute_id text NOT NULL,
    -- What is contested: 'tier:<evaluation run>' ('tier:' for a member placed by no run),
    -- 'entry:<ledger entry id>' or 'credit:<source event id>'.
    subject_key text NOT NULL,
    subject bytea NOT NULL,                     -- loyalty.rewards.v1.DisputeSubject as submitted
    text text NOT NULL,                         -- the member's words
    language_tag text NOT NULL,                 -- the member's locale; outcomes render in it
    channel smallint NOT NULL DEFAULT 0,        -- loyalty.common.v1.Channel
    state smallint NOT NULL,                    -- loyalty.rewards.v1.DisputeState
    explanation text NOT NULL,                  -- operator-facing, attached at submission
    -- loyalty.rewards.v1.DisputeResolution once resolved, without member_message: the outcome is
    -- rendered from its key and parameters when read, so operators' wording changes apply.
    resolution bytea,
    request_id text NOT NULL,
    submitted_by text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    resolved_at timestamptz,
    PRIMARY KEY (member_id, dispute_id)
);
CREATE UNIQUE INDEX disputes_one_open ON disputes (member_id, subject_key) WHERE state = 1;
CREATE INDEX disputes_by_id ON disputes (dispute_id);
-- The operators' queue: open first, oldest first.
CREATE INDEX disputes_queue ON disputes (state, created_at, dispute_id);
CREATE INDEX disputes_by_member ON disputes (member_id, state, created_at, dispute_id);
