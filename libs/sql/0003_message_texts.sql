-- Shared by every service schema: operators' overrides of member-facing texts (libs/messages.py).
-- The shipped wording lives with the service's code (messages.yaml); a row here replaces it for
-- one key and language until cleared. Services without member-facing texts leave it empty. On
-- distributed PostgreSQL a reference table: tiny and read by every node.
CREATE TABLE message_texts (
    key text NOT NULL,
    language_tag text NOT NULL,
    template text NOT NULL,
    updated_at timestamptz NOT NULL,
    updated_by text NOT NULL,
    PRIMARY KEY (key, language_tag)
);
