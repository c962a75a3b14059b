// One job (/jobs/{id}): live state and progress, cancel, the failure's reason, and once it succeeded its report
// (perplexity with its protocol, sparsity, timings, per-layer plots, speed) and artifacts.
//
// Live updates come from the Server-Sent Events of GET /v1/jobs/{id}/events (EventSource resumes by itself with
// Last-Event-ID). EventSource cannot send an Authorization header, so with an API key saved the page polls
// GET /v1/jobs/{id} instead; it also falls back to polling if the stream cannot be opened.

import {
  AuthError,
  TERMINAL,
  api,
  authHeaders,
  apiKey,
  badge,
  fmtBytes,
  fmtDuration,
  fmtInt,
  fmtMs,
  fmtPercent,
  fmtPerplexity,
  fmtRatio,
  fmtScientific,
  h,
  hideNotice,
  jobPath,
  progressBar,
  setupKeyForm,
  showNotice,
  timeElement,
} from "./common.js";
import { blockOf, layerBarChart, legend } from "./plot.js";

const POLL_MS = 2000;
const STAGES = [
  ["load", "Load"],
  ["calibrate", "Calibrate"],
  ["evaluate_dense", "Dense perplexity"],
  ["prune", "Prune"],
  ["evaluate_pruned", "Pruned perplexity"],
  ["measure_speed", "Speed"],
  ["save", "Save"],
];
const STAGE_NAMES = {
  load: "Loading the model",
  calibrate: "Preparing calibration data",
  evaluate_dense: "Measuring dense perplexity",
  prune: "Pruning",
  evaluate_pruned: "Measuring pruned perplexity",
  measure_speed: "Measuring speed",
  save: "Saving",
  done: "Finishing",
};

const jobId = decodeURIComponent(location.pathname.replace(/^\/jobs\//, "").replace(/\/+$/, ""));
const $ = (id) => document.getElementById(id);
const notice = $("notice");

let job = null;
let source = null; // the EventSource while streaming
let pollTimer = null;
let resultsFor = null; // the job id whose results are on the page
let refetching = false;
let refetchAgain = false;

// --- summary ------------------------------------------------------------------------------------------------

function metaItem(term, ...value) {
  return [h("dt", {}, term), h("dd", {}, ...value)];
}

function renderSummary() {
  document.title = `${job.id} · ${job.state} · secateurs`;
  $("job-title").textContent = job.id;
  $("job-state").replaceChildren(badge(job.state));
  $("job-mode").textContent = apiKey() ? "updates by polling (API key)" : "";
  $("job-model").replaceChildren(h("span", { class: "muted" }, "model "), h("code", {}, job.spec.model));
  const spec = job.spec;
  $("job-meta").replaceChildren(
    ...metaItem("Method", `${spec.method} · ${spec.pattern}`),
    ...metaItem("Device", spec.device === "auto" ? "auto" : spec.device),
    ...metaItem("Created", timeElement(job.created_at)),
    ...metaItem("Started", timeElement(job.started_at)),
    ...metaItem("Finished", timeElement(job.finished_at)),
    ...metaItem("Attempts", `${job.attempts} of ${job.max_attempts}`),
    ...(job.worker ? metaItem("Worker", job.worker) : []),
  );
  $("spec").textContent = JSON.stringify(spec, null, 2);
}

// --- live progress ------------------------------------------------------------------------------------------

function renderLive() {
  const live = $("live");
  const terminal = TERMINAL.has(job.state);
  live.hidden = terminal;
  if (terminal) return;
  const p = job.progress ?? {};
  const current = STAGES.findIndex(([stage]) => stage === p.stage);
  $("stages").replaceChildren(
    ...STAGES.map(([stage, label], index) => {
      const status = job.state === "queued" ? "todo" : index < current ? "done" : index === current ? "current" : "todo";
      return h("li", { class: `stage-${status}`, "aria-current": status === "current" ? "step" : null }, label);
    }),
  );
  const parts = [];
  if (job.state === "queued") {
    parts.push(
      h("p", { class: "stage-line" }, h("strong", { id: "stage" }, "Queued"), " ", h("span", { class: "muted" }, job.attempts > 0 ? "back in the queue after a lost worker; waiting for a worker" : "waiting for a worker")),
    );
  } else {
    parts.push(
      h(
        "p",
        { class: "stage-line" },
        h("strong", { id: "stage" }, STAGE_NAMES[p.stage] ?? "Starting"),
        p.message && !(p.stage === "prune" && p.blocks) ? h("span", { class: "muted", id: "stage-message" }, ` ${p.message}`) : null,
      ),
    );
  }
  if (p.blocks) {
    const block = p.block ?? 0;
    parts.push(
      h(
        "div",
        { class: "block-line" },
        h("span", { id: "block-text", class: "block-count" }, `Block ${block} / ${p.blocks}`),
        progressBar(block, p.blocks, "Decoder blocks pruned"),
        h(
          "span",
          { id: "eta", class: "muted" },
          p.eta_seconds !== null && p.eta_seconds !== undefined && p.stage === "prune" ? `about ${fmtDuration(p.eta_seconds)} of pruning left` : "",
        ),
      ),
    );
  }
  if (p.worst_layer_error !== null && p.worst_layer_error !== undefined) {
    parts.push(
      h(
        "p",
        { id: "worst", class: "muted" },
        `Worst relative reconstruction error in block ${p.block ?? "?"}: `,
        h("strong", {}, fmtScientific(p.worst_layer_error)),
        p.layers?.length ? ` (over its ${p.layers.length} layers)` : "",
      ),
    );
  }
  if (job.cancel_requested) {
    parts.push(h("p", { class: "warn", id: "cancelling" }, "Cancellation requested: the job stops at the next block boundary."));
  }
  $("progress").replaceChildren(...parts);
  const cancellable = !job.cancel_requested;
  $("cancel").hidden = !cancellable || !$("cancel-confirm").hidden;
  if (!cancellable) $("cancel-confirm").hidden = true;
}

function renderFailure() {
  const section = $("failure");
  const shown = job.state === "failed" || job.state === "cancelled";
  section.hidden = !shown;
  if (!shown) return;
  section.classList.toggle("cancelled", job.state === "cancelled");
  $("failure-title").textContent = job.state === "failed" ? "Failed" : "Cancelled";
  $("error-type").textContent = job.error?.type ? `error type: ${job.error.type}` : "";
  $("error-message").textContent = job.error?.message ?? (job.state === "cancelled" ? "The job was cancelled." : "No reason was recorded.");
  $("error-hint").replaceChildren(...(job.error?.hint ? [h("strong", {}, "What to do: "), job.error.hint] : []));
}

function render() {
  renderSummary();
  renderLive();
  renderFailure();
  if (job.state === "succeeded" && resultsFor !== job.id) showResults();
}

// --- following the job --------------------------------------------------------------------------------------

function stopFollowing() {
  if (source) {
    source.close();
    source = null;
  }
  clearTimeout(pollTimer);
  pollTimer = null;
}

async function refetch() {
  if (refetching) {
    refetchAgain = true; // an event arrived during a read: read once more afterwards
    return;
  }
  refetching = true;
  try {
    job = await api(jobPath(jobId));
    hideNotice(notice);
    render();
    if (TERMINAL.has(job.state)) stopFollowing();
  } catch (error) {
    showError(error);
  } finally {
    refetching = false;
  }
  if (refetchAgain) {
    refetchAgain = false;
    await refetch();
  }
}

function applyEvent(message) {
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    return;
  }
  const changed = event.state !== job.state;
  job.state = event.state;
  if (event.progress) job.progress = event.progress;
  if (event.error) job.error = event.error;
  render();
  if (event.type === "state" && (changed || TERMINAL.has(event.state))) {
    if (TERMINAL.has(event.state)) {
      source?.close();
      source = null;
    }
    refetch(); // started_at, attempts, result: what events do not carry
  }
}

function stream() {
  source = new EventSource(`${jobPath(jobId)}/events`);
  source.addEventListener("state", applyEvent);
  source.addEventListener("progress", applyEvent);
  source.addEventListener("error", () => {
    // CONNECTING: the browser retries by itself with Last-Event-ID. CLOSED: it gave up (e.g. a 401): poll.
    if (source && source.readyState === EventSource.CLOSED) {
      source = null;
      poll();
    }
  });
}

function poll() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(async () => {
    await refetch();
    if (job && !TERMINAL.has(job.state)) poll();
  }, POLL_MS);
}

function follow() {
  stopFollowing();
  if (!job || TERMINAL.has(job.state)) return;
  if (apiKey()) poll();
  else stream();
}

// --- cancel -------------------------------------------------------------------------------------------------

$("cancel").addEventListener("click", () => {
  $("cancel").hidden = true;
  $("cancel-confirm").hidden = false;
  $("cancel-no").focus();
});
$("cancel-no").addEventListener("click", () => {
  $("cancel-confirm").hidden = true;
  $("cancel").hidden = false;
  $("cancel").focus();
});
$("cancel-yes").addEventListener("click", async () => {
  $("cancel-yes").disabled = true;
  try {
    job = await api(`${jobPath(jobId)}/cancel`, { method: "POST" });
    $("cancel-confirm").hidden = true;
    render();
    if (TERMINAL.has(job.state)) stopFollowing();
  } catch (error) {
    showError(error);
    await refetch();
  } finally {
    $("cancel-yes").disabled = false;
  }
});

// --- results ------------------------------------------------------------------------------------------------

function section(id, title, ...children) {
  return h("section", { id, class: "card", "aria-labelledby": `${id}-title` }, h("h2", { id: `${id}-title` }, title), ...children);
}

function stat(label, value, ...detail) {
  return h("div", { class: "stat" }, h("div", { class: "stat-label" }, label), h("div", { class: "stat-value" }, value), h("div", { class: "stat-detail muted" }, ...detail));
}

function definitionList(rows) {
  return h("dl", { class: "meta" }, rows.filter(([, value]) => value !== null && value !== undefined).flatMap(([term, value]) => metaItem(term, value)));
}

function table(headers, rows, attrs = {}) {
  return h(
    "div",
    { class: "table-scroll" },
    h(
      "table",
      { class: "data", ...attrs },
      h("thead", {}, h("tr", {}, headers.map((text) => h("th", { scope: "col" }, text)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((content) => h("td", {}, content))))),
    ),
  );
}

// The greedy-decode speedup a report leads with (report.decode); reports written before that field existed get the
// same summary from their speed section, or the reason there is none.
function decodeSummary(report) {
  if (report.decode) return report.decode;
  const speed = report.speed;
  if (!speed) {
    const reason =
      report.spec.measure_speed === false
        ? "the job had measure_speed off"
        : "measure_speed was left to the worker, which then measured only on CUDA GPUs";
    return { measured: false, reason };
  }
  const run = speed.end_to_end.filter((r) => r.kind === "decode").sort((a, b) => a.batch - b.batch)[0];
  const c = speed.conditions;
  const base = { device: c.device, device_name: c.device_name, isa: c.isa ?? null, threads: c.threads, dtype: speed.dtype, load_average: c.load_average ?? null, kernels: [] };
  if (!run || run.status !== "measured") return { ...base, measured: false, reason: run ? `decode was ${run.status}: ${run.reason ?? ""}` : "the sweep timed no decoding" };
  const measured = run.paths.filter((r) => r.status === "measured" && r.speedup !== null);
  if (!measured.length) return { ...base, measured: false, reason: "no sparse path ran end to end here" };
  const best = measured.reduce((a, b) => (b.speedup > a.speedup ? b : a));
  return { ...base, measured: true, speedup: best.speedup, dense_tokens_per_second: run.dense_tokens_per_second, sparse_tokens_per_second: best.tokens_per_second, path: best.path, kernels: best.kernels ?? [], batch: run.batch, prompt_tokens: run.prompt_tokens, new_tokens: run.new_tokens, repetitions: run.dense?.repetitions ?? null };
}

function fmtRate(value) {
  return value === null || value === undefined ? "–" : value >= 100 ? fmtInt(value) : value.toFixed(1);
}

function decodeConditions(d) {
  const where = d.device_name ? `${d.device_name}${d.isa ? ` (${d.isa})` : ""}` : d.device;
  const ran = d.kernels?.length ? ` → ${d.kernels.join(", ")}` : "";
  return [
    d.measured ? `${fmtRate(d.sparse_tokens_per_second)} vs ${fmtRate(d.dense_tokens_per_second)} tokens/s, greedy decode, batch ${d.batch}, ${d.prompt_tokens} + ${d.new_tokens} tokens, median of ${d.repetitions ?? "?"}` : null,
    d.path ? `path ${d.path}${ran}` : null,
    where ? `${where}${d.threads ? `, ${d.threads} threads` : ""}${d.dtype ? `, ${d.dtype}` : ""}` : null,
    d.load_average?.length ? `load average ${d.load_average[0].toFixed(1)}` : null,
  ]
    .filter((part) => part)
    .join("; ");
}

function decodeStat(report) {
  const d = decodeSummary(report);
  if (!d.measured) {
    return stat("Decode speedup", h("span", { id: "decode-speedup" }, "not measured"), h("span", { id: "decode-conditions" }, d.reason ?? "no reason recorded"));
  }
  return stat("Decode speedup", h("span", { id: "decode-speedup", class: d.speedup >= 1 ? "ok" : "bad" }, fmtRatio(d.speedup, 2)), h("span", { id: "decode-conditions" }, decodeConditions(d)));
}

/** Where a cached dense perplexity came from: a link to the job that computed it, else its output folder, and when. */
function cachedSource(hit) {
  const who = hit.job_id ? h("a", { href: `/jobs/${encodeURIComponent(hit.job_id)}` }, `job ${hit.job_id}`) : h("code", {}, hit.output ?? "an earlier run");
  return h("span", {}, who, ", ", timeElement(hit.created_at));
}

/** "dense: 29.37 (cached from job …)" when the dense figure was read from the dense-perplexity cache. */
function denseCachedLine(ppl) {
  if (!ppl.dense_cached) return null;
  return h("div", { id: "ppl-dense-cached", title: `cache key ${ppl.dense_cached.key}` }, `dense: ${fmtPerplexity(ppl.dense)} (cached from `, cachedSource(ppl.dense_cached), ")");
}

function headline(report) {
  const { perplexity: ppl, sparsity, timings, packed } = report;
  const ratio = ppl.dense && ppl.pruned ? ppl.pruned / ppl.dense : null;
  return h(
    "div",
    { class: "stats", id: "headline" },
    decodeStat(report),
    stat(
      "Perplexity dense → pruned",
      h("span", {}, h("span", { id: "ppl-dense" }, fmtPerplexity(ppl.dense)), " → ", h("span", { id: "ppl-pruned" }, fmtPerplexity(ppl.pruned))),
      ppl.pruned === null ? "not evaluated (no evaluation text)" : ratio ? `${fmtRatio(ratio, 2)} the dense perplexity` : "",
      denseCachedLine(ppl),
    ),
    stat(
      `Sparsity ${sparsity.pattern}`,
      h("span", { id: "sparsity-verified", class: sparsity.verified ? "ok" : "bad" }, sparsity.verified ? "✓ verified" : "✗ not verified"),
      `${fmtPercent(sparsity.pruned_fraction)} zeros in ${sparsity.layers_pruned} pruned layers`,
      sparsity.layers_skipped ? `, ${sparsity.layers_skipped} left dense` : "",
      `; ${fmtPercent(sparsity.model_fraction)} of all parameters`,
    ),
    stat("Time", fmtDuration(timings.total_seconds), `pruning ${fmtDuration(timings.prune_seconds)} with ${sparsity.method} on ${report.environment.device_name}`),
    packed?.written && packed.checkpoint_ratio !== null
      ? stat("Packed checkpoint", fmtRatio(packed.checkpoint_ratio), `${fmtBytes(packed.checkpoint_dense_bytes)} → ${fmtBytes(packed.checkpoint_packed_bytes)}`)
      : stat("Packed checkpoint", "–", packed?.reason ?? "no packed copy was written"),
  );
}

function protocolLine(report) {
  const protocol = report.perplexity.protocol;
  if (!protocol) return h("p", { class: "muted" }, "No perplexity was measured: the job had no evaluation text.");
  return h(
    "p",
    { class: "protocol", id: "protocol" },
    h("strong", {}, "Protocol: "),
    `${fmtInt(protocol.windows)} windows × ${fmtInt(protocol.window)} tokens (${fmtInt(protocol.predicted_tokens)} predicted tokens) of `,
    h("code", {}, protocol.text),
    `, text sha256 `,
    h("code", { title: protocol.text_sha256 }, `${protocol.text_sha256.slice(0, 12)}…`),
    `, ${protocol.bos ? "BOS at every window" : "no BOS"}, batch ${protocol.batch_size}; ${protocol.convention}.`,
  );
}

function errorPlot(report) {
  const layers = report.layers.filter((layer) => !layer.skipped && layer.error !== null && layer.error !== undefined);
  const body = h("div", { class: "plot-body" });
  const holder = section(
    "errors",
    "Relative reconstruction error per layer",
    h("p", { class: "muted" }, "‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs, one bar per pruned linear layer, in model order; hover a bar for its name."),
    body,
  );
  if (!layers.length) {
    body.append(h("p", { class: "muted" }, "No per-layer errors: this method used no calibration data."));
    return holder;
  }
  const spread = Math.max(...layers.map((l) => l.error)) / Math.max(1e-30, Math.min(...layers.map((l) => l.error).filter((e) => e > 0)));
  const toggle = h("input", { type: "checkbox", id: "log-scale", checked: spread > 100 });
  const figure = h("figure", { class: "plot-wrap" });
  const draw = () => {
    const { figure: chart, roles } = layerBarChart({
      bars: layers.map((layer) => ({ name: layer.name, value: layer.error })),
      title: `Relative reconstruction error of ${layers.length} pruned layers`,
      yLabel: "relative error",
      log: toggle.checked,
      describe: (bar) => `${bar.name} (block ${blockOf(bar.name) ?? "–"}): ${fmtScientific(bar.value)}`,
    });
    figure.replaceChildren(
      h("div", { class: "plot-scroll" }, chart),
      h("figcaption", {}, legend(roles), h("span", { class: "muted" }, `${layers.length} layers; shaded bands alternate decoder blocks.`)),
    );
  };
  toggle.addEventListener("change", draw);
  draw();
  const worst = [...layers].sort((a, b) => b.error - a.error).slice(0, 5);
  body.append(
    h("p", { class: "plot-controls" }, h("label", { for: "log-scale" }, toggle, " logarithmic scale")),
    figure,
    h("p", {}, h("strong", {}, "Largest errors: "), worst.map((l, i) => [i ? ", " : "", h("code", {}, l.name), ` ${fmtScientific(l.error)}`])),
    h(
      "details",
      {},
      h("summary", {}, "Every layer as a table"),
      table(
        ["layer", "shape (out × in)", "sparsity", "relative error", "dampening"],
        report.layers.map((l) => [h("code", {}, l.name), `${l.shape[0]} × ${l.shape[1]}`, fmtPercent(l.sparsity), l.skipped ? `left dense: ${l.skipped}` : fmtScientific(l.error), l.dampening === null || l.dampening === undefined ? "–" : String(l.dampening)]),
      ),
    ),
  );
  return holder;
}

function packedSection(report) {
  const packed = report.packed;
  if (!packed) return null;
  if (!packed.written) return section("packed", "Packed size", h("p", { class: "muted" }, `No packed copy was written: ${packed.reason ?? "no reason recorded"}.`));
  // The checkpoint lists tensors by name ("layers.10" before "layers.2"): put them in the model's layer order.
  const order = new Map(report.layers.map((layer, index) => [layer.name, index]));
  const position = (name) => order.get(name.replace(/\.weight$/, "")) ?? Number.MAX_SAFE_INTEGER;
  const layers = [...packed.layers].sort((a, b) => position(a.name) - position(b.name));
  const { figure: chart } = layerBarChart({
    bars: layers.map((layer) => ({ name: layer.name, value: layer.packed_bytes, behind: layer.dense_bytes })),
    title: `Packed versus dense bytes of ${packed.layers.length} layers`,
    yLabel: "bytes",
    format: fmtBytes,
    tickFormat: fmtBytes,
    describe: (bar) => `${bar.name}: ${fmtBytes(bar.value)} packed, ${fmtBytes(bar.behind)} dense (${fmtRatio(bar.value / bar.behind)})`,
  });
  return section(
    "packed",
    "Packed size",
    h(
      "p",
      {},
      `${packed.format ?? "packed"} in `,
      h("code", {}, packed.path ?? "packed/"),
      `: ${packed.index_bits ?? "?"}-bit positions per kept value, ${packed.dtypes.join(", ") || "–"}. `,
      h("strong", {}, `Pruned layers ${fmtBytes(packed.layers_dense_bytes)} → ${fmtBytes(packed.layers_packed_bytes)} (${fmtRatio(packed.layers_ratio)})`),
      packed.checkpoint_ratio !== null ? `; whole checkpoint ${fmtBytes(packed.checkpoint_dense_bytes)} → ${fmtBytes(packed.checkpoint_packed_bytes)} (${fmtRatio(packed.checkpoint_ratio)}).` : ".",
    ),
    h(
      "figure",
      { class: "plot-wrap" },
      h("div", { class: "plot-scroll" }, chart),
      h("figcaption", {}, legend([], [{ label: "dense bytes", className: "swatch-behind" }, { label: "packed bytes (coloured by layer role)", className: "swatch-front" }])),
    ),
  );
}

function timing(stats) {
  if (!stats) return "–";
  return h("span", { title: `${stats.repetitions} timed after ${stats.warmup} warm-up, ${stats.timer}` }, fmtMs(stats.median_ms), h("span", { class: "muted small" }, ` (IQR ${fmtMs(stats.q1_ms)}–${fmtMs(stats.q3_ms)})`));
}

function pathResult(result) {
  if (!result) return "–";
  if (result.status !== "measured") return h("span", { class: "muted", title: result.reason ?? "" }, result.reason ? `${result.status}: ${result.reason}` : result.status);
  return h(
    "span",
    {},
    timing(result.timing),
    result.speedup !== null ? h("div", {}, h("strong", {}, fmtRatio(result.speedup, 2)), result.fraction_of_limit !== null ? h("span", { class: "muted small" }, ` (${fmtPercent(result.fraction_of_limit, 0)} of the limit)`) : null) : null,
    result.tokens_per_second !== null && result.tokens_per_second !== undefined ? h("div", { class: "muted small" }, `${fmtRate(result.tokens_per_second)} tokens/s`) : null,
    result.kernels?.length ? h("div", { class: "muted small" }, `ran ${result.kernels.join(", ")}`) : null,
  );
}

function speedSection(report) {
  const speed = report.speed;
  if (!speed) {
    const why = decodeSummary(report).reason ?? "no reason recorded";
    return section("speed", "Speed", h("p", { id: "no-speed" }, `No speed measurement was made for this job (${why}). No speed figure is shown or estimated.`));
  }
  const c = speed.conditions;
  const paths = speed.paths.map((p) => p.name);
  const measuredPaths = paths.filter((name) => speed.linear.some((row) => row.paths.some((r) => r.path === name && r.status !== "unavailable")));
  const shownPaths = measuredPaths.length ? measuredPaths : paths;
  const parts = [
    h("p", { class: c.sparse_hardware ? "ok" : "callout", id: "hardware-note" }, h("strong", {}, c.sparse_hardware ? "2:4 sparse hardware: yes. " : "No 2:4 sparse hardware. "), c.sparse_hardware_note),
    definitionList([
      ["Device", `${c.device_name} (${c.device})`],
      ["Compute capability", c.compute_capability],
      ["CUDA / driver", c.cuda ? `${c.cuda} / ${c.driver ?? "–"}` : null],
      ["cuSPARSELt", c.cusparselt],
      ["torch", c.torch],
      ["Instruction sets", c.isa ?? null],
      ["Load average (1, 5, 15 min)", c.load_average?.length ? c.load_average.map((x) => x.toFixed(2)).join(", ") : null],
      ["Threads", String(c.threads)],
      ["dtype · pattern · mode", `${speed.dtype} · ${speed.pattern} · ${speed.runtime_mode}`],
    ]),
    h("h3", {}, "Sparse paths"),
    table(
      ["path", "what", "2:4 hardware", "runs here"],
      speed.paths.map((p) => [h("code", {}, p.name), p.description, p.hardware ? "yes" : "no", p.available ? "yes" : `no: ${p.reason ?? ""}`]),
    ),
  ];
  if (speed.linear.length) {
    const summary = shownPaths.map((name) => {
      const speedups = speed.linear.flatMap((row) => row.paths.filter((r) => r.path === name && r.status === "measured" && r.speedup !== null).map((r) => r.speedup));
      if (!speedups.length) return h("li", {}, h("code", {}, name), ": not measured at any point");
      return h("li", {}, h("code", {}, name), `: measured at ${speedups.length} of ${speed.linear.length} points, `, h("strong", {}, `${fmtRatio(Math.min(...speedups), 2)} – ${fmtRatio(Math.max(...speedups), 2)}`), " the dense speed");
    });
    parts.push(
      h("h3", {}, "Linear layers"),
      h("p", { class: "muted small" }, "Dense F.linear versus each path on the model's distinct shapes; speedup = dense median / path median, with its fraction of the physical limit."),
      h("ul", { class: "speed-summary" }, summary),
      h(
        "details",
        { open: speed.linear.length <= 8 },
        h("summary", {}, `All ${speed.linear.length} points`),
        table(
          ["shape (out × in)", "layers", "tokens", "dense", ...shownPaths],
          speed.linear.map((row) => [`${row.shape[0]} × ${row.shape[1]}`, String(row.layers), fmtInt(row.tokens), timing(row.dense), ...shownPaths.map((name) => pathResult(row.paths.find((r) => r.path === name)))]),
          { id: "speed-linear" },
        ),
      ),
    );
  }
  const runs = speed.end_to_end;
  const describeRun = (run) => `${run.kind}, batch ${run.batch} × ${run.prompt_tokens} tokens${run.new_tokens ? `, ${run.new_tokens} new` : ""}`;
  if (runs.length && runs.every((run) => run.status !== "measured")) {
    parts.push(h("h3", {}, "End to end"), h("p", {}, "Not measured:"), h("ul", {}, runs.map((run) => h("li", {}, `${describeRun(run)}: ${run.status}${run.reason ? `, ${run.reason}` : ""}`))));
  } else if (runs.length) {
    parts.push(
      h("h3", {}, "End to end"),
      table(
        ["run", "status", "dense", ...paths],
        runs.map((run) => [
          describeRun(run),
          run.status === "measured" ? "measured" : `${run.status}${run.reason ? `: ${run.reason}` : ""}`,
          run.dense ? h("span", {}, timing(run.dense), run.dense_tokens_per_second ? h("div", { class: "muted small" }, `${fmtInt(run.dense_tokens_per_second)} tokens/s`) : null) : "–",
          ...paths.map((name) => pathResult(run.paths.find((r) => r.path === name))),
        ]),
        { id: "speed-end-to-end" },
      ),
    );
  }
  const notes = speed.notes.filter((note) => note !== c.sparse_hardware_note);
  if (notes.length) parts.push(h("h3", {}, "Notes"), h("ul", {}, notes.map((note) => h("li", {}, note))));
  return section("speed", "Speed", ...parts);
}

function detailsSection(report) {
  const t = report.timings;
  const m = report.model;
  const cal = report.calibration;
  const env = report.environment;
  const memory = report.memory;
  const stages = memory?.peak_rss_by_stage ?? {};
  const top = Math.max(0, ...Object.values(stages));
  // each stage's own peak resident memory (VmHWM reset as it started); the job's peak in bold
  const peak = (stage) => (stage in stages ? (stages[stage] === top ? h("strong", {}, fmtBytes(stages[stage])) : fmtBytes(stages[stage])) : "–");
  return h(
    "div",
    { class: "columns" },
    section(
      "timings",
      "Timings",
      table(
        ["stage", "time", "peak memory"],
        [
          ["load", fmtDuration(t.load_seconds), peak("load")],
          ["data", fmtDuration(t.data_seconds), peak("calibrate")],
          ["dense perplexity", report.perplexity.dense_cached ? `${fmtDuration(t.eval_dense_seconds)} (cached; computed in ${fmtDuration(report.perplexity.dense_cached.seconds)} then)` : fmtDuration(t.eval_dense_seconds), peak("evaluate_dense")],
          ["prune", fmtDuration(t.prune_seconds), peak("prune")],
          ["pruned perplexity", fmtDuration(t.eval_pruned_seconds), peak("evaluate_pruned")],
          ["speed step", "–", peak("measure_speed")],
          ["save", fmtDuration(t.save_seconds), ""],
          [h("strong", {}, "total"), h("strong", {}, fmtDuration(t.total_seconds)), h("strong", {}, memory?.peak_rss_bytes ? fmtBytes(memory.peak_rss_bytes) : "–")],
        ],
        { id: "timings-table" },
      ),
    ),
    section(
      "model",
      "Model and calibration",
      definitionList([
        ["Architecture", `${m.architecture} (${m.model_type})`],
        ["Parameters", fmtInt(m.parameters)],
        ["Decoder blocks", String(m.decoder_blocks)],
        ["dtype", m.dtype],
        ["Calibration", cal.source ? h("code", {}, cal.source) : "none"],
        ["Windows", `${cal.samples} × ${cal.seqlen} tokens, seed ${cal.seed}, ${cal.precision ?? "fp32"}`],
        ["Calibration sha256", cal.sha256 ? h("code", { title: cal.sha256 }, `${cal.sha256.slice(0, 12)}…`) : null],
        ["Environment", `secateurs ${env.secateurs}, torch ${env.torch}, transformers ${env.transformers}, ${env.threads} threads`],
      ]),
    ),
  );
}

function downloadLink(href, text, filename) {
  const link = h("a", { href, download: filename }, text);
  link.addEventListener("click", async (event) => {
    if (!apiKey()) return; // a plain link: the browser streams it to disk
    event.preventDefault(); // links cannot send the key: fetch with it, then save the blob
    try {
      const response = await fetch(href, { headers: authHeaders() });
      if (!response.ok) throw new Error(`the server answered ${response.status}`);
      const url = URL.createObjectURL(await response.blob());
      const save = h("a", { href: url, download: filename });
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (error) {
      showNotice(notice, `Download failed: ${error.message}`);
    }
  });
  return link;
}

function artifactsSection(artifacts) {
  if (!artifacts) return section("artifacts", "Artifacts", h("p", { class: "muted" }, "The artifact list could not be read."));
  const base = `${jobPath(jobId)}/artifacts/`;
  const total = artifacts.data.reduce((sum, a) => sum + a.size, 0);
  return section(
    "artifacts",
    "Artifacts",
    h(
      "p",
      {},
      downloadLink(artifacts.archive, `Download everything as ${jobId}.tar`, `${jobId}.tar`),
      h("span", { class: "muted" }, ` (${fmtBytes(total)}, streamed; a Hugging Face folder plus report.json)`),
    ),
    h(
      "ul",
      { class: "artifacts", id: "artifact-list" },
      artifacts.data.map((a) => h("li", {}, downloadLink(base + a.path.split("/").map(encodeURIComponent).join("/"), a.path, a.path.split("/").pop()), h("span", { class: "muted" }, fmtBytes(a.size)))),
    ),
  );
}

async function showResults() {
  resultsFor = job.id;
  const container = $("results");
  container.hidden = false;
  container.replaceChildren(h("p", { class: "muted" }, "Loading the report…"));
  try {
    const [report, artifacts] = await Promise.all([api(`${jobPath(jobId)}/report`), api(`${jobPath(jobId)}/artifacts`).catch(() => null)]);
    container.replaceChildren(
      section("results-summary", "Results", headline(report), protocolLine(report)),
      errorPlot(report),
      packedSection(report) ?? "",
      speedSection(report),
      detailsSection(report),
      artifactsSection(artifacts),
    );
    container.dataset.ready = "true";
  } catch (error) {
    resultsFor = null;
    container.replaceChildren();
    showError(error);
  }
}

// --- start --------------------------------------------------------------------------------------------------

function showError(error) {
  if (error instanceof AuthError) {
    showNotice(notice, error.message, "Paste an API key above; it is kept in this browser only.");
    askForKey(error.message);
  } else {
    showNotice(notice, error.message, error.hint ?? null);
  }
}

async function start() {
  stopFollowing();
  try {
    job = await api(jobPath(jobId));
  } catch (error) {
    showError(error);
    return;
  }
  hideNotice(notice);
  render();
  follow();
}

const askForKey = setupKeyForm(start);
start();
