-- Rewards' schema: versioned earning rules, the append-only points ledger (entries, lots,
-- per-member balances), accruals keyed by their source event, reversals, redemptions, the members'
-- tier and segment, earning usage for caps and budgets, and the outbox of notifications.
-- Hot tables are keyed by member_id first, so the schema distributes by member.
--
-- Points are bigint and exact. A ledger entry is never updated or deleted; balances are the sum
-- of their entries' deltas (Reconcile checks it).

-- One row per version; `rule_set` is the EarningRuleSet message as created (output-only fields are
-- filled in when read).
CREATE TABLE earning_rule_sets (
    version bigint PRIMARY KEY,
    state smallint NOT NULL,                    -- loyalty.rewards.v1.EarningRuleSetState
    rule_set bytea NOT NULL,
    created_by text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz
);
CREATE UNIQUE INDEX earning_rule_sets_one_active ON earning_rule_sets ((true)) WHERE state = 2;

-- A member's balances, kept equal to the sums of the member's entries. Its row is the member's
-- lock: every ledger mutation locks it first (several members: in member-id order).
CREATE TABLE accounts (
    member_id text PRIMARY KEY,
    posted bigint NOT NULL DEFAULT 0,           -- negative = debt
    pending bigint NOT NULL DEFAULT 0,
    held bigint NOT NULL DEFAULT 0,
    reserved bigint NOT NULL DEFAULT 0,
    lifetime bigint NOT NULL DEFAULT 0,
    merged_into text,                           -- set once the member was merged into a survivor
    merged_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE ledger_entry_ids;
CREATE SEQUENCE lot_ids;

-- Immutable entries. `points` is the figure shown (see LedgerEntryType); the *_delta columns are
-- what the entry did to each balance, `issued` the points it brought into the programme.
CREATE TABLE ledger_entries (
    member_id text NOT NULL,
    entry_id bigint NOT NULL,
    type smallint NOT NULL,                     -- loyalty.rewards.v1.LedgerEntryType
    points bigint NOT NULL,
    posted_delta bigint NOT NULL DEFAULT 0,
    pending_delta bigint NOT NULL DEFAULT 0,
    held_delta bigint NOT NULL DEFAULT 0,
    reserved_delta bigint NOT NULL DEFAULT 0,
    qualifying_delta bigint NOT NULL DEFAULT 0,
    lifetime_delta bigint NOT NULL DEFAULT 0,
    issued bigint NOT NULL DEFAULT 0,
    posted_balance_after bigint NOT NULL,
    source smallint NOT NULL,                   -- loyalty.rewards.v1.LedgerSource
    source_event_id text,
    order_id text,
    redemption_id text,
    case_id text,
    dispute_id text,
    related_entry_id bigint,
    lot_ids bigint[],
    lot_points bigint[],
    reason text NOT NULL DEFAULT '',
    reason_code text NOT NULL DEFAULT '',
    actor text NOT NULL DEFAULT '',
    request_id text NOT NULL DEFAULT '',
    operator_id text NOT NULL DEFAULT '',
    earning_rules_version bigint NOT NULL DEFAULT 0,
    available_at timestamptz,
    -- When the qualifying points count towards the rolling window: the event's occurred_at.
    qualifying_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member_id, entry_id)
);
CREATE INDEX ledger_entries_qualifying ON ledger_entries (member_id, qualifying_at) WHERE qualifying_delta <> 0;
CREATE INDEX ledger_entries_source_event ON ledger_entries (member_id, source_event_id) WHERE source_event_id IS NOT NULL;
CREATE INDEX ledger_entries_order ON ledger_entries (member_id, order_id) WHERE order_id IS NOT NULL;

-- The points of one credit with their own expiry date, consumed FIFO by earliest expiry.
CREATE TABLE lots (
    member_id text NOT NULL,
    lot_id bigint NOT NULL,
    source_entry_id bigint NOT NULL,
    source_event_id text,
    original_points bigint NOT NULL,
    remaining_points bigint NOT NULL CHECK (remaining_points >= 0),
    earned_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    state smallint NOT NULL,                    -- loyalty.rewards.v1.LotState
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member_id, lot_id)
);
CREATE INDEX lots_fifo ON lots (member_id, expires_at, earned_at, lot_id) WHERE state = 1;
CREATE INDEX lots_due ON lots (expires_at) WHERE state = 1;

-- One row per accrual, keyed by the member it was sent for and its source event. `result` is the
-- AccrualResult of the first processing (a replay answers DUPLICATE with it); `status` follows
-- the credit afterwards (a hold released, a pending credit posted, a refund).
CREATE TABLE accruals (
    member_id text NOT NULL,
    source_event_id text NOT NULL,
    payload_sha256 bytea NOT NULL,
    credited_member_id text NOT NULL,           -- the survivor when the member was merged
    event_type smallint NOT NULL,
    order_id text,
    occurred_at timestamptz NOT NULL,
    currency text NOT NULL DEFAULT '',
    amount_minor bigint NOT NULL DEFAULT 0,
    status smallint NOT NULL,                   -- loyalty.rewards.v1.AccrualOutcome, as it stands now
    points bigint NOT NULL DEFAULT 0,           -- computed (and, unless voided, credited) points
    qualifying_points bigint NOT NULL DEFAULT 0,
    unposted bigint NOT NULL DEFAULT 0,         -- still pending or held
    unposted_qualifying bigint NOT NULL DEFAULT 0,
    reversed_points bigint NOT NULL DEFAULT 0,  -- taken back by refunds so far
    reversed_qualifying bigint NOT NULL DEFAULT 0,
    entry_id bigint,                            -- the entry that created the credit/hold/pending
    case_id text,
    assessment_id text,
    available_at timestamptz,
    earning_rules_version bigint NOT NULL DEFAULT 0,
    day date,                                   -- programme day of occurred_at (caps)
    breakdown bytea,                            -- PointsBreakdown (caps and campaign usage given back on a void)
    result bytea NOT NULL,
    -- The AssessAccrualRequest sent to risk, kept while the credit is held for the gate: a retry sends
    -- exactly the same request, so risk answers it idempotently.
    gate_request bytea,
    gate_attempts integer NOT NULL DEFAULT 0,
    next_gate_attempt_at timestamptz,
    resolution smallint,                        -- loyalty.rewards.v1.HoldAction, once a hold is settled
    resolution_entry_id bigint,
    resolved_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member_id, source_event_id)
);
CREATE INDEX accruals_source_event ON accruals (source_event_id);
CREATE INDEX accruals_order ON accruals (credited_member_id, order_id) WHERE order_id IS NOT NULL AND event_type = 6;
CREATE INDEX accruals_case ON accruals (case_id) WHERE case_id IS NOT NULL;
CREATE INDEX accruals_gate_due ON accruals (next_gate_attempt_at) WHERE status = 4;
CREATE INDEX accruals_pending_due ON accruals (available_at) WHERE status = 2;

-- Reversals of orders' points (ReverseOrder or REFUND accruals), keyed by the refund event.
CREATE TABLE reversals (
    member_id text NOT NULL,
    source_event_id text NOT NULL,
    payload_sha256 bytea NOT NULL,
    order_id text NOT NULL,
    currency text NOT NULL,
    refunded_minor bigint NOT NULL,
    reversal bytea NOT NULL,                    -- the Reversal message answered
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member_id, source_event_id)
);
CREATE INDEX reversals_order ON reversals (member_id, order_id);

-- Redemptions: direct, or reserved then confirmed / released / expired.
CREATE TABLE redemptions (
    member_id text NOT NULL,
    redemption_id text NOT NULL,
    request_id text NOT NULL,
    state smallint NOT NULL,                    -- loyalty.rewards.v1.RedemptionState
    points bigint NOT NULL,
    order_id text,
    currency text NOT NULL DEFAULT '',
    order_amount_minor bigint NOT NULL DEFAULT 0,
    money_value_minor bigint NOT NULL DEFAULT 0,
    lot_ids bigint[],
    lot_points bigint[],
    entry_id bigint,
    available_after bigint NOT NULL DEFAULT 0,
    expires_at timestamptz,
    description text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member_id, redemption_id)
);
CREATE INDEX redemptions_id ON redemptions (redemption_id);
CREATE INDEX redemptions_order ON redemptions (member_id, order_id) WHERE order_id IS NOT NULL;
CREATE INDEX redemptions_reserved_due ON redemptions (expires_at) WHERE state = 2;

-- A member's current tier and segment, as scoring last set them (ApplyTierChanges,
-- AssignMemberSegments). Accrue reads the tier for its multiplier and the segment for campaigns.
CREATE TABLE member_status (
    member_id text PRIMARY KEY,
    tier_id text NOT NULL DEFAULT '',
    tier_since timestamptz,
    tier_run_id text NOT NULL DEFAULT '',
    tier_effective_at timestamptz,
    segment_id text NOT NULL DEFAULT '',
    segmentation_id text NOT NULL DEFAULT '',
    segment_effective_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Points a member earned per programme day (all earning, and browse points), for the daily,
-- monthly and browse caps; a voided hold gives its points back.
CREATE TABLE earning_days (
    member_id text NOT NULL,
    day date NOT NULL,
    points bigint NOT NULL DEFAULT 0,
    browse_points bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (member_id, day)
);

-- Campaign points awarded per member (member cap) and in total (budget).
CREATE TABLE campaign_member_usage (
    member_id text NOT NULL,
    campaign_id text NOT NULL,
    points bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (member_id, campaign_id)
);
CREATE TABLE campaign_budgets (
    campaign_id text PRIMARY KEY,
    points_awarded bigint NOT NULL DEFAULT 0
);

-- Notifications for other services (scoring: qualifying points reversed; members: points expiring
-- soon), written in the transaction of the change that caused them.
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    member_id text NOT NULL,
    kind text NOT NULL,
    payload jsonb NOT NULL,
    dedupe_key text,
    traceparent text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX outbox_dedupe ON outbox (member_id, kind, dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX outbox_undelivered ON outbox (next_attempt_at, id) WHERE delivered_at IS NULL;

-- Expiry runs (RunExpiry and the scheduled job).
CREATE TABLE expiry_runs (
    request_id text PRIMARY KEY,
    as_of timestamptz NOT NULL,
    run bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
