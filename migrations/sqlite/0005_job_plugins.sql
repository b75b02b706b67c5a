-- The plugins a job runs with, pinned when it is queued: name → sha256 of every plugin
-- the project had then. The worker resolves plugin names through this map, not through
-- the newest upload, so a job (and a retry of it) uses the hashes it was queued with,
-- and a plugin's page can say which jobs ran which of its hashes.
ALTER TABLE jobs ADD COLUMN plugins TEXT NOT NULL DEFAULT '{}';
