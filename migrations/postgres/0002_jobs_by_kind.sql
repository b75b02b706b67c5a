-- Listing a project's jobs of one kind (the OpenAI fine-tuning list, `/v1/models`)
-- without reading its other jobs.
CREATE INDEX jobs_project_kind ON jobs (project_id, kind, seq);
