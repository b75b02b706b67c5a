// Lathe's page script: uploads with a progress bar and drag and drop, and the live job page
// (server-sent events drawn with uPlot). Pages work without it where they can: forms
// submit normally, the job page shows its final state on reload.
"use strict";
(() => {

  // ---- uploads -------------------------------------------------------------------------

  document.querySelectorAll("form[data-upload]").forEach((form) => {
    const bar = form.querySelector("progress");
    const input = form.querySelector("input[type=file]");
    const drop = form.querySelector("[data-drop]");
    if (drop && input) {
      drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
      drop.addEventListener("dragleave", () => drop.classList.remove("over"));
      drop.addEventListener("drop", (e) => {
        e.preventDefault();
        drop.classList.remove("over");
        if (e.dataTransfer.files.length) input.files = e.dataTransfer.files;
      });
    }
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      if (bar) {
        bar.hidden = false;
        xhr.upload.onprogress = (p) => { if (p.lengthComputable) bar.value = (100 * p.loaded) / p.total; };
      }
      xhr.onload = () => {
        if (xhr.status < 400 && xhr.responseURL && xhr.responseURL !== form.action) {
          window.location.assign(xhr.responseURL);
        } else {
          // An error page: show its message in place of this page's content.
          const page = new DOMParser().parseFromString(xhr.responseText, "text/html");
          const main = page.querySelector("main");
          if (main) {
            document.title = page.title;
            document.querySelector("main").replaceWith(main);
          } else {
            alert(`The upload failed (${xhr.status}): ${xhr.responseText.slice(0, 500)}`);
          }
        }
      };
      xhr.onerror = () => alert("The upload failed: the server could not be reached.");
      xhr.send(new FormData(form));
    });
  });

  // ---- the live job page ---------------------------------------------------------------

  const job = document.getElementById("job");
  if (job && job.dataset.events) {
    const charts = new Map(); // series -> {plot, xs, ys}
    const chartBox = document.getElementById("charts");
    const log = document.getElementById("log");
    const progress = document.getElementById("progress");
    let stepStart = null;
    let stepName = null;
    const finishedAtLoad = ["succeeded", "failed", "cancelled"].includes(job.dataset.state);

    const line = (text, cls) => {
      const li = document.createElement("li");
      li.textContent = text;
      if (cls) li.className = cls;
      log.appendChild(li);
      log.scrollTop = log.scrollHeight;
    };

    const plot = (series, x, value) => {
      let c = charts.get(series);
      if (!c) {
        const box = document.createElement("figure");
        box.dataset.series = series;
        chartBox.appendChild(box);
        const opts = {
          title: series,
          width: Math.min(520, chartBox.clientWidth || 520),
          height: 220,
          scales: { x: { time: false } },
          series: [{ label: "step" }, { label: series, stroke: "#0b5cad", width: 2, points: { show: true, size: 4 } }],
        };
        c = { xs: [], ys: [], plot: new uPlot(opts, [[], []], box) };
        charts.set(series, c);
      }
      c.xs.push(x);
      c.ys.push(value);
      c.plot.setData([c.xs, c.ys]);
    };

    const events = new EventSource(job.dataset.events);
    const stateLabel = document.getElementById("job-state");
    const on = (name, f) => events.addEventListener(name, (e) => {
      // The page may have been rendered while the job was still queued.
      if (stateLabel.textContent === "queued") {
        stateLabel.textContent = "running";
        stateLabel.className = "state running";
      }
      f(JSON.parse(e.data));
    });
    on("step_started", (d) => {
      stepName = d.step;
      stepStart = null;
      progress.hidden = false;
      // The bar appears with the step's first progress event; some steps send none.
      document.getElementById("step-progress").hidden = true;
      document.getElementById("step-count").textContent = "";
      document.getElementById("eta").textContent = "";
      document.getElementById("step-title").textContent = d.title;
      line(`▶ ${d.title}`);
    });
    on("step_finished", (d) => line(`✓ ${d.summary}`));
    on("progress", (d) => {
      progress.hidden = false;
      const bar = document.getElementById("step-progress");
      bar.hidden = false;
      bar.max = Math.max(d.total, 1);
      bar.value = d.done;
      document.getElementById("step-count").textContent = `${d.done} / ${d.total} ${d.unit}`;
      const now = performance.now();
      if (stepStart === null || d.step !== stepName) { stepStart = { t: now, done: d.done }; stepName = d.step; }
      const rate = (d.done - stepStart.done) / ((now - stepStart.t) / 1000);
      const eta = document.getElementById("eta");
      if (rate > 0 && d.done < d.total) {
        const s = Math.round((d.total - d.done) / rate);
        eta.textContent = `about ${s >= 60 ? Math.floor(s / 60) + " min " : ""}${s % 60} s left`;
      } else {
        eta.textContent = "";
      }
    });
    on("metric", (d) => plot(d.series, d.x, d.value));
    on("log", (d) => line(d.message, d.level === "warn" ? "warn" : ""));
    on("artifact", (d) => line(`wrote ${d.kind}: ${d.path}`));
    events.addEventListener("end", () => {
      events.close();
      stateLabel.dataset.ended = "true";
      // The page was rendered while the job ran: reload it for the final state and files.
      if (!finishedAtLoad) window.location.reload();
    });
  }
})();
