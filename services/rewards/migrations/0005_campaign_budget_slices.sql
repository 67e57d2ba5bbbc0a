-- A campaign's budget is split into one allowance per shard (docs/scale.md, "Campaign budgets"),
-- so a credit with a campaign bonus writes only its own shard: the slice of the shard its member
-- lives in. member_id of a slice is the shard's anchor (libs.distribution.shard_anchor), a key
-- that lives in that shard, so the slice is co-located with the members it serves.
--
-- A slice spends its allowance under its own row lock; when a credit finds its slice short, a
-- separate short transaction tops it up from the campaign's global row (campaign_budgets), taking
-- back other slices' unused allowance when the rest of the budget is out: every point of the
-- budget stays reachable, and none is spent twice.
CREATE TABLE campaign_budget_slices (
    member_id text NOT NULL,
    campaign_id text NOT NULL,
    -- Points handed to this slice, and awarded from it (less what voided holds gave back).
    allowance bigint NOT NULL DEFAULT 0,
    awarded bigint NOT NULL DEFAULT 0,
    -- The campaign budget the allowance was handed out under: a slice whose budget differs from the
    -- active rules' spends nothing until the top-up has re-divided the new budget.
    budget_points bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (member_id, campaign_id),
    CONSTRAINT campaign_budget_slices_within_allowance CHECK (awarded <= allowance)
);

-- The global row now counts what is out in slices (allocated = the sum of their allowances) and
-- the budget they were divided under; points_awarded keeps what was awarded before the split.
-- Used = points_awarded + the slices' awarded; committed = points_awarded + allocated <= budget.
ALTER TABLE campaign_budgets
    ADD COLUMN allocated bigint NOT NULL DEFAULT 0,
    ADD COLUMN budget_points bigint NOT NULL DEFAULT 0;
