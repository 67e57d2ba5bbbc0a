-- The accounts merged into a member, found by index: GetBalance sums the qualifying points of the
-- member's whole merge chain, and following the chain read every account once per step without
-- it. Only merged accounts have an entry, so crediting a new member does not write this index.
CREATE INDEX accounts_merged_into ON accounts (merged_into) WHERE merged_into IS NOT NULL;
