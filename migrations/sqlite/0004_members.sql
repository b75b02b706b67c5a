-- The people of a team. A member holds tokens of their own; an owner manages the team's
-- members and may revoke any of its tokens, a member only their own. Tokens without a
-- member (a team's first token, the first-start admin token, tokens made before members
-- existed) are team tokens and act for the team as an owner does.
--
-- Removing a member keeps the row (`removed_at`) so that past jobs and tokens still name
-- who made them, revokes their tokens and so ends their browser sessions; the name is
-- free again for a new member.
CREATE TABLE members (
    id          TEXT PRIMARY KEY,
    team_id     TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('owner', 'member')),
    created_at  INTEGER NOT NULL,
    removed_at  INTEGER
) STRICT;
CREATE UNIQUE INDEX members_team_name ON members (team_id, name) WHERE removed_at IS NULL;

ALTER TABLE api_tokens ADD COLUMN member_id TEXT REFERENCES members (id);
CREATE INDEX api_tokens_member ON api_tokens (member_id);
