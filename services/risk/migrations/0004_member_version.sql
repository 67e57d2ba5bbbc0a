-- Assessments of one member are serialised optimistically: a write names the member version its
-- signals were read at and claims the member only if that version is still current (bumping it),
-- so no lock is held while signals, rules and the model are computed. 0 means never assessed.
ALTER TABLE members ADD COLUMN version bigint NOT NULL DEFAULT 0;
