"""The web UI in a real browser: Debian's headless Chromium driven by Playwright for Python
(pointed at /usr/bin/chromium; no browser is ever downloaded).

One team's journey through the whole workflow, then what must not work: another team's
session sees none of it, a form without its CSRF token is refused, and no page asks any
host but the server for anything. One form is completed with the keyboard alone. A
screenshot of every page lands in SHOTS (the README's tour uses them).

Run by tests/e2e/web.rs with the venv scripts/setup.sh makes:
    python web_journey.py BASE_URL ADMIN_TOKEN OTHER_TEAM_TOKEN DATA_JSONL PLUGIN_WASM SHOTS
"""

import json
import os
import re
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request

from playwright.sync_api import expect, sync_playwright

base, token, other_token, data_path, wasm_path, shots = sys.argv[1:7]
CHROMIUM = os.environ.get("LATHE_CHROMIUM", "/usr/bin/chromium")
LONG = 600_000  # ms: a job on SmolLM2 on two cores
os.makedirs(shots, exist_ok=True)
CURRENT = []  # the page being driven, for a screenshot when a step fails

def signed_in(browser, token):
    """A new browser context signed in with a token, and its page."""
    ctx = browser.new_context()
    page = ctx.new_page()
    CURRENT.append(page)
    page.goto(f"{base}/login")
    page.fill("input[name=token]", token)
    with page.expect_navigation():
        page.click("button:has-text('Sign in')")
    return ctx, page

def main(p):
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    CURRENT.append(page)
    page.set_default_timeout(30_000)
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def shot(name):
        page.screenshot(path=os.path.join(shots, f"{name}.png"), full_page=True)

    def submit(form):
        """Submits a form and waits for the page it leads to."""
        with page.expect_navigation():
            page.locator(f"{form} button").last.click()

    def wait_for_job(timeout=LONG):
        """On a job page: waits until the job has succeeded (the page reloads itself when
        its event stream ends) and returns the job id."""
        expect(page.locator("#job-state")).to_have_text(re.compile("succeeded|failed|cancelled"), timeout=timeout)
        state = page.locator("#job-state").inner_text()
        assert state == "succeeded", f"{page.url}: {state}: {page.locator('.error').all_inner_texts()}"
        return page.url.rstrip("/").split("/")[-1]

    # ---- sign in ----------------------------------------------------------------------
    page.goto(f"{base}/projects")
    assert "/login" in page.url, page.url
    shot("login")
    page.fill("input[name=token]", "lathe_nope_nope")
    page.click("button:has-text('Sign in')")
    expect(page.locator(".error")).to_contain_text("not valid")
    page.fill("input[name=token]", token)
    with page.expect_navigation():
        page.click("button:has-text('Sign in')")
    assert page.url.endswith("/projects"), page.url

    # ---- a project --------------------------------------------------------------------
    page.fill("input[name=name]", "invoices")
    page.fill("input[name=description]", "structured invoice extraction")
    submit("form[action='/projects']")
    project = page.url.rstrip("/").split("/")[-1]
    assert project.startswith("proj_"), page.url
    expect(page.locator(".checklist li").first).to_contain_text("eval suite")

    # ---- a plugin uploaded from plugins/, tried on a sample -------------------------------
    page.click("nav >> text=Plugins")
    # A file that is no component is refused with the sandbox's own words.
    junk = os.path.join(shots, "junk.wasm")
    with open(junk, "wb") as f:
        f.write(b"\0asm definitely not a component")
    page.set_input_files("#upload-plugin input[type=file]", junk)
    page.click("#upload-plugin button")
    expect(page.locator(".error")).to_contain_text("plugin refused")
    os.remove(junk)
    page.goto(f"{base}/projects/{project}/plugins")
    expect(page.locator("main")).to_contain_text("None uploaded yet")
    page.set_input_files("#upload-plugin input[type=file]", wasm_path)
    with page.expect_navigation():
        page.click("#upload-plugin button")
    expect(page.locator("h1")).to_contain_text("json-field-match")
    plugin_page = page.url.split(f"/projects/{project}")[1]
    page.fill("#try textarea[name=input]", json.dumps({"prediction": '{"total": 12.5, "currency": "EUR"}', "reference": '{"total": 12.5, "currency": "USD"}'}))
    page.click("#try button")
    expect(page.locator("#try-result pre")).to_contain_text("score")
    shot("plugin")

    # ---- data: upload, curate, split ------------------------------------------------------
    page.click("nav >> text=Datasets")
    page.set_input_files("#upload-dataset input[type=file]", data_path)
    with page.expect_navigation():
        page.click("#upload-dataset button")
    # Nothing is imported before the detected format has been shown.
    expect(page.locator(".notice")).to_contain_text("openai_chat")
    import_page = page.url.split(f"/projects/{project}")[1]
    shot("import")
    page.fill("#import input[name=name]", "invoices")
    submit("#import")
    wait_for_job()
    page.click("nav >> text=Datasets")
    page.click("table a >> nth=0")
    expect(page.locator("article.example").first).to_be_visible()
    page.fill("#curate input[name=name]", "invoices.clean")
    submit("#curate")
    wait_for_job()
    # The curation report: what was dropped and redacted, each row linked.
    expect(page.locator("#curation")).to_contain_text("2 exact duplicates dropped")
    expect(page.locator("#curation")).to_contain_text("1 examples with PII")
    shot("curation")
    page.goto(f"{base}/projects/{project}/datasets/invoices.clean")
    # The import heads the lineage (curation that changed nothing adds no version).
    expect(page.locator(".lineage li").last).to_contain_text("import")
    shot("dataset")
    page.select_option("#stats select[name=model]", index=1)
    submit("#stats")
    wait_for_job()
    expect(page.locator("#length-histogram")).to_be_visible()
    assert page.locator("#length-histogram rect").count() > 1
    expect(page.locator("main")).to_contain_text("total (tokens)")
    expect(page.locator("#context-fit")).to_contain_text("fits the model's context")
    shot("stats")
    page.goto(f"{base}/projects/{project}/datasets/invoices.clean")
    page.fill("#split input[name=name]", "invoices")
    page.fill("#split input[name=heldout]", "0.2")
    submit("#split")
    wait_for_job()
    page.click("nav >> text=Datasets")
    # One import, and every later version drawn with an edge from its parent.
    expect(page.locator("#lineage-graph")).to_contain_text("invoices.heldout")
    nodes, edges = page.locator("#lineage-graph circle").count(), page.locator("#lineage-graph path").count()
    assert nodes >= 4 and edges == nodes - 1, (nodes, edges)
    shot("datasets")

    # ---- the eval suite, with a live preview on a real example ------------------------------
    page.click("nav >> text=Eval suites")
    page.fill("#suite-form input[name=name]", "invoice-fields")
    page.fill("#suite-form textarea[name=user]", "Extract vendor, invoice_number, date, total and currency as one JSON object.\n\n{{ input }}")
    heldout = page.locator("#suite-form select[name=version] option", has_text="invoices.heldout").get_attribute("value")
    page.select_option("#suite-form select[name=version]", value=heldout)
    expect(page.locator("#preview .msg.user pre")).to_contain_text("Extract vendor")
    page.uncheck("#suite-form input[name=scorer] >> nth=0")
    page.check("#suite-form input[name=scorer][value=json-field-match]")
    page.fill("#suite-form input[name=gate_metric]", "json-field-match")
    page.fill("#suite-form input[name=gate_min]", "0.8")
    page.fill("#suite-form input[name=shots]", "0")
    page.fill("#suite-form input[name=max_tokens]", "80")
    shot("suites")
    submit("#suite-form")
    expect(page.locator("details#suite-invoice-fields")).to_be_visible()

    # ---- baseline, a pilot fine-tune with its live curve, evaluation, the verdict ------------
    page.click("nav >> text=Jobs")
    page.fill("#baseline input[name=limit]", "6")
    submit("#baseline")
    wait_for_job()

    page.click("nav >> text=Jobs")
    assert page.input_value("#train input[name='settings.rank']") == "16"
    assert float(page.input_value("#train input[name='settings.alpha']")) == 32
    page.fill("#train input[name='settings.rank']", "8")
    page.fill("#train input[name='settings.max_steps']", "10")
    page.fill("#train input[name='settings.learning_rate']", "0.001")
    page.click("#train summary")
    page.fill("#train input[name='settings.metric_items']", "0")
    page.fill("#train input[name='settings.eval_every']", "5")
    shot("jobs")
    submit("#train")
    # The loss curve is drawn while the job runs, from its event stream.
    expect(page.locator("#charts figure[data-series='train/loss'] canvas")).to_be_visible(timeout=LONG)
    shot("train-live")
    train_job = wait_for_job()
    expect(page.locator("#charts figure[data-series='train/loss']")).to_be_visible()
    with page.expect_download() as dl:
        page.click("text=adapter_model.safetensors")
    adapter = dl.value.path()
    with open(adapter, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    assert any("lora_A" in k for k in header), list(header)[:5]
    shot("train-done")

    page.click("nav >> text=Jobs")
    page.fill("#eval input[name=limit]", "6")
    submit("#eval")
    wait_for_job()
    page.click("nav >> text=Jobs")
    submit("#report")
    report_job = wait_for_job()
    page.click("#read-report")
    expect(page.locator("#verdict")).to_contain_text(re.compile(r"Verdict: (better|worse|no difference)"))
    # The regression pack ran with the report (the form's default): forgetting, task by task.
    expect(page.locator("#forgetting + .verdict")).to_contain_text("Forgetting:")
    assert page.locator("#forgetting ~ table tbody tr").count() >= 3
    expect(page.locator("table").first).to_contain_text("baseline")
    # The pilot changes some of the six items, and each filter shows only its own.
    changed = page.locator("article.diff").count()
    assert changed > 0, "the fine-tune changed no item: the filters would be untested"
    for show in ("worse", "better"):
        page.click(f".filters a[href^='?show={show}']")
        expect(page.locator(".filters a[aria-current]")).to_contain_text(show)
        assert page.locator(f"article.diff:not(.{show})").count() == 0
    shot("report")

    page.click("nav >> text=Models")
    model = page.locator(f"#model-{train_job}")
    expect(model).to_contain_text(re.compile(r"sha256 [0-9a-f]{12}"))  # the base model's, recorded by the run
    expect(model).to_contain_text("invoice-fields")
    shot("models")

    # ---- deploy behind an alias, ask it in the playground, roll back ----------------------
    # The eval above ran six items, not the whole held-out set: the gate refuses, force deploys.
    deploy = f"#model-{train_job} form.deploy"
    page.fill(f"{deploy} input[name=name]", "prod")
    submit(deploy)
    expect(page.locator("#deploy-error")).to_contain_text("has not passed its suite's gate")
    page.fill(f"{deploy} input[name=name]", "prod")
    page.check(f"{deploy} input[name=force]")
    submit(deploy)
    expect(page.locator("#deployment-prod .serves")).to_contain_text(f"adapter {train_job}")
    expect(page.locator("#deployment-prod .serves")).to_contain_text("forced")
    page.select_option("#playground-form select[name=model]", "invoices/prod")
    page.fill("#playground-form textarea[name=message]", "Invoice INV-7 from Acme Corp, total 12.50 EUR, due 2026-01-31. Extract it as JSON.")
    schema = {"type": "object", "properties": {"invoice": {"type": "string", "maxLength": 12}, "total": {"type": "number"},
                                               "currency": {"enum": ["EUR", "USD"]}},
              "required": ["invoice", "total", "currency"], "additionalProperties": False}
    page.fill("#playground-form textarea[name=schema]", json.dumps(schema))
    page.fill("#playground-form input[name=max_tokens]", "60")
    page.click("#playground-form button")
    expect(page.locator("#playground-answer")).to_be_visible(timeout=LONG)
    answer = json.loads(page.locator("#playground-answer").inner_text())
    assert set(answer) == {"invoice", "total", "currency"} and answer["currency"] in ("EUR", "USD"), answer
    shot("playground")
    # A schema that is not JSON is named, and nothing is asked.
    page.fill("#playground-form textarea[name=schema]", "{not json")
    page.click("#playground-form button")
    expect(page.locator("#playground-error")).to_contain_text("not JSON")
    # The base model as version 2, then one click back to the adapter.
    page.fill("#deploy-base input[name=name]", "prod")
    submit("#deploy-base")
    expect(page.locator("#deployment-prod .serves")).to_contain_text("the base model")
    submit("#deployment-prod form")
    expect(page.locator("#deployment-prod .serves")).to_contain_text(f"adapter {train_job}")
    expect(page.locator("#deployment-prod table.history tbody tr").first).to_contain_text("rollback")
    shot("deployments")

    page.click(f"a[href='/projects/{project}']")
    for step in page.locator(".checklist li").all()[:6]:
        expect(step).to_have_class(re.compile("done"))
    shot("workflow")

    # ---- project settings: lathe.toml, checked before it is saved ------------------------
    page.click("nav[aria-label=project] a:has-text('Project settings')")
    page.fill("#project-settings textarea", "[train]\nepoks = 4\n")
    submit("#project-settings")
    expect(page.locator("#settings-error")).to_contain_text("epoks")
    assert page.input_value("#project-settings textarea") == "[train]\nepoks = 4\n", "the refused text stays"
    page.fill("#project-settings textarea", "[train]\nepochs = 4\n")
    submit("#project-settings")
    expect(page.locator("#resolved")).to_contain_text('"epochs": 4')
    shot("project-settings")

    # ---- settings: a token shown once, a member with their first token -------------------
    page.goto(f"{base}/settings")
    page.fill("form[action='/settings/tokens'] input[name=name]", "ci")
    submit("form[action='/settings/tokens']")
    expect(page.locator("#new-token")).to_contain_text("lathe_")
    page.fill("#add-member input[name=name]", "Ana")
    submit("#add-member")
    expect(page.locator(".notice")).to_contain_text("Ana is a member now")
    ana_token = page.locator("#new-token").inner_text().strip()
    expect(page.locator("#members tr[data-member='Ana']")).to_contain_text("1 active")
    shot("settings")
    # Ana signs in elsewhere: she works in the projects but cannot manage the team.
    ana, ap = signed_in(browser, ana_token)
    expect(ap.locator("main")).to_contain_text("invoices")
    ap.goto(f"{base}/settings")
    expect(ap.locator("main")).to_contain_text("Only the team's owners add or remove members")
    assert ap.locator("#add-member").count() == 0
    CURRENT.pop()
    ana.close()
    # Removing her signs her out.
    with page.expect_navigation():
        page.locator("#members tr[data-member='Ana'] button:has-text('Remove')").click()
    expect(page.locator("#members")).not_to_contain_text("Ana")

    # ---- an eval pack from the catalogue, installed into a new project --------------------
    page.goto(f"{base}/projects")
    page.fill("input[name=name]", "triage")
    submit("form[action='/projects']")
    triage = page.url.rstrip("/").split("/")[-1]
    page.click("nav >> text=Eval packs")
    card = page.locator("article.pack[data-pack='support-triage']")
    expect(card).to_contain_text("network: none")
    expect(card).to_contain_text("classification")
    grounded = page.locator("article.pack[data-pack='grounded-qa']")
    expect(grounded).to_contain_text("structured output")
    expect(grounded).to_contain_text(re.compile(r"judge verdicts: [1-9][0-9]* cached"))
    with page.expect_navigation():
        card.locator("button").click()
    expect(page.locator("#installed-support-triage")).to_contain_text("packs/support-triage/heldout")
    expect(page.locator("article.pack[data-pack='support-triage']")).to_contain_text("Installed in this project")
    shot("packs")
    page.click("#installed-support-triage a:has-text('triage')")
    expect(page.locator("#suite-triage")).to_contain_text("sha256")

    # ---- one form with the keyboard alone -------------------------------------------------
    page.goto(f"{base}/projects")
    shot("projects")
    for _ in range(30):
        if page.evaluate("document.activeElement && document.activeElement.name") == "name":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.name") == "name", "Tab never reached the project name"
    page.keyboard.type("keyboard-only")
    page.keyboard.press("Tab")
    page.keyboard.type("made without a mouse")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("keyboard-only")

    # ---- a form without its CSRF token is refused ----------------------------------------
    for form in ({"name": "forged"}, {"name": "forged", "csrf": "not-the-token"}):
        r = ctx.request.post(f"{base}/projects", form=form, max_redirects=0)
        assert r.status == 403, (form, r.status, r.text()[:200])
    page.goto(f"{base}/projects")
    expect(page.locator("main")).not_to_contain_text("forged")

    # ---- no page asked another host for anything ----------------------------------------------
    foreign = [u for u in requested if not (u.startswith(base) or u.startswith("data:") or u.startswith("about:"))]
    assert not foreign, foreign
    assert not errors, errors

    # ---- another team sees none of it ---------------------------------------------------
    other, op = signed_in(browser, other_token)
    assert "invoices" not in op.locator("main").inner_text()
    for path in ["", "/datasets", "/datasets/invoices", "/plugins", "/suites", "/packs", "/jobs", "/jobs/table", "/models", f"/jobs/{train_job}",
                 f"/jobs/{train_job}/artifacts/adapter_model.safetensors", f"/jobs/{train_job}/events"]:
        r = op.request.get(f"{base}/projects/{project}{path}")
        assert r.status == 404, (path, r.status)
    for path in [import_page, plugin_page, f"/jobs/{report_job}/report"]:
        r = op.request.get(f"{base}/projects/{project}{path}")
        assert r.status == 404, (path, r.status)
    # Writes too, with the other team's own valid CSRF token: the project is not theirs.
    op.goto(f"{base}/projects")
    theirs = op.locator("input[name=csrf]").first.get_attribute("value")
    for path in [import_page, f"{plugin_page}/try", "/suites", "/suites/preview", "/packs", "/jobs", f"/jobs/{train_job}/cancel",
                 "/deployments", "/deployments/prod/rollback", "/playground"]:
        r = op.request.post(f"{base}/projects/{project}{path}", form={"csrf": theirs, "input": "{}", "kind": "data_stats", "version": "invoices"}, max_redirects=0)
        assert r.status == 404, (path, r.status)
    for path in ["/datasets", "/plugins", "/packs/upload"]:
        r = op.request.post(f"{base}/projects/{project}{path}", multipart={"csrf": theirs, "file": {"name": "x.jsonl", "mimeType": "text/plain", "buffer": b"{}"}}, max_redirects=0)
        assert r.status == 404, (path, r.status)
    other.close()
    browser.close()

    return project, train_job, requested

with sync_playwright() as pw:
    try:
        project, train_job, requested = main(pw)
    except Exception:
        # What the browser showed when it failed, for the test's output.
        if CURRENT:
            page = CURRENT[-1]
            page.screenshot(path=os.path.join(shots, "failure.png"), full_page=True)
            print(f"failed on {page.url}:\n{page.locator('body').inner_text()[:3000]}", file=sys.stderr)
        raise
print(json.dumps({"project": project, "train_job": train_job, "requests": len(requested)}))
