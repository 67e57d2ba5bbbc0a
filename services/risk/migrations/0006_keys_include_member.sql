-- Every key of a per-member table holds member_id, so the schema distributes by member (Citus:
-- distribution column member_id, co-located tables; libs/distribution.py checks the catalogue).
-- Ids generated here (assessment, case, label ids) and the ids other services send (source event,
-- activity ids) stay unique per member, which is what rewards keys them by too.
--
-- member_id is the second column of these keys: the tables are also looked up by their own id
-- alone (GetAssessment, a case or label by id, the outbox relay by row id), and one index then
-- serves both, so an assessment still writes two unique indexes, as before.

ALTER TABLE cases DROP CONSTRAINT cases_assessment_id_fkey;
ALTER TABLE labels DROP CONSTRAINT labels_assessment_id_fkey;

ALTER TABLE assessments DROP CONSTRAINT assessments_pkey;
ALTER TABLE assessments ADD CONSTRAINT assessments_pkey PRIMARY KEY (assessment_id, member_id);
-- Idempotent on (member, source event); the known-assessment read joins on both.
ALTER TABLE assessments DROP CONSTRAINT assessments_source_event_id_key;
ALTER TABLE assessments ADD CONSTRAINT assessments_source_event UNIQUE (source_event_id, member_id);

ALTER TABLE cases DROP CONSTRAINT cases_pkey;
ALTER TABLE cases ADD CONSTRAINT cases_pkey PRIMARY KEY (case_id, member_id);
ALTER TABLE cases DROP CONSTRAINT cases_assessment_id_key;
ALTER TABLE cases ADD CONSTRAINT cases_assessment UNIQUE (assessment_id, member_id);
ALTER TABLE cases ADD CONSTRAINT cases_assessment_fkey
    FOREIGN KEY (assessment_id, member_id) REFERENCES assessments (assessment_id, member_id);

ALTER TABLE labels DROP CONSTRAINT labels_pkey;
ALTER TABLE labels ADD CONSTRAINT labels_pkey PRIMARY KEY (label_id, member_id);
-- seq orders labels (a bigserial, unique by construction); it needs no unique index of its own.
ALTER TABLE labels DROP CONSTRAINT labels_seq_key;
DROP INDEX labels_current;
CREATE UNIQUE INDEX labels_current ON labels (assessment_id, member_id) WHERE NOT superseded;
ALTER TABLE labels ADD CONSTRAINT labels_assessment_fkey
    FOREIGN KEY (assessment_id, member_id) REFERENCES assessments (assessment_id, member_id);

ALTER TABLE activities DROP CONSTRAINT activities_pkey;
ALTER TABLE activities ADD CONSTRAINT activities_pkey PRIMARY KEY (activity_id, member_id);

-- The outbox row of a case outcome lives with the case's member.
ALTER TABLE outbox ADD COLUMN member_id text;
UPDATE outbox o SET member_id = c.member_id FROM cases c WHERE c.case_id = o.case_id;
ALTER TABLE outbox ALTER COLUMN member_id SET NOT NULL;
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE outbox ADD CONSTRAINT outbox_pkey PRIMARY KEY (id, member_id);
