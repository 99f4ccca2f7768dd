// The console end to end in headless Chromium (ci/console/check.sh sets
// the environment). One "ok"/"FAIL" line per check; exit status 1 if any
// failed. Screenshots of every page go to CONSOLE_SCREENSHOTS.
import { createRequire } from 'node:module';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import path from 'node:path';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set (run ci/console/check.sh)`);
  return v;
};
const base = env('CONSOLE_BASE');
const owner = env('CONSOLE_OWNER_TOKEN');
const devices = env('CONSOLE_DEVICES').split(' ').filter(Boolean);
const otherDevice = env('CONSOLE_OTHER_DEVICE');
const release = env('CONSOLE_RELEASE');
const shots = env('CONSOLE_SCREENSHOTS');
const trellis = env('TRELLIS_BIN');
const require = createRequire(path.join(env('CONSOLE_NPM_DIR'), 'package.json'));
const { chromium } = require('playwright-core');

const CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
  "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

let failures = 0;
let ran = 0;
async function check(name, fn) {
  ran += 1;
  const started = Date.now();
  try {
    const note = await fn();
    console.log(`ok   ${name}${note ? ` (${note})` : ''} [${Date.now() - started} ms]`);
  } catch (e) {
    failures += 1;
    await page.screenshot({ path: path.join(shots, `FAILED-${ran}.png`), fullPage: true }).catch(() => {});
    console.log(`FAIL ${name}: ${(e && e.message ? e.message : String(e)).split('\n').slice(0, 6).join('\n    ')}`);
  }
}
function assert(cond, message) {
  if (!cond) throw new Error(message);
}

mkdirSync(shots, { recursive: true });
const context = await chromium.launchPersistentContext(env('CONSOLE_PROFILE'), {
  executablePath: env('CONSOLE_CHROMIUM'),
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1100, height: 720 },
});
const page = context.pages()[0] || (await context.newPage());
page.setDefaultTimeout(15000);
// Anything the page tries that the CSP blocks, and requests that leave
// the console's origin, are failures.
const violations = [];
page.on('console', (m) => {
  if (/Content Security Policy|Refused to/i.test(m.text())) violations.push(m.text());
});
const foreign = [];
page.on('request', (r) => {
  if (!r.url().startsWith(base) && !r.url().startsWith('data:')) foreign.push(r.url());
});
const shot = (name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });

let cspHeader = null;
await check('a wrong token is refused', async () => {
  const response = await page.goto(`${base}/`);
  cspHeader = response.headers()['content-security-policy'];
  await page.waitForURL(/#\/signin$/);
  await page.fill('#token', 'trellis_0123456789abcdef_not-a-real-token');
  await page.click('[data-testid=token-form] button');
  await page.waitForSelector('[data-testid=signin-error]:not(:empty)');
  const text = await page.textContent('[data-testid=signin-error]');
  assert(/refused/i.test(text), `the error says: ${text}`);
  assert(!(await page.isVisible('#nav')), 'navigation visible without a session');
  const cookies = await context.cookies(base);
  assert(!cookies.some((c) => c.name === 'trellis_console'), 'a cookie was set');
  await shot('signin-refused');
});

await check('sign in', async () => {
  await page.fill('#token', owner);
  await page.click('[data-testid=token-form] button');
  await page.waitForURL(/#\/fleet$/);
  await page.waitForSelector('#who-name:not(:empty)');
  const who = await page.textContent('#who-name');
  assert(who === 'owner@default', `signed in as ${who}`);
  const cookie = (await context.cookies(base)).find((c) => c.name === 'trellis_console');
  assert(cookie && cookie.httpOnly && cookie.sameSite === 'Strict', `cookie ${JSON.stringify(cookie)}`);
  const stored = await page.evaluate(() => JSON.stringify({ ...sessionStorage }) + JSON.stringify({ ...localStorage }));
  assert(!stored.includes(owner), 'the token is in web storage');
  assert(!page.url().includes(owner), 'the token is in the URL');
  return 'HttpOnly SameSite=Strict cookie; no token in storage or URL';
});

await check('the fleet shows every device online', async () => {
  await page.waitForFunction((n) => {
    const rows = [...document.querySelectorAll('[data-testid=device-row]')];
    return rows.length === n && rows.every((r) => r.dataset.online === 'true');
  }, devices.length, { timeout: 20000 });
  const ids = await page.$$eval('[data-testid=device-row]', (rows) => rows.map((r) => r.dataset.id));
  for (const id of devices) assert(ids.includes(id), `${id} not listed`);
  assert(!ids.includes(otherDevice), 'another organisation\'s device is listed');
  const online = await page.textContent('[data-testid=count-online]');
  assert(Number(online) === devices.length, `online count ${online}`);
  assert(await page.isVisible('.chart svg'), 'no chart');
  await shot('fleet');
  await page.setViewportSize({ width: 375, height: 740 });
  await shot('fleet-375px');
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.setViewportSize({ width: 1100, height: 720 });
  assert(overflow <= 1, `the page is ${overflow}px wider than a 375px screen`);
  return `${devices.length} of ${devices.length} online; no horizontal scroll at 375 px`;
});

await check('calling add with 2,3 on a device page shows 5', async () => {
  await page.click(`a[href="#/devices/${devices[0]}"]`);
  await page.waitForSelector('[data-testid=fn-add]');
  await page.fill('[data-testid=args-add]', '2,3');
  await page.press('[data-testid=args-add]', 'Enter');
  await page.waitForFunction(() => {
    const t = document.querySelector('[data-testid=result-add]').textContent;
    return t && t !== '…';
  });
  const result = await page.textContent('[data-testid=result-add]');
  assert(result === '5', `add(2,3) shows ${result}`);
  // The owning gateway's region (trellis up's default region is "local").
  const region = await page.textContent('[data-testid=device-region]');
  assert(region === 'local', `the device page shows region ${region}`);
});

await check('an event published by the device appears on its page within 2 s', async () => {
  await page.waitForSelector('[data-testid=feed-state][data-state=open]');
  const before = await page.$$eval('[data-testid=events] li', (l) => l.length);
  const handle = await page.waitForFunction((n) => {
    const items = document.querySelectorAll('[data-testid=events] li[data-name=temperature]');
    return items.length > n ? { at: Date.now(), published: items[0].dataset.published } : null;
  }, before, { timeout: 2000, polling: 50 });
  const { at, published } = await handle.jsonValue();
  const latency = at - Date.parse(published);
  assert(latency < 2000, `shown ${latency} ms after it was published`);
  await page.fill('#tags', 'console-check');
  await shot('device');
  return `shown ${latency} ms after the device published it`;
});

await check('tagging asks for confirmation, then saves', async () => {
  await page.click('text=Save tags');
  await page.waitForSelector('#confirm[open]');
  await page.keyboard.press('Escape');
  await page.waitForSelector('#confirm', { state: 'hidden' });
  const unchanged = await page.textContent('[data-testid=device-tags]');
  assert(!unchanged.includes('console-check'), 'saved without confirmation');
  await page.click('text=Save tags');
  await page.click('#confirm-ok');
  await page.waitForFunction(() => document.querySelector('[data-testid=device-tags]').textContent.includes('console-check'));
});

await check('a rollout started from the CLI shows its stages advancing to done', async () => {
  await page.goto(`${base}/#/releases`);
  await page.waitForSelector(`[data-testid=release-row][data-id="${release}"]`);
  const id = execFileSync(trellis, ['rollout', 'create', '--release', release, '--stage', 'canary:1', '--stage', '100%', '--soak', '3'],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim().split('\n').pop();
  assert(/\S/.test(id), 'no rollout id printed');
  await page.waitForSelector(`[data-testid=rollout-card][data-id="${id}"]`, { timeout: 5000 });
  await page.click(`a[href="#/rollouts/${id}"]`);
  await page.waitForSelector('[data-testid=stage]');
  // Record every distinct stage picture the page shows until it is done.
  const seen = [];
  const deadline = Date.now() + 120000;
  for (;;) {
    const now = await page.$$eval('[data-testid=stage]', (s) => s.map((x) => x.dataset.state).join(','));
    const state = await page.textContent('[data-testid=rollout-state]');
    const picture = `${state}:${now}`;
    if (seen[seen.length - 1] !== picture) seen.push(picture);
    if (state === 'completed' || state === 'aborted') break;
    assert(Date.now() < deadline, `not done after 120 s: ${seen.join(' -> ')}`);
    await page.waitForTimeout(200);
  }
  const last = seen[seen.length - 1];
  assert(last === 'completed:done,done', `ended as ${last} (${seen.join(' -> ')})`);
  assert(seen.some((p) => /^running:done,(open|waiting)$/.test(p)), `no stage advance seen: ${seen.join(' -> ')}`);
  assert(await page.isVisible('[data-testid=all-applied]'), 'devices left not applied');
  await shot('rollout');
  await page.goto(`${base}/#/releases`);
  await page.waitForSelector(`[data-testid=rollout-card][data-id="${id}"] [data-testid=rollout-state]`);
  await shot('releases');
  return seen.join(' -> ');
});

await check('the audit page filters by kind', async () => {
  await page.goto(`${base}/#/audit`);
  await page.waitForSelector('[data-testid=audit-row]');
  await page.fill('#audit-kind', 'set_tags');
  await page.press('#audit-kind', 'Enter');
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('[data-testid=audit-row]')];
    return rows.length > 0 && rows.every((r) => r.children[1].textContent === 'set_tags');
  });
  await shot('audit');
});

await check('another organisation\'s device is not reachable by URL', async () => {
  await page.goto(`${base}/#/devices/${otherDevice}`);
  await page.waitForSelector('[data-testid=not-found]');
  const text = await page.textContent('[data-testid=not-found]');
  assert(/not yours/.test(text), text);
  assert(!(await page.isVisible('[data-testid=fn-add]')), 'functions shown');
  const direct = await page.evaluate(async (id) => (await fetch(`/v1/trellis/devices/${id}`, { headers: { 'X-Trellis-Console': '1' } })).status, otherDevice);
  assert(direct === 403, `the API answered ${direct}`);
  await shot('not-found');
});

await check('the CSP header is present', async () => {
  assert(cspHeader === CSP, `content-security-policy: ${cspHeader}`);
  const r = await page.evaluate(async () => {
    const a = await fetch('/console/assets/app.js');
    return [a.headers.get('content-security-policy'), a.headers.get('x-content-type-options'), a.headers.get('content-type')];
  });
  assert(r[0] === CSP && r[1] === 'nosniff' && r[2].startsWith('text/javascript'), JSON.stringify(r));
  assert(violations.length === 0, `CSP violations: ${violations.join('; ')}`);
  assert(foreign.length === 0, `requests to other origins: ${foreign.join(', ')}`);
  return 'no CSP violations, no request left the origin';
});

await check('sign out clears the session', async () => {
  await page.goto(`${base}/#/fleet`);
  await page.click('#sign-out');
  await page.waitForURL(/#\/signin$/);
  const cookies = await context.cookies(base);
  assert(!cookies.some((c) => c.name === 'trellis_console'), 'the cookie is still there');
  await page.goto(`${base}/#/fleet`);
  await page.waitForURL(/#\/signin$/);
});

await context.close();
console.log(`console check: ${ran - failures} of ${ran} passed`);
process.exit(failures ? 1 : 0);
