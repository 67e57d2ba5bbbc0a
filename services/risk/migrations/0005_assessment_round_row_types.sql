-- Row types the assessment round sends its accruals, assessments and members as: one array of rows
-- per table instead of one array per column. asyncpg checks every array element in Python
-- (an isinstance against collections.abc, ~0.2 us), so a row of twenty fields costs one check
-- instead of twenty. Nothing is stored in these types; they only shape statement parameters.
CREATE TYPE accrual_probe AS (
    member_id text,
    t timestamptz,
    device_id text,
    ip text,
    order_id text,
    source_event_id text
);

-- The assessments columns the round computes per row but assessed_at (one value per round) and the
-- signals (a rows x signals float8[] of their own: only the first row's values are checked).
CREATE TYPE assessment_write AS (
    assessment_id text,
    source_event_id text,
    request_sha256 bytea,
    member_id text,
    event_type smallint,
    is_purchase boolean,
    is_browse boolean,
    points bigint,
    amount_minor bigint,
    currency text,
    order_id text,
    device_id text,
    ip text,
    tier_id text,
    occurred_at timestamptz,
    browse_seconds integer,
    decision smallint,
    score double precision,
    anomaly_score double precision,
    rule_set_version bigint,
    model_version text,
    case_id text,
    assessment bytea,
    explanation bytea
);

-- recent_points travels as the text of a bigint[] (one check instead of up to 50).
CREATE TYPE member_write AS (
    member_id text,
    first_seen timestamptz,
    member_since timestamptz,
    tier_id text,
    recent_points text,
    read_version bigint
);
