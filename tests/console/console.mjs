// End-to-end test of the auditors' web console in headless Chromium (Debian's `chromium`,
// driven by playwright-core, pinned in package.json). Started by tests/api/console.rs, which
// sets up a gateway with a real OpenID provider (tests/oidc/provider.mjs) and real FHIR reads:
//
//   CONSOLE_BASE=http://127.0.0.1:PORT CONSOLE_EXPECT='{…}' CONSOLE_OUT=/tmp/dir \
//     [CHROMIUM=/usr/bin/chromium] node tests/console/console.mjs
//
// It does what a person would do and checks what they would see: an unauthenticated visit is
// sent to the login; the auditor logs in at the provider; the events of a patient; the
// patient's timeline; a break-the-glass alert acknowledged with a note (and a change without
// the CSRF token refused); chain status "verified"; the per-institution charts; both reports
// downloaded; a person without the auditor role refused. No Content Security Policy violation
// may occur. With `broken_at` in CONSOLE_EXPECT (after the test edited a record), it logs in and
// checks only that chain status shows "failed" and names that position. Prints one line "RESULT <json>" for the Rust test and exits 0; any failed check
// throws (exit 1) after saving a screenshot to CONSOLE_OUT. CONSOLE_SCREENSHOTS=<dir> keeps a
// screenshot of every step there (to look at the console).
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const base = process.env.CONSOLE_BASE;
const expect = JSON.parse(process.env.CONSOLE_EXPECT || '{}');
const out = process.env.CONSOLE_OUT;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
if (!base || !out || !expect.patient) {
  console.error('CONSOLE_BASE, CONSOLE_EXPECT and CONSOLE_OUT are required');
  process.exit(2);
}

const TIMEOUT = 20_000;
const result = { steps: [] };

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

let page;

/** Start a step; with CONSOLE_SCREENSHOTS=<dir>, first save a screenshot of the previous one. */
async function step(name) {
  await screenshot();
  result.steps.push(name);
  console.error(`console test: ${name}`);
}

async function screenshot() {
  const dir = process.env.CONSOLE_SCREENSHOTS;
  if (dir && page && result.steps.length > 0 && !page.isClosed()) {
    await page.screenshot({ path: join(dir, `step-${result.steps.length}.png`), fullPage: true });
  }
}

/** Wait until the text of `selector` contains `text`. */
async function waitText(page, selector, text) {
  try {
    await page.waitForFunction(
      ([sel, t]) => Array.from(document.querySelectorAll(sel)).some((n) => n.textContent.includes(t)),
      [selector, text],
      { timeout: TIMEOUT },
    );
  } catch (err) {
    const seen = await page.locator(selector).allTextContents().catch(() => []);
    throw new Error(`"${text}" never appeared in ${selector}; it shows ${JSON.stringify(seen).slice(0, 800)}`);
  }
}

/** Log in at the provider (oidc-provider's sign-in form) as `user`; returns the final response. */
async function signIn(page, user) {
  await page.waitForSelector('input[name="login"]', { timeout: TIMEOUT });
  check(page.url().startsWith(expect.issuer), `the login page is the provider's (${page.url()})`);
  await page.fill('input[name="login"]', user);
  await page.fill('input[name="password"]', 'any');
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().startsWith(`${base}/console`) && r.request().isNavigationRequest(), { timeout: TIMEOUT }),
    page.click('button[type="submit"]'),
  ]);
  await page.waitForLoadState('load');
  return response;
}

function watchCsp(page, sink) {
  page.on('console', (msg) => {
    if (msg.type() === 'error' && /Content Security Policy/i.test(msg.text())) sink.push(msg.text());
  });
  page.on('pageerror', (err) => sink.push(`page error: ${err.message}`));
}

/** What the auditor does and sees, view by view. */
async function walkthrough() {
  await step('events of the patient');
  await page.fill('#f-patient', expect.patient);
  await page.click('#event-search');
  await waitText(page, '#event-status', `${expect.patient_events} event(s)`);
  const rows = page.locator('#event-table tbody tr[data-id]');
  check(await rows.count() === expect.patient_events, `${expect.patient_events} event rows`);
  const institutions = new Set((await page.locator('#event-table tbody td.institution').allTextContents()).filter(Boolean));
  for (const inst of expect.patient_institutions) {
    check(institutions.has(inst), `events by ${inst} listed (saw ${[...institutions]})`);
  }
  const purposes = await page.locator('#event-table tbody tr[data-id] td:nth-child(6)').allTextContents();
  check(purposes.includes('ETREAT'), `the break-the-glass read is listed (purposes ${purposes})`);
  result.event_rows = await rows.count();

  await step('filters: agent, outcome, dates, purpose');
  await page.fill('#f-patient', '');
  await page.fill('#f-agent', expect.refused_institution);
  await page.selectOption('#f-outcome', '4');
  await page.fill('#f-from', expect.day);
  await page.fill('#f-to', expect.day);
  await page.click('#event-search');
  await waitText(page, '#event-status', `${expect.refused_count} event(s)`);
  const outcomes = await page.locator('#event-table tbody tr[data-id] td:nth-child(3)').allTextContents();
  check(outcomes.length === expect.refused_count && outcomes.every((o) => o.startsWith('4 ')), `refusals only: ${outcomes}`);
  // The day before the records: nothing.
  const before = new Date(Date.parse(`${expect.day}T00:00:00Z`) - 86400000).toISOString().slice(0, 10);
  await page.fill('#f-from', before);
  await page.fill('#f-to', before);
  await page.click('#event-search');
  await waitText(page, '#event-status', '0 event(s)');
  // Purpose: the one break-the-glass access.
  await page.fill('#f-agent', '');
  await page.fill('#f-from', '');
  await page.fill('#f-to', '');
  await page.selectOption('#f-outcome', '');
  await page.selectOption('#f-purpose', 'ETREAT');
  await page.click('#event-search');
  await waitText(page, '#event-status', '1 event(s)');
  check(await page.textContent('#event-table tbody td.institution') === 'hosp-003', 'ETREAT by hosp-003');
  await page.selectOption('#f-purpose', '');

  await step('the patient timeline');
  await page.click('nav a[data-view="timeline"]');
  await page.fill('#t-patient', expect.patient);
  await page.click('#timeline-show');
  await waitText(page, '#timeline-status', `about ${expect.patient}`);
  const timelineText = await page.textContent('#timeline-list');
  for (const inst of expect.patient_institutions) check(timelineText.includes(inst), `timeline names ${inst}`);
  check(await page.locator('#timeline-strip svg circle').count() >= expect.patient_events, 'one mark per record on the strip');
  result.timeline_items = await page.locator('#timeline-list li li').count();

  await step('alerts: acknowledge the break-the-glass alert');
  await page.click('nav a[data-view="alerts"]');
  const alertRow = page.locator(`#alert-table tbody tr[data-rule="${expect.alert_rule}"]`).first();
  await alertRow.waitFor();
  const alertId = await alertRow.getAttribute('data-id');
  // A change with the session cookie but without the CSRF token is refused.
  const forged = await page.evaluate(async (id) => {
    const r = await fetch(`/audit/alerts/${id}/ack`, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ note: 'forged' }),
    });
    return r.status;
  }, alertId);
  check(forged === 403, `an acknowledgement without the CSRF token is refused (got ${forged})`);
  await alertRow.locator('input.ack-note-input').fill(expect.ack_note);
  await alertRow.locator('button.ack-button').click();
  const acked = page.locator(`#alert-table tbody tr[data-id="${alertId}"]`);
  await waitText(page, `#alert-table tbody tr[data-id="${alertId}"] td.alert-state`, 'acknowledged');
  check((await acked.locator('q.ack-note').textContent()) === expect.ack_note, 'the note is shown');
  await waitText(page, '#message', 'acknowledged');
  await page.selectOption('#a-status', 'acknowledged');
  await page.click('#alert-refresh');
  await waitText(page, '#alert-table tbody', expect.ack_note);
  result.acknowledged_alert = alertId;

  await step('chain status');
  await page.click('nav a[data-view="chain"]');
  await page.click('#verify-chain');
  await waitText(page, '#chain-verdict', 'verified');
  check(await page.isHidden('#chain-problems'), 'no problems listed');
  result.chain_summary = await page.textContent('#chain-summary');
  check(result.chain_summary.startsWith('audit chain OK'), result.chain_summary);

  await step('charts per institution per day');
  await page.click('nav a[data-view="charts"]');
  await page.locator('#chart-rows figure.chart-row').first().waitFor();
  const requesters = await page.locator('#chart-rows figure.chart-row .requester').allTextContents();
  for (const [inst, [accesses, denials]] of Object.entries(expect.chart)) {
    check(requesters.includes(inst), `a chart row for ${inst} (rows ${requesters})`);
    const fig = page.locator(`#chart-rows figure.chart-row[data-requester="${inst}"]`);
    const totals = await fig.locator('.totals').textContent();
    check(totals === `${accesses} accesses, ${denials} refused or failed`, `${inst} totals: ${totals}`);
    const bar = await fig.locator(`rect.accesses[data-day="${expect.day}"]`).getAttribute('data-value');
    check(Number(bar) === accesses, `${inst} bar for ${expect.day}: ${bar} accesses`);
    const denialBar = await fig.locator(`rect.denials[data-day="${expect.day}"]`).getAttribute('data-value');
    check(Number(denialBar) === denials, `${inst} denial bar for ${expect.day}: ${denialBar}`);
  }
  result.chart_rows = requesters;

  await step('report downloads');
  await page.click('nav a[data-view="reports"]');
  const files = {};
  for (const [id, kind] of [['#report-html', 'html'], ['#report-csv', 'csv']]) {
    const [download] = await Promise.all([page.waitForEvent('download'), page.click(id)]);
    const path = join(out, download.suggestedFilename());
    await download.saveAs(path);
    check(download.suggestedFilename().endsWith(`.${kind}`), download.suggestedFilename());
    files[kind] = path;
  }
  const html = readFileSync(files.html, 'utf8');
  check(html.includes('Audit compliance report') && html.includes('class="ok"'), 'the HTML report, chain OK');
  for (const inst of expect.patient_institutions) check(html.includes(inst), `the HTML report names ${inst}`);
  const csv = readFileSync(files.csv, 'utf8');
  check(csv.startsWith('section,key1,key2,key3,value') && csv.includes('verification,ok'), 'the CSV report, chain OK');
  result.reports = files;
}

/** The chain view after the test edited a record: failed, and where. */
async function brokenChain() {
  await step('chain status names the tampered position');
  await page.click('nav a[data-view="chain"]');
  await page.click('#verify-chain');
  await waitText(page, '#chain-verdict', 'failed');
  await waitText(page, '#chain-broken-at', String(expect.broken_at));
  const first = await page.locator('#chain-problem-table tbody tr').first().locator('td').allTextContents();
  check(first[0] === String(expect.broken_at) && first[1] === 'modified', `the first problem: ${first}`);
  result.chain_summary = await page.textContent('#chain-summary');
  check(result.chain_summary.startsWith(`audit verification FAILED at position ${expect.broken_at}: modified`), result.chain_summary);
}

/** A person without the auditor role. */
async function nonAuditor() {
  await step('a non-auditor is refused');
  const other = await browser.newContext({ locale: 'en-GB' });
  page = await other.newPage();
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(`${base}/console`);
  const refused = await signIn(page, expect.non_auditor);
  check(refused.status() === 403, `the console answers 403 to ${expect.non_auditor}, got ${refused.status()}`);
  await waitText(page, '#refused', 'Access refused');
  const roles = await page.textContent('#refused-roles');
  check(roles === expect.non_auditor_roles, `the refusal names the roles held: ${roles}`);
  check(await page.locator('#event-table').count() === 0, 'no console for a non-auditor');
  // The APIs refuse too.
  const api = await page.evaluate(async () => (await fetch('/fhir/AuditEvent')).status);
  check(api === 403, `the AuditEvent API refuses the non-auditor (got ${api})`);
  result.refused_roles = roles;
  await screenshot();
  await other.close();
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  // Root in a container: Chromium's sandbox needs user namespaces it may not have; a small
  // /dev/shm must not crash the renderer.
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
try {
  // ---- The auditor ---------------------------------------------------------------------------
  const context = await browser.newContext({ acceptDownloads: true, locale: 'en-GB', timezoneId: 'UTC' });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const problems = [];
  watchCsp(page, problems);

  await step('an unauthenticated visit goes to the login');
  await page.goto(`${base}/console`);
  check(page.url().startsWith(expect.issuer), `redirected to the provider, at ${page.url()}`);
  const landing = await signIn(page, expect.auditor);
  check(landing.status() === 200, `the console answers 200 after login, got ${landing.status()}`);
  check(new URL(page.url()).pathname === '/console', `back at the console: ${page.url()}`);
  const csp = landing.headers()['content-security-policy'] || '';
  check(csp.includes("script-src 'self'") && !csp.includes('unsafe-inline'), `CSP without inline scripts: ${csp}`);
  await waitText(page, '#who', expect.auditor_name);
  result.who = await page.textContent('#who');

  if (expect.broken_at) {
    await brokenChain();
  } else {
    await walkthrough();
  }
  check(problems.length === 0, `no CSP violations or script errors: ${problems.join(' | ')}`);
  await screenshot();
  await context.close();
  if (!expect.broken_at) await nonAuditor();

  console.log(`RESULT ${JSON.stringify(result)}`);
} catch (err) {
  if (page) {
    const shot = join(out, 'failure.png');
    await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
    console.error(`screenshot: ${shot}; page: ${page.url()}`);
  }
  console.error(err.stack || String(err));
  process.exitCode = 1;
} finally {
  await browser.close();
}
