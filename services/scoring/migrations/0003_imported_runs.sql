-- A run may import its scores from a result set computed off the service (Apache Spark) instead of
-- computing them: the worker reads the directory named here. Empty for runs the service scores.
ALTER TABLE evaluation_runs ADD COLUMN results_uri text NOT NULL DEFAULT '';
