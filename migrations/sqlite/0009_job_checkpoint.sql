-- The sha256 of the manifest of a running job's latest checkpoint in the artifact store
-- (the files of its run folder that a resume needs), written by the worker that holds the
-- lease once the checkpoint is stored. A worker that claims the job again on another
-- machine restores the run folder from it. NULL: nothing stored (or a local artifact store).
ALTER TABLE jobs ADD COLUMN checkpoint TEXT;
