-- Deploy aliases (`project/name` in the inference API) and their history. Every deploy
-- and every rollback appends a row; the row with the highest `seq` of a name is what it
-- serves. `replaces` is the row a deploy took over from, so a rollback serves that row's
-- target again, and a second rollback goes one further back.
CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    seq BIGINT NOT NULL,
    -- The base model's configured name, and the training job whose adapter runs over it
    -- (NULL: the base model alone).
    model TEXT NOT NULL,
    job_id TEXT REFERENCES jobs(id),
    -- The eval run whose gate the version passed on the held-out set; NULL when forced.
    eval_job_id TEXT REFERENCES jobs(id),
    forced BOOLEAN NOT NULL DEFAULT FALSE,
    -- `deploy` or `rollback`.
    action TEXT NOT NULL,
    replaces TEXT REFERENCES deployments(id),
    created_at BIGINT NOT NULL,
    created_by TEXT,
    UNIQUE (project_id, name, seq)
);
