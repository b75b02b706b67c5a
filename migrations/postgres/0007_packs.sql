-- Eval packs. `packs` is a team's catalogue of uploaded packs (the packs that ship with
-- Lathe are built by the binary and not stored); the bytes are the artifact `sha256`, the
-- pack's identity. A name and version name one pack forever: versions are immutable.
CREATE TABLE packs (
    team_id     TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    sha256      TEXT NOT NULL,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (team_id, sha256),
    UNIQUE (team_id, name, version)
);

-- Every install of a pack into a project; the newest row of a name is what the project has.
-- `installed` records what the install made: dataset versions and refs, suites, plugin pins.
CREATE TABLE project_packs (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id  TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    installed   JSONB NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX project_packs_name ON project_packs (project_id, name, seq);
