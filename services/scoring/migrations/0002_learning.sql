-- What scoring learns: weight fits, segmentations with their members, and trained models.
--
-- Messages are stored whole (`body`, the protobuf as answered) beside the columns that are
-- searched or change; a model's fitted arrays are an np.savez archive, read back with
-- allow_pickle=False (never pickle: a stored model must not be able to run code).

-- One FitWeights result. The proposed policy is a DRAFT version in `policies` (its fit_id).
CREATE TABLE weight_fits (
    fit_id text PRIMARY KEY,
    base_policy_id text NOT NULL,
    base_policy_version integer NOT NULL,
    proposed_policy_id text NOT NULL,
    proposed_policy_version integer NOT NULL,
    body bytea NOT NULL,                        -- loyalty.scoring.v1.WeightFit
    created_at timestamptz NOT NULL
);

-- A stored (non-dry) segmentation; at most one is current.
CREATE TABLE segmentations (
    segmentation_id text PRIMARY KEY,
    current boolean NOT NULL,
    body bytea NOT NULL,                        -- loyalty.scoring.v1.Segmentation, `current` cleared
    created_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX segmentations_one_current ON segmentations ((true)) WHERE current;

CREATE TABLE segments (
    segmentation_id text NOT NULL REFERENCES segmentations ON DELETE CASCADE,
    segment_index smallint NOT NULL,
    body bytea NOT NULL,                        -- loyalty.scoring.v1.Segment
    PRIMARY KEY (segmentation_id, segment_index)
);

-- Every segmented member (COPY-loaded): looked up by member, and listed per segment in id order.
CREATE TABLE segment_members (
    segmentation_id text NOT NULL,
    member_id text NOT NULL,
    segment_index smallint NOT NULL,
    distance double precision NOT NULL,
    pca_x double precision NOT NULL,
    pca_y double precision NOT NULL,
    PRIMARY KEY (segmentation_id, member_id)
);
CREATE INDEX segment_members_by_segment ON segment_members (segmentation_id, segment_index, member_id);

-- A trained model; the newest of each kind is `latest` (the one used when a request names none).
CREATE TABLE models (
    model_id text PRIMARY KEY,
    kind smallint NOT NULL,                     -- loyalty.scoring.v1.ModelKind
    latest boolean NOT NULL,
    body bytea NOT NULL,                        -- loyalty.scoring.v1.Model, `latest` cleared
    arrays bytea NOT NULL,                      -- np.savez archive of the fitted arrays
    created_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX models_one_latest ON models (kind) WHERE latest;
CREATE INDEX models_created ON models (created_at DESC, model_id DESC);
