-- What a job needs of the worker that runs it: a device kind (`cpu`, `cuda`, `wgpu`; NULL
-- for any) and memory in MiB (0 for any). A worker claims only the jobs that fit it.
ALTER TABLE jobs ADD COLUMN needs_device TEXT;
ALTER TABLE jobs ADD COLUMN needs_memory_mb INTEGER NOT NULL DEFAULT 0;

-- The workers that share this database, as each last announced itself: what it can run
-- (device kind, memory, job kinds as a JSON array, empty for all) and when it was last
-- seen. A worker announces itself when it starts and each time it looks for work.
CREATE TABLE workers (
    id          TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    device      TEXT NOT NULL,
    memory_mb   INTEGER NOT NULL,
    kinds       TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL
) STRICT;
