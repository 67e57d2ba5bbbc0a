-- Risk's schema: immutable assessments (with the signals and rule outcomes they were decided on),
-- per-member state, reported activities, versioned rule sets and models, allow/deny lists, review
-- cases, labels, and the outbox of case outcomes to rewards. Hot tables are keyed by member_id
-- first, so the schema distributes by member.

-- Per-member state. Its row is the member's lock: an assessment locks it first, so two concurrent
-- assessments of one member run one after the other and see each other's velocity.
CREATE TABLE members (
    member_id text PRIMARY KEY,
    first_seen timestamptz NOT NULL,
    member_since timestamptz,
    tier_id text NOT NULL DEFAULT '',
    -- Points of the member's latest accruals (at most 50), oldest first: the "own history" median.
    recent_points bigint[] NOT NULL DEFAULT '{}',
    last_assessed_at timestamptz
);

-- One row per assessed accrual (keyed by its source event), never updated except case_id.
CREATE TABLE assessments (
    assessment_id text PRIMARY KEY,
    source_event_id text NOT NULL UNIQUE,
    request_sha256 bytea NOT NULL,
    member_id text NOT NULL,
    event_type smallint NOT NULL,
    is_purchase boolean NOT NULL,
    is_browse boolean NOT NULL,
    points bigint NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    order_id text NOT NULL,
    device_id text NOT NULL,
    ip text NOT NULL,
    tier_id text NOT NULL,
    occurred_at timestamptz NOT NULL,
    browse_seconds integer NOT NULL,
    decision smallint NOT NULL,                 -- loyalty.risk.v1.Decision
    score double precision NOT NULL,
    anomaly_score double precision NOT NULL,
    rule_set_version bigint NOT NULL,
    model_version text NOT NULL,
    case_id text,
    assessed_at timestamptz NOT NULL,
    -- Every signal, in the catalogue's order (services/risk/domain/signals.py; the catalogue only
    -- ever appends), for training and backtests; the answer as sent, and its explanation.
    signals double precision[] NOT NULL,
    assessment bytea NOT NULL,
    explanation bytea NOT NULL
);
CREATE INDEX assessments_member_time ON assessments (member_id, occurred_at);
CREATE INDEX assessments_device_time ON assessments (device_id, occurred_at) WHERE device_id <> '';
CREATE INDEX assessments_ip_time ON assessments (ip, occurred_at) WHERE ip <> '';
CREATE INDEX assessments_order ON assessments (order_id) WHERE order_id <> '';
CREATE INDEX assessments_assessed ON assessments (assessed_at, assessment_id);
CREATE INDEX assessments_member_assessed ON assessments (member_id, assessed_at, assessment_id);

-- Refunds, redemptions and transfers rewards reports (keyed by activity_id).
CREATE TABLE activities (
    activity_id text PRIMARY KEY,
    request_sha256 bytea NOT NULL,
    member_id text NOT NULL,
    kind smallint NOT NULL,                     -- loyalty.risk.v1.ActivityKind
    points bigint NOT NULL,
    amount_minor bigint NOT NULL,
    order_id text NOT NULL,
    occurred_at timestamptz NOT NULL,
    -- A redemption within an hour after one of the member's accruals.
    quick boolean NOT NULL DEFAULT false,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX activities_member_time ON activities (member_id, occurred_at);

-- Versioned rule sets; the body is the RuleSet message as stored (rules, thresholds).
CREATE TABLE rule_sets (
    version bigint PRIMARY KEY,
    state smallint NOT NULL,                    -- loyalty.risk.v1.RuleSetState
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    activated_at timestamptz
);
CREATE UNIQUE INDEX rule_sets_one_active ON rule_sets ((true)) WHERE state = 2;

-- Anomaly models: metadata (the Model message) and the compiled forest file.
CREATE TABLE models (
    model_version text PRIMARY KEY,
    seq bigserial NOT NULL UNIQUE,
    state smallint NOT NULL,                    -- loyalty.risk.v1.ModelState
    info bytea NOT NULL,
    content bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz
);
CREATE UNIQUE INDEX models_one_active ON models ((true)) WHERE state = 3;

-- Allow and deny list entries; removal is a soft delete kept for the audit trail.
CREATE TABLE list_entries (
    entry_id text PRIMARY KEY,
    seq bigserial NOT NULL UNIQUE,
    kind smallint NOT NULL,                     -- loyalty.risk.v1.ListKind
    subject_type smallint NOT NULL,             -- loyalty.risk.v1.ListSubjectType
    value text NOT NULL,
    reason text NOT NULL,
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    removed_at timestamptz,
    removed_by text,
    removed_reason text
);
CREATE UNIQUE INDEX list_entries_active ON list_entries (kind, subject_type, value) WHERE removed_at IS NULL;

-- Review cases: one per REVIEW assessment.
CREATE TABLE cases (
    case_id text PRIMARY KEY,
    assessment_id text NOT NULL UNIQUE REFERENCES assessments (assessment_id),
    member_id text NOT NULL,
    status smallint NOT NULL,                   -- loyalty.risk.v1.CaseStatus
    created_at timestamptz NOT NULL,
    sla_due_at timestamptz NOT NULL,
    assignee_id text NOT NULL DEFAULT '',
    assigned_at timestamptz,
    resolution bytea,                           -- CaseResolution, once resolved
    resolved_at timestamptz,
    resolve_request_id text
);
CREATE INDEX cases_queue ON cases (created_at, case_id) WHERE status IN (1, 2);
CREATE INDEX cases_created ON cases (created_at, case_id);
CREATE INDEX cases_member ON cases (member_id, created_at);

-- Ground truth about assessed accruals.
CREATE TABLE labels (
    label_id text PRIMARY KEY,
    seq bigserial NOT NULL UNIQUE,
    assessment_id text NOT NULL REFERENCES assessments (assessment_id),
    member_id text NOT NULL,
    value smallint NOT NULL,                    -- loyalty.risk.v1.LabelValue
    attack_type smallint NOT NULL,
    source smallint NOT NULL,
    case_id text NOT NULL DEFAULT '',
    analyst_id text NOT NULL,
    note text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    superseded boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX labels_current ON labels (assessment_id) WHERE NOT superseded;
CREATE INDEX labels_created ON labels (created_at, seq);

-- Case outcomes for rewards (ResolveHold), written in the resolving transaction and delivered at
-- least once by the relay, with back-off.
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    case_id text NOT NULL,
    request bytea NOT NULL,                     -- loyalty.rewards.v1.ResolveHoldRequest
    traceparent text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text NOT NULL DEFAULT '',
    delivered_at timestamptz
);
CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE delivered_at IS NULL;

-- Bumped on every change of the active rule set, model or lists, with a NOTIFY, so every replica
-- reloads its cached configuration.
CREATE TABLE config_generation (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    generation bigint NOT NULL
);
INSERT INTO config_generation VALUES (true, 1);
