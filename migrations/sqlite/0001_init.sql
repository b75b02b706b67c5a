-- Lathe's metadata and job table, SQLite flavour. The PostgreSQL twin in
-- ../postgres/0001_init.sql has the same tables, columns and meanings; only the types differ.
-- Timestamps are unix milliseconds (INTEGER); JSON documents are TEXT.
-- Tables are STRICT so that a wrongly typed write fails instead of being stored as is.

CREATE TABLE teams (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) STRICT;

-- A token is `lathe_<id>_<secret>`; only the sha256 of the secret is kept.
CREATE TABLE api_tokens (
    id             TEXT PRIMARY KEY,
    team_id        TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    secret_sha256  TEXT NOT NULL,
    admin          INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    last_used_at   INTEGER,
    revoked_at     INTEGER
) STRICT;
CREATE INDEX api_tokens_team ON api_tokens (team_id);

CREATE TABLE projects (
    id           TEXT PRIMARY KEY,
    team_id      TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    UNIQUE (team_id, name)
) STRICT;

-- Uploaded files (OpenAI files API, dataset uploads): metadata; the bytes are the artifact
-- `sha256`. `seq` is the upload order.
CREATE TABLE files (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    project_id  TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX files_project ON files (project_id, seq);

-- Plugins uploaded to a project; `seq` orders versions of one name (newest = highest).
CREATE TABLE plugins (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id     TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    kind           TEXT NOT NULL,
    version        TEXT NOT NULL,
    sha256         TEXT NOT NULL,
    size           INTEGER NOT NULL,
    config_schema  TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    UNIQUE (project_id, sha256)
) STRICT;
CREATE INDEX plugins_name ON plugins (project_id, name, seq);

-- Every put of a suite is a new version; old versions stay for the runs that used them.
CREATE TABLE eval_suites (
    project_id  TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    definition  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (project_id, name, version)
) STRICT;

-- The job table. `seq` is the queue order (FIFO within a priority) and the listing cursor.
-- A claim bumps `lease_token`; every write a worker makes through its lease names the token
-- it holds, so a worker whose lease was reaped and re-claimed is fenced out.
-- `event_seq` is the last sequence number handed out in job_events for this job.
CREATE TABLE jobs (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    project_id        TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    kind              TEXT NOT NULL,
    spec              TEXT NOT NULL,
    state             TEXT NOT NULL
                      CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority          INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL CHECK (max_attempts >= 1),
    worker            TEXT,
    lease_token       INTEGER NOT NULL DEFAULT 0,
    lease_expires_at  INTEGER,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    error             TEXT,
    outcome           TEXT,
    event_seq         INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER
) STRICT;
CREATE INDEX jobs_queued ON jobs (priority DESC, seq) WHERE state = 'queued';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_project ON jobs (project_id, seq);

CREATE TABLE job_events (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    data        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (job_id, seq)
) STRICT;
