-- Browser sessions of the web UI. Signing in with an API token makes one; the cookie holds
-- its random secret, of which only the sha256 is kept (as for tokens). A session dies with
-- its token: revoking the token signs its browsers out.
CREATE TABLE web_sessions (
    secret_sha256  TEXT PRIMARY KEY,
    token_id       TEXT NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    csrf           TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL
) STRICT;
CREATE INDEX web_sessions_token ON web_sessions (token_id);
