-- Profile's schema: members (PII encrypted per member), write-once behaviour events, per-member
-- aggregates (lifetime row + daily buckets so any window can be answered), orders for refund
-- checks, and the transactional outbox to rewards. Every table is keyed by member_id first, so
-- the schema distributes by member (see docs/scale.md when it exists).

-- Key-encryption keys are configuration, not data: only their ids appear here.
CREATE TABLE members (
    member_id text PRIMARY KEY,
    external_id text,
    status smallint NOT NULL DEFAULT 1,            -- loyalty.profile.v1.MemberStatus
    merged_into_member_id text,
    channel smallint NOT NULL DEFAULT 0,           -- loyalty.common.v1.Channel
    region text NOT NULL DEFAULT '',
    locale text NOT NULL DEFAULT '',
    gender smallint NOT NULL DEFAULT 0,            -- protected attribute: fairness report only
    birth_year smallint,                           -- coarse, for age bands; the date itself is PII
    consents jsonb NOT NULL DEFAULT '{}'::jsonb,
    joined_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    erased_at timestamptz,
    merged_at timestamptz,
    version bigint NOT NULL DEFAULT 1,             -- etag
    -- PII: one AES-GCM blob (name, email, phone, birth date) under the member's own data key.
    pii_ciphertext bytea,
    pii_nonce bytea,
    -- The member's data key, wrapped by a key-encryption key. Erasure deletes it: crypto-shredding.
    dek_wrapped bytea,
    dek_nonce bytea,
    kek_id text,
    -- Keyed hashes (HMAC-SHA256) for look-ups; never the plaintext.
    email_hash bytea,
    phone_hash bytea,
    created_by_event boolean NOT NULL DEFAULT false
);
CREATE INDEX members_created_at ON members (created_at, member_id);
CREATE INDEX members_kek ON members (kek_id) WHERE dek_wrapped IS NOT NULL;

-- Unique look-up keys among non-erased members (external id, e-mail hash, phone hash). A reference
-- table: the one global index, kept small (one row per key).
CREATE TABLE member_keys (
    kind smallint NOT NULL,                        -- 1 external_id, 2 email hash, 3 phone hash
    key bytea NOT NULL,
    member_id text NOT NULL REFERENCES members (member_id),
    PRIMARY KEY (kind, key)
);
CREATE INDEX member_keys_member ON member_keys (member_id);

CREATE TABLE events (
    member_id text NOT NULL,                       -- the member credited (the survivor after a merge)
    event_id text NOT NULL,
    event_type smallint NOT NULL,                  -- loyalty.common.v1.EventType
    occurred_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    channel smallint NOT NULL,
    device_id text,
    ip_address inet,
    session_id text,
    order_id text,
    amount_minor bigint,
    category text,
    flags smallint[] NOT NULL DEFAULT '{}',
    original_member_id text,                       -- set when the event was redirected or merged
    payload_sha256 bytea NOT NULL,                 -- of the request event, for duplicate vs conflict
    payload bytea NOT NULL,                        -- the cleaned BehaviourEvent as recorded
    PRIMARY KEY (member_id, event_id)
);
CREATE INDEX events_member_time ON events (member_id, occurred_at DESC, event_id);

-- Every (original member, event id) ever received, so a retry sent for a merged duplicate is
-- still recognised as a duplicate after its events moved to the survivor.
CREATE TABLE event_ids (
    member_id text NOT NULL,
    event_id text NOT NULL,
    stored_member_id text NOT NULL,
    payload_sha256 bytea NOT NULL,
    PRIMARY KEY (member_id, event_id)
);

CREATE TABLE orders (
    member_id text NOT NULL,
    order_id text NOT NULL,
    purchase_event_id text NOT NULL,
    occurred_at timestamptz NOT NULL,
    amount_minor bigint NOT NULL,
    refunded_minor bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    PRIMARY KEY (member_id, order_id)
);

CREATE TABLE sessions (
    member_id text NOT NULL,
    session_id text NOT NULL,
    PRIMARY KEY (member_id, session_id)
);

-- Lifetime aggregates, one row per member, updated in the events' transaction.
CREATE TABLE member_aggregates (
    member_id text PRIMARY KEY,
    purchase_count bigint NOT NULL DEFAULT 0,
    spend_minor bigint NOT NULL DEFAULT 0,
    items_purchased bigint NOT NULL DEFAULT 0,
    refund_count bigint NOT NULL DEFAULT 0,
    refund_minor bigint NOT NULL DEFAULT 0,
    visit_count bigint NOT NULL DEFAULT 0,
    browse_seconds bigint NOT NULL DEFAULT 0,
    view_count bigint NOT NULL DEFAULT 0,
    search_count bigint NOT NULL DEFAULT 0,
    click_count bigint NOT NULL DEFAULT 0,
    cart_add_count bigint NOT NULL DEFAULT 0,
    first_purchase_at timestamptz,
    last_purchase_at timestamptz,
    last_activity_at timestamptz,
    last_sessionless_at timestamptz,               -- for 30-minute visit bursts without session ids
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Daily buckets (UTC days): any rolling window is a sum over them.
CREATE TABLE member_daily (
    member_id text NOT NULL,
    day date NOT NULL,
    purchase_count integer NOT NULL DEFAULT 0,
    spend_minor bigint NOT NULL DEFAULT 0,
    items_purchased integer NOT NULL DEFAULT 0,
    refund_count integer NOT NULL DEFAULT 0,
    refund_minor bigint NOT NULL DEFAULT 0,
    visit_count integer NOT NULL DEFAULT 0,
    browse_seconds bigint NOT NULL DEFAULT 0,
    view_count integer NOT NULL DEFAULT 0,
    search_count integer NOT NULL DEFAULT 0,
    click_count integer NOT NULL DEFAULT 0,
    cart_add_count integer NOT NULL DEFAULT 0,
    PRIMARY KEY (member_id, day)
);

-- Lifetime category affinity: spend, items and views per category.
CREATE TABLE member_categories (
    member_id text NOT NULL,
    category text NOT NULL,
    spend_minor bigint NOT NULL DEFAULT 0,
    items_purchased bigint NOT NULL DEFAULT 0,
    view_count bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (member_id, category)
);

-- Transactional outbox: written with the events, delivered at least once, in order per member.
CREATE TABLE outbox (
    id bigserial,
    member_id text NOT NULL,
    kind smallint NOT NULL,                        -- loyalty.profile.v1.OutboxMessageKind
    source_event_id text,
    payload bytea NOT NULL,                        -- the serialized message for the receiver
    trace_context jsonb NOT NULL DEFAULT '{}'::jsonb,  -- W3C traceparent/tracestate of the writer
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    delivered_at timestamptz,
    PRIMARY KEY (member_id, id)
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at, id) WHERE delivered_at IS NULL;
CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;
