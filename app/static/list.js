// The job list (/): newest first, a state filter, "load more" through the API's cursor, refreshed every few
// seconds. ?state=running and ?limit=N (page size, 1-100) in the page's URL preset the filter and the page size.

import {
  AuthError,
  TERMINAL,
  api,
  badge,
  fmtDuration,
  fmtPerplexity,
  fmtRatio,
  fmtTime,
  h,
  hideNotice,
  progressBar,
  setupKeyForm,
  showNotice,
} from "./common.js";

const REFRESH_MS = 3000;
const STAGES = {
  load: "loading the model",
  calibrate: "preparing calibration data",
  evaluate_dense: "dense perplexity",
  prune: "pruning",
  evaluate_pruned: "pruned perplexity",
  measure_speed: "measuring speed",
  save: "saving",
  done: "finishing",
};

const params = new URLSearchParams(location.search);
const pageSize = Math.min(100, Math.max(1, Number.parseInt(params.get("limit") ?? "", 10) || 20));
const filter = document.getElementById("state-filter");
const rowsBody = document.getElementById("job-rows");
const table = document.getElementById("jobs");
const empty = document.getElementById("empty");
const loadMore = document.getElementById("load-more");
const notice = document.getElementById("notice");
const updated = document.getElementById("updated");

filter.value = params.get("state") ?? "";
let wanted = pageSize; // rows the user asked for: one page, plus one per "load more"
let cursor = null; // next_after of the last page shown
let jobs = [];
const rendered = new Map(); // job id -> {row, signature}
let timer = null;
let generation = 0; // a filter change makes older answers stale

function query(limit, after) {
  const q = new URLSearchParams({ limit: String(limit) });
  if (filter.value) q.set("state", filter.value);
  if (after) q.set("after", after);
  return `/v1/jobs?${q}`;
}

function model(spec) {
  const name = spec.model;
  const short = name.replace(/\/+$/, "").split("/").pop() || name;
  return h("span", { class: "model", title: name }, h("span", { class: "model-name" }, short), h("span", { class: "model-path muted" }, name));
}

function progressCell(job) {
  const p = job.progress;
  if (job.state === "queued") return h("span", { class: "muted" }, job.attempts > 0 ? "requeued, waiting for a worker" : "waiting for a worker");
  if (job.state === "running") {
    const parts = [];
    const stage = STAGES[p?.stage] ?? "starting";
    if (p?.blocks) {
      parts.push(
        h("span", { class: "block-count" }, `block ${p.block ?? 0}/${p.blocks}`),
        progressBar(p.block ?? 0, p.blocks, `Blocks pruned of job ${job.id}`),
      );
      if (p.eta_seconds !== null && p.eta_seconds !== undefined && p.stage === "prune") {
        parts.push(h("span", { class: "muted" }, `~${fmtDuration(p.eta_seconds)} left`));
      }
    }
    if (!p?.blocks || p.stage !== "prune") parts.unshift(h("span", {}, stage));
    if (job.cancel_requested) parts.push(h("span", { class: "warn" }, "cancelling…"));
    return h("span", { class: "progress-cell" }, parts);
  }
  if (job.state === "succeeded") return h("span", { class: "muted" }, `done in ${fmtDuration(job.result?.total_seconds)}`);
  const message = job.error?.message ?? job.state;
  return h("span", { class: "error-text", title: message }, message);
}

function perplexityCell(job) {
  const r = job.result;
  if (job.state !== "succeeded" || !r) return h("span", { class: "muted" }, "–");
  if (r.perplexity_pruned === null) return h("span", { class: "muted" }, "not evaluated");
  const ratio = r.perplexity_dense ? r.perplexity_pruned / r.perplexity_dense : null;
  return h(
    "span",
    { class: "ppl" },
    h("span", { class: "ppl-dense", title: r.perplexity_dense_cached_from ? `dense: cached from ${r.perplexity_dense_cached_from}` : null }, fmtPerplexity(r.perplexity_dense)),
    r.perplexity_dense_cached_from ? h("span", { class: "muted small ppl-cached" }, " (cached)") : null,
    " → ",
    h("strong", { class: "ppl-pruned" }, fmtPerplexity(r.perplexity_pruned)),
    ratio ? h("div", { class: "muted small" }, `${fmtRatio(ratio, 2)} the dense perplexity`) : null,
  );
}

function cell(label, ...children) {
  return h("td", { "data-label": label }, h("div", { class: "cell" }, ...children)); // one child: the mobile grid
}

function row(job) {
  const link = h("a", { href: `/jobs/${encodeURIComponent(job.id)}`, class: "job-id" }, job.id);
  return h(
    "tr",
    { "data-job-id": job.id, "data-state": job.state },
    cell("Job", link, h("div", { class: "muted small" }, fmtTime(job.created_at))),
    cell("Model", model(job.spec)),
    cell("Method", `${job.spec.method} · ${job.spec.pattern}`),
    cell("State", badge(job.state), job.attempts > 1 ? h("div", { class: "muted small" }, `attempt ${job.attempts}`) : null),
    cell("Progress", progressCell(job)),
    cell("Perplexity", perplexityCell(job)),
  );
}

function render() {
  const seen = new Set();
  let previous = null;
  for (const job of jobs) {
    seen.add(job.id);
    const signature = JSON.stringify(job);
    let entry = rendered.get(job.id);
    if (!entry || entry.signature !== signature) {
      const fresh = row(job);
      if (entry) entry.row.replaceWith(fresh);
      entry = { row: fresh, signature };
      rendered.set(job.id, entry);
    }
    const expected = previous ? previous.nextSibling : rowsBody.firstChild;
    if (expected !== entry.row) rowsBody.insertBefore(entry.row, expected);
    previous = entry.row;
  }
  for (const [id, entry] of rendered) {
    if (!seen.has(id)) {
      entry.row.remove();
      rendered.delete(id);
    }
  }
  table.hidden = jobs.length === 0;
  empty.hidden = jobs.length > 0;
  empty.textContent = filter.value
    ? `No ${filter.value} jobs.`
    : "No jobs yet. Submit one with `secateurs submit` or POST /v1/jobs; it appears here within seconds.";
  loadMore.hidden = !cursor;
}

/** Re-reads every row shown (page by page through the cursor), so jobs further down stay live too. */
async function refresh() {
  const mine = generation;
  const fresh = [];
  let after = null;
  let more = false;
  do {
    const page = await api(query(Math.min(100, wanted - fresh.length), after));
    fresh.push(...page.data);
    more = page.has_more;
    after = page.next_after;
  } while (more && fresh.length < wanted);
  if (mine !== generation) return;
  jobs = fresh;
  cursor = more ? after : null;
  render();
}

async function loadNextPage() {
  if (!cursor) return;
  generation += 1; // an older refresh in flight would put back the shorter list
  const mine = generation;
  wanted = jobs.length + pageSize;
  loadMore.disabled = true;
  try {
    const page = await api(query(pageSize, cursor));
    if (mine !== generation) return;
    const known = new Set(jobs.map((job) => job.id));
    jobs = jobs.concat(page.data.filter((job) => !known.has(job.id)));
    cursor = page.has_more ? page.next_after : null;
    render();
  } catch (error) {
    showError(error);
  } finally {
    loadMore.disabled = false;
  }
}

const askForKey = setupKeyForm(() => tick());

function showError(error) {
  if (error instanceof AuthError) {
    showNotice(notice, error.message, "Paste an API key above; it is kept in this browser only.");
    askForKey(error.message);
  } else {
    showNotice(notice, `Could not load the jobs: ${error.message}`, error.hint ?? "retrying in a few seconds");
  }
}

let busy = false;
let tickAgain = false;

/** One refresh, then the next one scheduled; never two at once (a filter change during one runs it again). */
async function tick() {
  clearTimeout(timer);
  timer = null;
  if (busy) {
    tickAgain = true;
    return;
  }
  busy = true;
  try {
    await refresh();
    hideNotice(notice);
    updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    showError(error);
  } finally {
    busy = false;
  }
  if (tickAgain) {
    tickAgain = false;
    tick();
    return;
  }
  const active = jobs.some((job) => !TERMINAL.has(job.state));
  if (!document.hidden) timer = setTimeout(tick, active ? REFRESH_MS : REFRESH_MS * 2);
}

filter.addEventListener("change", () => {
  generation += 1;
  wanted = pageSize;
  cursor = null;
  const url = new URL(location.href);
  if (filter.value) url.searchParams.set("state", filter.value);
  else url.searchParams.delete("state");
  history.replaceState(null, "", url);
  tick();
});
loadMore.addEventListener("click", loadNextPage);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) tick();
});

tick();
