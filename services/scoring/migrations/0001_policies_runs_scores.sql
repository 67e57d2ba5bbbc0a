-- Scoring's schema: versioned tier policies, evaluation runs with their stored scores, and the
-- online tier changes made between runs.
--
-- A member's tier is never kept in a table of its own that every run rewrites (a million upserts
-- a month): it is the member's row in the scores of the latest applied run, unless an online
-- change (member_online_tiers) came after that run.

-- One row per policy version; `body` is the Policy message as created (output-only fields are
-- filled in when read). Versions are immutable: only the life-cycle columns change.
CREATE TABLE policies (
    policy_id text NOT NULL,
    version integer NOT NULL,
    state smallint NOT NULL,                    -- loyalty.scoring.v1.PolicyState
    body bytea NOT NULL,
    created_by text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    activated_by text NOT NULL DEFAULT '',
    activated_at timestamptz,
    retired_at timestamptz,
    fit_id text NOT NULL DEFAULT '',
    feature_catalogue_version text NOT NULL DEFAULT '',
    PRIMARY KEY (policy_id, version)
);
CREATE UNIQUE INDEX policies_one_active ON policies ((true)) WHERE state = 2;
CREATE INDEX policies_created ON policies (created_at DESC, policy_id, version);

-- An evaluation run. `report` holds the computed parts of the EvaluationRun message (counts,
-- migration, thresholds, statistics, distribution, timings); `statistics` the kernel's population
-- statistics as JSON, which online scoring and explanations reuse.
CREATE TABLE evaluation_runs (
    run_id text PRIMARY KEY,
    policy_id text NOT NULL,
    policy_version integer NOT NULL,
    as_of timestamptz NOT NULL,
    dry_run boolean NOT NULL,
    state smallint NOT NULL,                    -- loyalty.scoring.v1.EvaluationState
    stage smallint NOT NULL,                    -- loyalty.scoring.v1.EvaluationStage
    trigger smallint NOT NULL,                  -- loyalty.scoring.v1.EvaluationTrigger
    request_id text NOT NULL DEFAULT '',
    requested_by text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    members_total bigint NOT NULL DEFAULT 0,
    members_scored bigint NOT NULL DEFAULT 0,
    baseline_run_id text NOT NULL DEFAULT '',
    resumed_count integer NOT NULL DEFAULT 0,
    error_reason text NOT NULL DEFAULT '',
    error_message text NOT NULL DEFAULT '',
    tier_changes_total bigint NOT NULL DEFAULT 0,
    tier_changes_applied bigint NOT NULL DEFAULT 0,
    -- Tier changes are sent in member-id order; every change up to this member is acknowledged.
    applied_through text NOT NULL DEFAULT '',
    report bytea,
    statistics text,
    -- The worker holding the run: another worker takes it over once the lease lapses (a crash).
    lease_owner text NOT NULL DEFAULT '',
    lease_until timestamptz
);
-- At most one applied (non-dry) run in flight.
CREATE UNIQUE INDEX evaluation_runs_one_applying ON evaluation_runs ((true)) WHERE NOT dry_run AND state IN (1, 2);
CREATE INDEX evaluation_runs_created ON evaluation_runs (created_at DESC, run_id);
CREATE INDEX evaluation_runs_open ON evaluation_runs (state) WHERE state IN (1, 2);
CREATE INDEX evaluation_runs_policy ON evaluation_runs (policy_id, policy_version, finished_at DESC) WHERE state = 3;

-- Every scored member of a run (COPY-loaded). Tiers are stored by id, so the "previous" tier of a
-- member stays meaningful after the ladder of the active policy changes.
CREATE TABLE evaluation_scores (
    run_id text NOT NULL,
    member_id text NOT NULL,
    score double precision NOT NULL,
    percentile double precision NOT NULL,
    qualifying_tier_id text NOT NULL,
    tier_id text NOT NULL,
    previous_tier_id text NOT NULL,
    change smallint NOT NULL,                   -- loyalty.scoring.v1.TierChange
    held boolean NOT NULL,
    grace_counter smallint NOT NULL,
    grace_remaining smallint NOT NULL,
    qualifying_points bigint NOT NULL,
    PRIMARY KEY (run_id, member_id)
);

-- Online tier changes (ScoreMember) since a member's last applied run. `base_tier_id` is the tier
-- of that run: a refund re-check never goes below it.
CREATE TABLE member_online_tiers (
    member_id text PRIMARY KEY,
    tier_id text NOT NULL,
    base_tier_id text NOT NULL,
    base_run_id text NOT NULL,
    score double precision NOT NULL,
    percentile double precision NOT NULL,
    qualifying_tier_id text NOT NULL,
    policy_id text NOT NULL,
    policy_version integer NOT NULL,
    trigger_event_id text NOT NULL DEFAULT '',
    change_id text NOT NULL,
    changed_at timestamptz NOT NULL
);
