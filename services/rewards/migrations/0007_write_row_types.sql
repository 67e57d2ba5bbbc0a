-- Row types the ledger's writes send their rows as: one array of rows per table instead of one
-- array per column. asyncpg checks every array element in Python (an isinstance against
-- collections.abc), so a row of thirty fields costs one check instead of thirty, and PostgreSQL
-- unnests one array instead of thirty (about half the cost on each side, measured in
-- docs/scale.md). Nothing is stored in these types; they only shape statement parameters, and
-- their fields follow the columns of the tables they are written into.
CREATE TYPE accrual_write AS (
    member_id text,
    source_event_id text,
    payload_sha256 bytea,
    credited_member_id text,
    event_type smallint,
    order_id text,
    occurred_at timestamptz,
    currency text,
    amount_minor bigint,
    status smallint,
    points bigint,
    qualifying_points bigint,
    unposted bigint,
    unposted_qualifying bigint,
    entry_id bigint,
    case_id text,
    assessment_id text,
    available_at timestamptz,
    earning_rules_version bigint,
    day date,
    breakdown bytea,
    result bytea,
    gate_request bytea,
    next_gate_attempt_at timestamptz
);

-- lot_ids and lot_points travel as comma-separated text (mostly empty), turned into arrays by
-- the INSERT.
CREATE TYPE ledger_entry_write AS (
    member_id text,
    entry_id bigint,
    type smallint,
    points bigint,
    posted_delta bigint,
    pending_delta bigint,
    held_delta bigint,
    reserved_delta bigint,
    qualifying_delta bigint,
    lifetime_delta bigint,
    issued bigint,
    posted_balance_after bigint,
    source smallint,
    source_event_id text,
    order_id text,
    redemption_id text,
    case_id text,
    dispute_id text,
    related_entry_id bigint,
    lot_ids text,
    lot_points text,
    reason text,
    reason_code text,
    actor text,
    request_id text,
    operator_id text,
    earning_rules_version bigint,
    available_at timestamptz,
    qualifying_at timestamptz
);

CREATE TYPE lot_write AS (
    member_id text,
    lot_id bigint,
    source_entry_id bigint,
    source_event_id text,
    original_points bigint,
    remaining_points bigint,
    earned_at timestamptz,
    expires_at timestamptz,
    state smallint
);

CREATE TYPE account_write AS (
    member_id text,
    posted bigint,
    pending bigint,
    held bigint,
    reserved bigint,
    lifetime bigint
);
