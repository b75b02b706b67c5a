"""The official `openai` package against `lathe serve`: upload a training file, be refused
without an eval suite, create a fine-tuning job on SmolLM2 with a small step cap, follow it
to `succeeded`, read its events and checkpoints, and find the model in /v1/models.

Run by tests/e2e/service.rs with the venv scripts/setup.sh makes:
    python openai_finetune.py BASE_URL TOKEN PROJECT TRAIN_JSONL SUITE_JSON
"""

import json
import sys
import time
import urllib.request

import openai
from openai import OpenAI

base, token, project, train_path, suite_path = sys.argv[1:6]
client = OpenAI(base_url=f"{base}/v1", api_key=token, project=project)

f = client.files.create(file=open(train_path, "rb"), purpose="fine-tune")
assert f.object == "file" and f.purpose == "fine-tune" and f.bytes > 0, f

create = dict(model="smollm2", training_file=f.id, hyperparameters={"n_epochs": 1},
              extra_body={"suite": "invoice-fields", "max_steps": 2, "rank": 8, "learning_rate": 1e-3, "metric_items": 0})
try:
    client.fine_tuning.jobs.create(**create)
    raise SystemExit("a fine-tuning job without an eval suite was accepted")
except openai.BadRequestError as e:
    assert "eval suite" in str(e), e

suite = open(suite_path, "rb").read()
req = urllib.request.Request(f"{base}/api/v1/projects/{project}/suites/invoice-fields", data=suite, method="PUT",
                             headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
urllib.request.urlopen(req).read()

job = client.fine_tuning.jobs.create(**create)
assert job.status == "queued" and job.model == "smollm2", job
deadline = time.time() + 600
while job.status not in ("succeeded", "failed", "cancelled"):
    assert time.time() < deadline, "the job did not finish in 10 minutes"
    time.sleep(1)
    job = client.fine_tuning.jobs.retrieve(job.id)
assert job.status == "succeeded", job.error
assert job.fine_tuned_model and job.fine_tuned_model.startswith("ft:smollm2:"), job

events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
assert events[0].message == "The job has successfully completed", events[0]
losses = [e.data["train_loss"] for e in events if e.type == "metrics"]
assert len(losses) == 2, events

checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
assert checkpoints and checkpoints[0].step_number == 2, checkpoints
assert checkpoints[0].metrics.train_loss is not None, checkpoints[0]

assert client.fine_tuning.jobs.list(limit=5).data[0].id == job.id
assert job.fine_tuned_model in [m.id for m in client.models.list().data]
print(json.dumps({"job": job.id, "fine_tuned_model": job.fine_tuned_model, "events": len(events), "losses": losses}))
