-- StreamFeatures' category vocabulary (every distinct category, in code-point order) walks this
-- index as a loose index scan: one probe per category instead of reading every member's rows. It
-- costs one more index entry only when a member meets a category for the first time (updates of a
-- row never change its category).
CREATE INDEX member_categories_category ON member_categories (category COLLATE "C");
