-- Tiers, segments, the benefit catalogue, benefit uses and coupons.
-- Per-member tables are keyed by member_id first and every unique key holds it, so the schema
-- distributes by member. The catalogue is small and shared by every member (a reference table).
-- The member's current tier and segment live in member_status (0001), which the ledger reads.

-- Every tier change scoring sent, keyed by (member, evaluation run): the idempotency key of
-- ApplyTierChanges and the member's tier history. from_tier_id is rewards' record the change
-- replaced (or found, when SUPERSEDED), not scoring's belief.
CREATE TABLE tier_changes (
    member_id text NOT NULL,
    evaluation_run_id text NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,    -- arrival order, the tie-break of the history's order
    from_tier_id text NOT NULL DEFAULT '',
    to_tier_id text NOT NULL,
    direction smallint NOT NULL,                -- loyalty.rewards.v1.TierChangeDirection
    reason text NOT NULL DEFAULT '',
    outcome smallint NOT NULL,                  -- loyalty.rewards.v1.TierChangeOutcome (APPLIED or SUPERSEDED)
    effective_at timestamptz NOT NULL,
    applied_at timestamptz NOT NULL,
    actor text NOT NULL DEFAULT '',
    PRIMARY KEY (member_id, evaluation_run_id)
);
CREATE INDEX tier_changes_history ON tier_changes (member_id, effective_at DESC, seq DESC);

-- Every segment assignment, keyed by (member, segmentation): the idempotency key of
-- AssignMemberSegments.
CREATE TABLE segment_assignments (
    member_id text NOT NULL,
    segmentation_id text NOT NULL,
    segment_id text NOT NULL,
    applied boolean NOT NULL,                   -- false: a later segmentation had already set the member's
    effective_at timestamptz NOT NULL,
    assigned_at timestamptz NOT NULL,
    PRIMARY KEY (member_id, segmentation_id)
);

-- The benefit catalogue. `benefit` is the Benefit message as last written (output-only fields are
-- filled in from the columns when read); the columns are what queries filter on.
CREATE TABLE benefits (
    benefit_id text PRIMARY KEY,
    tier_id text NOT NULL,
    kind smallint NOT NULL,                     -- loyalty.rewards.v1.BenefitKind
    state smallint NOT NULL,                    -- loyalty.rewards.v1.BenefitState
    revision bigint NOT NULL,
    value bigint NOT NULL,
    benefit bytea NOT NULL,
    created_by text NOT NULL DEFAULT '',
    updated_by text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX benefits_by_tier ON benefits (tier_id, created_at, benefit_id);
CREATE INDEX benefits_listed ON benefits (created_at, benefit_id);

-- Every recorded use of a benefit, with the value granted then (a later catalogue change never
-- rewrites it). Usage limits count these rows per calendar period.
CREATE TABLE benefit_uses (
    member_id text NOT NULL,
    use_id text NOT NULL,
    benefit_id text NOT NULL,
    kind smallint NOT NULL,
    tier_id text NOT NULL,
    value bigint NOT NULL,
    ledger_entry_id bigint,                     -- the BENEFIT_GRANT entry, for points kinds
    coupon_id text,                             -- the coupon issued, for COUPON
    order_id text NOT NULL DEFAULT '',
    channel smallint NOT NULL DEFAULT 0,
    verification_code text NOT NULL,
    request_id text NOT NULL,
    actor text NOT NULL DEFAULT '',
    used_at timestamptz NOT NULL,
    PRIMARY KEY (member_id, use_id)
);
CREATE INDEX benefit_uses_by_member ON benefit_uses (member_id, benefit_id, used_at);
CREATE INDEX benefit_uses_by_member_time ON benefit_uses (member_id, used_at DESC, use_id DESC);
CREATE INDEX benefit_uses_by_benefit ON benefit_uses (benefit_id, used_at DESC, use_id DESC);
CREATE INDEX benefit_uses_by_time ON benefit_uses (used_at DESC, use_id DESC);

-- Coupons, one row per coupon owned by one member. `template` is the CouponTemplate snapshot it
-- was issued from. `state` stores ACTIVE or REVOKED only: EXHAUSTED and EXPIRED follow from uses
-- and expires_at when read, so they are never stale.
CREATE TABLE coupons (
    member_id text NOT NULL,
    coupon_id text NOT NULL,
    code text NOT NULL,                         -- normalised: upper case, no separators
    template bytea NOT NULL,
    currency text NOT NULL DEFAULT '',          -- of the template's money fields ('' = any)
    segment_id text NOT NULL DEFAULT '',
    offer_id text NOT NULL DEFAULT '',
    evaluation_run_id text NOT NULL DEFAULT '',
    benefit_id text NOT NULL DEFAULT '',
    state smallint NOT NULL,                    -- loyalty.rewards.v1.CouponState (ACTIVE, REVOKED)
    max_uses integer NOT NULL CHECK (max_uses >= 1),
    uses integer NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    issued_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    request_id text NOT NULL DEFAULT '',
    issued_by text NOT NULL DEFAULT '',
    PRIMARY KEY (member_id, coupon_id)
);
-- One coupon per member per offer, across requests (IssueCoupons skips the member otherwise).
CREATE UNIQUE INDEX coupons_one_per_offer ON coupons (member_id, offer_id) WHERE offer_id <> '';
CREATE INDEX coupons_by_expiry ON coupons (member_id, expires_at, coupon_id);
CREATE INDEX coupons_by_id ON coupons (coupon_id);

-- Codes are unique programme-wide, so they get a table of their own keyed (and, distributed,
-- sharded) by the code: the one global unique key, and the lookup from a typed code to its owner.
CREATE TABLE coupon_codes (
    code text PRIMARY KEY,
    member_id text NOT NULL,
    coupon_id text NOT NULL
);

-- One use of a coupon against one order: reserved then redeemed / released / lapsed, or redeemed
-- at once. A RESERVED row past expires_at has lapsed: it is read as EXPIRED, and stored so by the
-- next call that locks its coupon.
CREATE TABLE coupon_redemptions (
    member_id text NOT NULL,
    coupon_redemption_id text NOT NULL,
    coupon_id text NOT NULL,
    order_id text NOT NULL,
    currency text NOT NULL,
    order_amount_minor bigint NOT NULL,
    discount_minor bigint NOT NULL,
    state smallint NOT NULL,                    -- loyalty.rewards.v1.CouponRedemptionState
    expires_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (member_id, coupon_redemption_id)
);
-- At most one live (reserved or redeemed) use of a coupon per order.
CREATE UNIQUE INDEX coupon_redemptions_live ON coupon_redemptions (member_id, coupon_id, order_id)
    WHERE state IN (1, 2);
CREATE INDEX coupon_redemptions_by_order ON coupon_redemptions (member_id, coupon_id, order_id, created_at DESC);
CREATE INDEX coupon_redemptions_reserved ON coupon_redemptions (member_id, coupon_id) WHERE state = 1;
