// Drives Debian's chromium (playwright-core, no bundled browser) over the status page of two real servers.
//
//   node check_status_page.mjs CONFIG.json
//
// CONFIG (written by tests/test_browser.py): {url, specs: {slow, failing, cancel}, keyed: {url, key, spec},
// screenshot}. `url` is `secateurs serve` in embedded mode (API + one worker); `keyed.url` is an API alone with
// API keys configured and no worker (its jobs stay queued). Prints one line per check and exits 1 on the first
// failure, with the page's console errors.

import { readFile } from "node:fs/promises";
import { chromium } from "playwright-core";

const config = JSON.parse(await readFile(process.argv[2], "utf8"));
const started = Date.now();
const consoleErrors = [];

function log(message) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(6)} s] ${message}`);
}

function assert(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

async function submit(base, spec, key = null) {
  const headers = { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
  const response = await fetch(`${base}/v1/jobs`, { method: "POST", headers, body: JSON.stringify(spec) });
  const body = await response.json();
  assert(response.status === 201, `POST /v1/jobs answered ${response.status}: ${JSON.stringify(body)}`);
  return body.id;
}

async function getJson(url, key = null) {
  const response = await fetch(url, { headers: key ? { Authorization: `Bearer ${key}` } : {} });
  assert(response.ok, `GET ${url} answered ${response.status}`);
  return response.json();
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: "light" });
  const page = await context.newPage();
  page.on("pageerror", (error) => consoleErrors.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(`console: ${message.text()}`);
  });
  const base = config.url;

  // 1. The list shows a submitted job.
  const slow = await submit(base, config.specs.slow);
  await page.goto(`${base}/`);
  const row = page.locator(`tr[data-job-id="${slow}"]`);
  await row.waitFor({ timeout: 15000 });
  const rowText = await row.innerText();
  assert(rowText.includes("sparsegpt · 2:4"), `the list row names method and pattern: ${rowText}`);
  assert(rowText.includes("llama16"), `the list row names the model: ${rowText}`);
  log(`list shows ${slow}`);

  // 2. The job page follows it live: block i/N advances while it runs.
  await page.goto(`${base}/jobs/${slow}`);
  await page.waitForFunction(
    () => {
      const match = /Block (\d+) \/ 16/.exec(document.getElementById("block-text")?.textContent ?? "");
      const block = match ? Number(match[1]) : 0;
      return block >= 1 && block < 16 && document.querySelector("#job-state .badge-running");
    },
    null,
    { timeout: 180000, polling: 50 },
  );
  // Read the text and the bar in one evaluation: the page re-renders every poll, and two separate reads can
  // straddle a block boundary.
  const { first, valueNow } = await page.evaluate(() => {
    const match = /Block (\d+) \/ (\d+)/.exec(document.getElementById("block-text")?.textContent ?? "");
    const bar = document.querySelector('#progress [role="progressbar"]');
    return { first: match ? Number(match[1]) : null, valueNow: bar?.getAttribute("aria-valuenow") ?? null };
  });
  assert(valueNow === String(first), `the progress bar's aria-valuenow (${valueNow}) is the block (${first})`);
  assert((await page.locator("#progress").getAttribute("aria-live")) === "polite", "progress is an aria-live region");
  // The page as it was when the block first advanced, read in that same evaluation (after the last block the next
  // stage's render drops the ETA).
  const advanced = await page.waitForFunction(
    (seen) => {
      const match = /Block (\d+) \/ 16/.exec(document.getElementById("block-text")?.textContent ?? "");
      if (!match || Number(match[1]) <= seen) return null;
      const text = (id) => document.getElementById(id)?.innerText ?? "";
      return { later: Number(match[1]), eta: text("eta"), worst: text("worst") };
    },
    first,
    { timeout: 120000, polling: 50 },
  );
  const { later, eta, worst } = await advanced.jsonValue();
  assert(/left/.test(eta), `an ETA is shown while pruning: ${eta}`);
  assert(/Worst relative reconstruction error in block \d+/.test(worst), `the worst layer error is shown: ${worst}`);
  log(`live progress: block ${first}/16 -> ${later}/16 (${eta}; ${worst})`);

  // 3. The finished job: perplexities, protocol, one bar per pruned layer, artifacts.
  await page.locator("#job-state .badge-succeeded").waitFor({ timeout: 240000 });
  await page.locator('#results[data-ready="true"]').waitFor({ timeout: 30000 });
  const report = await getJson(`${base}/v1/jobs/${slow}/report`);
  const artifacts = await getJson(`${base}/v1/jobs/${slow}/artifacts`);
  const dense = await page.locator("#ppl-dense").innerText();
  const pruned = await page.locator("#ppl-pruned").innerText();
  assert(dense === report.perplexity.dense.toFixed(2), `dense perplexity ${dense} vs ${report.perplexity.dense}`);
  assert(pruned === report.perplexity.pruned.toFixed(2), `pruned perplexity ${pruned} vs ${report.perplexity.pruned}`);
  const protocol = await page.locator("#protocol").innerText();
  const p = report.perplexity.protocol;
  assert(protocol.includes(`${p.windows} windows × ${p.window} tokens`), `protocol windows × tokens: ${protocol}`);
  assert(protocol.includes(p.text_sha256.slice(0, 12)), `protocol names the text's sha256: ${protocol}`);
  const bars = await page.locator("#errors svg rect.bar").count();
  const layersWithError = report.layers.filter((l) => !l.skipped && l.error !== null).length;
  assert(bars === report.sparsity.layers_pruned && bars === layersWithError, `${bars} bars for ${report.sparsity.layers_pruned} pruned layers`);
  const firstBar = await page.locator("#errors svg rect.bar").first().getAttribute("data-layer");
  assert(firstBar === report.layers[0].name, `bars follow the layer order: ${firstBar}`);
  assert((await page.locator("#sparsity-verified").innerText()).includes("verified"), "sparsity verified is shown");
  // Each stage's peak memory beside its time; the job's peak is the largest stage's.
  const timings = await page.locator("#timings-table").innerText();
  const stagePeaks = Object.values(report.memory.peak_rss_by_stage ?? {});
  assert(stagePeaks.length > 0 && Math.max(...stagePeaks) === report.memory.peak_rss_bytes, `peak memory by stage: ${JSON.stringify(report.memory)}`);
  assert(/peak memory/i.test(timings) && /\d MB|\d GB/.test(timings), `the timings table shows each stage's peak memory: ${timings}`);
  // The results lead with the decode speedup and its conditions, or say why there is none.
  const firstStat = await page.locator("#headline .stat").first().innerText();
  assert(firstStat.toLowerCase().startsWith("decode speedup"), `the headline leads with the decode speedup: ${firstStat}`);
  const speedup = await page.locator("#decode-speedup").innerText();
  const conditions = await page.locator("#decode-conditions").innerText();
  if (report.decode?.measured) {
    assert(speedup === `${report.decode.speedup.toFixed(2)}×`, `decode speedup ${speedup} vs ${report.decode.speedup}`);
    assert(conditions.includes(report.decode.path) && conditions.includes(`${report.decode.threads} threads`), `decode conditions: ${conditions}`);
  } else {
    assert(speedup === "not measured" && conditions.length > 0, `no decode figure, with its reason: ${conditions}`);
  }
  if (report.speed === null) {
    assert((await page.locator("#no-speed").innerText()).startsWith("No speed measurement was made"), "no speed: said so");
  } else {
    assert((await page.locator("#hardware-note").innerText()).includes(report.speed.conditions.sparse_hardware_note), "hardware note");
  }
  if (report.packed?.written) {
    assert((await page.locator("#packed svg rect.bar").count()) === report.packed.layers.length, "one packed bar per layer");
  }
  const links = await page.locator("#artifact-list a").count();
  assert(links === artifacts.data.length, `${links} artifact links for ${artifacts.data.length} artifacts`);
  const archive = page.locator(`#artifacts a[href="${artifacts.archive}"]`);
  assert((await archive.count()) === 1, "the .tar archive is linked");
  const download = await fetch(`${base}${await page.locator("#artifact-list a").filter({ hasText: /^config\.json$/ }).getAttribute("href")}`);
  assert(download.ok && (await download.json()).model_type === "llama", "an artifact link downloads the file");
  assert(await page.locator("#live").isHidden(), "no live section once finished");
  if (config.screenshot) {
    // The top of the finished page, down to the end of the per-layer error plot: small enough to commit.
    const box = await page.locator("#errors").boundingBox();
    const scroll = await page.evaluate(() => window.scrollY);
    const bottom = Math.ceil(box.y + scroll + box.height + 8);
    await page.screenshot({ path: config.screenshot, fullPage: true, clip: { x: 0, y: 0, width: 1280, height: bottom } });
  }
  log(`finished page: ppl ${dense} -> ${pruned}, ${bars} bars, ${links} artifacts`);

  // 4. A failed job shows its message and hint; 5. a running job is cancelled from its page.
  const failing = await submit(base, config.specs.failing);
  const cancel = await submit(base, config.specs.cancel);
  await page.goto(`${base}/jobs/${failing}`);
  await page.locator("#job-state .badge-failed").waitFor({ timeout: 120000 });
  const failedJob = await getJson(`${base}/v1/jobs/${failing}`);
  assert((await page.locator("#error-message").innerText()) === failedJob.error.message, "the failure's message");
  assert((await page.locator("#error-hint").innerText()).includes(failedJob.error.hint), "the failure's hint");
  const model = await page.locator("#job-model code").innerText();
  assert(model === config.specs.failing.model, `markup in a job's strings is shown as text: ${model}`);
  assert((await page.locator("#injected").count()) === 0, "markup in a job's strings is never parsed");
  log(`failed page: ${failedJob.error.message}`);

  await page.goto(`${base}/jobs/${cancel}`);
  await page.waitForFunction(() => /Block [1-9]\d* \/ 16/.test(document.getElementById("block-text")?.textContent ?? ""), null, {
    timeout: 180000,
    polling: 50,
  });
  await page.locator("#cancel").click();
  await page.locator("#cancel-yes").click();
  await page.locator("#job-state .badge-cancelled").waitFor({ timeout: 120000 });
  const cancelled = await getJson(`${base}/v1/jobs/${cancel}`);
  assert(cancelled.state === "cancelled" && cancelled.cancel_requested, "the API says cancelled");
  assert((await page.locator("#error-message").innerText()).includes("cancelled after block"), "the page says where it stopped");
  log(`cancelled from the page: ${cancelled.error.message}`);

  // 6. The list: state filter, load more through the cursor.
  await page.goto(`${base}/?limit=2`);
  await page.locator("tbody tr").nth(1).waitFor();
  assert((await page.locator("tbody tr").count()) === 2, "a page of 2");
  await page.locator("#load-more").click();
  await page.locator("tbody tr").nth(2).waitFor();
  assert(await page.locator("#load-more").isHidden(), "no more after the last page");
  await page.locator(`tr[data-job-id="${failing}"] .model-path`, { hasText: "<img" }).waitFor();
  assert((await page.locator("#injected").count()) === 0, "no markup parsed in the list");
  await page.selectOption("#state-filter", "failed");
  await page.waitForFunction(() => document.querySelectorAll("tbody tr").length === 1);
  assert((await page.locator(`tr[data-job-id="${failing}"]`).count()) === 1, "the filter keeps the failed job only");
  const succeededRow = page.locator(`tr[data-job-id="${slow}"]`);
  assert((await succeededRow.count()) === 0, "the filter hides the succeeded job");
  log("list: load more and state filter");

  // 7. A server with API keys: the page asks for a key, then polls with it, and cancels with it.
  const keyed = config.keyed;
  const queued = await submit(keyed.url, keyed.spec, keyed.key);
  const keyPage = await context.newPage();
  keyPage.on("pageerror", (error) => consoleErrors.push(`page error: ${error.message}`));
  await keyPage.goto(`${keyed.url}/`);
  await keyPage.locator("#key-form").waitFor({ state: "visible" });
  assert((await keyPage.locator("#notice").innerText()).includes("needs an API key"), "the 401 is explained");
  await keyPage.fill("#key-input", "sk-wrong");
  await keyPage.locator("#key-form button[type=submit]").click();
  await keyPage.locator("#notice", { hasText: "not valid" }).waitFor();
  await keyPage.fill("#key-input", keyed.key);
  await keyPage.locator("#key-form button[type=submit]").click();
  await keyPage.locator(`tr[data-job-id="${queued}"]`).waitFor();
  await keyPage.goto(`${keyed.url}/jobs/${queued}`);
  await keyPage.locator("#job-state .badge-queued").waitFor();
  assert((await keyPage.locator("#job-mode").innerText()).includes("polling"), "with a key the page polls");
  await keyPage.locator("#cancel").click();
  await keyPage.locator("#cancel-yes").click();
  await keyPage.locator("#job-state .badge-cancelled").waitFor();
  assert((await getJson(`${keyed.url}/v1/jobs/${queued}`, keyed.key)).state === "cancelled", "cancelled with the key");
  log("API keys: asked, refused a wrong one, polled and cancelled with the right one");

  const relevant = consoleErrors.filter((line) => !/status of 401/.test(line));
  assert(relevant.length === 0, `no errors in the page:\n${relevant.join("\n")}`);
  log("all checks passed");
} catch (error) {
  console.error(error.stack ?? String(error));
  if (consoleErrors.length) console.error(`page console:\n${consoleErrors.join("\n")}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
