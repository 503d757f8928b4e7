// The dashboard in a real headless Chromium against a real `tether serve` and a real `tether worker`
// running the shell agent: the scenarios of the dashboard's issue, in the order a person would meet
// them. Every scenario fails on a console error or a request to another origin.

import { test, before, beforeEach, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  startServer, startWorker, launchBrowser, api, until, descendantsOf, screenshotDir,
} from './harness.mjs';

const marker = randomBytes(4).toString('hex');
const XSS_NAME = `<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>${marker}`;

let server;
let browser;
let page;
let worker;
const shots = screenshotDir();
const problems = [];          // console errors, page errors and foreign requests, never expected
const failedRequests = [];    // every request that got no answer, with the browser's reason: evidence for a problem
let running = '';             // the scenario under way, named in each problem
let expectedFailures = [];    // failed requests a scenario provokes on purpose (a refused token)
let env;                      // the environment created through the UI
let sessionId;

async function shot(name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: false });
}

async function signInWith(token) {
  await page.getByLabel('Admin token').fill(token);
  await page.getByLabel('Admin token').press('Enter');
}

before(async () => {
  server = await startServer();
  browser = await launchBrowser(server.base);
  page = browser.context.pages()[0] ?? await browser.context.newPage();
  const origin = new URL(server.base).origin;
  browser.context.on('request', (request) => {
    const url = new URL(request.url());
    if (url.origin !== origin && url.protocol !== 'data:' && url.protocol !== 'blob:') {
      problems.push(`[${running}] request to another origin: ${request.url()}`);
    }
  });
  browser.context.on('requestfailed', (request) => {
    failedRequests.push(`[${running}] ${new Date().toISOString()} ${request.method()} ${request.url()}: ${request.failure()?.errorText}`);
  });
  browser.context.on('console', (message) => {
    if (message.type() !== 'error') return;
    const where = message.location()?.url ?? '';
    const expected = expectedFailures.some((f) => message.text().includes(f.text) && where.includes(f.path));
    if (!expected) problems.push(`[${running}] ${new Date().toISOString()} console error: ${message.text()} (${where})`);
  });
  browser.context.on('weberror', (error) => problems.push(`[${running}] page error: ${error.error().message}`));
});

beforeEach((t) => { running = t.name; });

after(async () => {
  if (problems.length > 0) {
    // What the browser and the server saw, for a failure that only shows on another machine.
    console.log(`dashboard: requests that got no answer:\n${failedRequests.join('\n') || '(none)'}`);
    console.log(`dashboard: the server's log (warnings and errors):\n${server?.log().slice(-8000) || '(empty)'}`);
  }
  await worker?.stop();
  await browser?.close();
  await server?.stop();
});

function noProblems() {
  assert.deepEqual(problems, [], `console errors or foreign requests:\n${problems.join('\n')}`);
}

test('1. sign in: a bad token is refused with a clear message and nothing else loads; a good one works', async () => {
  expectedFailures = [{ text: 'status of 401', path: '/api/v1/cloud/environments' }];
  const apiRequests = [];
  const count = (request) => { if (request.url().includes('/api/')) apiRequests.push(request.url()); };
  page.on('request', count);
  await page.goto(`${server.base}/`);
  await page.evaluate(() => { window.__loaded = true; });
  await signInWith('tth_adm_not_a_real_token_at_all_000000000000');
  await page.getByText('Sign-in failed: The server does not know this token, or it has been revoked.').waitFor();
  assert.equal(await page.locator('#nav').isHidden(), true, 'the navigation stays hidden');
  assert.equal(apiRequests.length, 1, `only the sign-in check was requested: ${apiRequests}`);
  await shot('signin');
  page.off('request', count);

  // A token that is revoked while the dashboard is open: the next refresh signs out with a message.
  const second = await api(server, 'POST', '/tokens', { name: 'soon revoked' });
  await signInWith(second.token);
  await page.getByRole('heading', { name: 'Environments' }).waitFor();
  await api(server, 'DELETE', `/tokens/${second.id}`);
  await page.getByText('Signed out: the server refused the token').waitFor({ timeout: 15_000 });
  assert.equal(await page.locator('#nav').isHidden(), true);

  // The keyboard alone: type the token, Enter, then Tab to "Sessions" and back.
  await page.getByLabel('Admin token').focus();
  await page.keyboard.type(server.adminToken);
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Environments' }).waitFor();
  expectedFailures = [];
  let focused = '';
  for (let i = 0; i < 10 && focused !== 'Sessions'; i += 1) {
    await page.keyboard.press('Tab');
    focused = await page.evaluate(() => document.activeElement?.textContent ?? '');
  }
  assert.equal(focused, 'Sessions', 'the Sessions link is reachable with Tab');
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'Sessions' }).waitFor();
  assert.equal(await page.evaluate(() => window.__loaded), true, 'no reload');
  noProblems();
});

test('2. create an environment and a key through the UI; the key is shown once with a copy button', async () => {
  await page.getByRole('navigation').getByRole('link', { name: 'Environments' }).click();
  await page.getByLabel('New self-hosted environment').fill(`laptop-${marker}`);
  await page.getByRole('button', { name: 'Create environment' }).click();
  await page.getByRole('heading', { name: `laptop-${marker}`, level: 1 }).waitFor();
  const envId = decodeURIComponent(new URL(page.url()).hash.split('/')[2]);
  assert.match(envId, /^env_[0-9a-f]{32}$/);
  await page.getByLabel('Key name (optional)').fill('ci-worker');
  await page.getByRole('button', { name: 'Create key' }).click();
  const token = (await page.locator('#new-key-token').textContent()).trim();
  assert.match(token, /^tth_env_/);
  await page.getByRole('button', { name: 'Copy' }).click();
  await page.getByRole('button', { name: 'Copied' }).waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), token);
  await page.getByRole('region', { name: 'Environment keys' }).getByText('ci-worker').waitFor();
  const keys = await api(server, 'GET', `/environments/${envId}/keys`);
  assert.equal(keys.data.length, 1);
  assert.equal(keys.data[0].name, 'ci-worker');
  env = { id: envId, key: token };
  noProblems();
});

test('4 (first half). a session with a message queues an item, seen queued in the live list', async () => {
  await page.getByRole('navigation').getByRole('link', { name: 'Sessions' }).click();
  await page.getByLabel('New agent', { exact: true }).fill('shell');
  await page.getByRole('button', { name: 'Create agent' }).click();
  await until('the agent to be selectable', async () => (await page.getByLabel('Agent', { exact: true }).inputValue()) !== '');
  await page.getByLabel('Environment', { exact: true }).selectOption(env.id);
  await page.getByLabel('Title (optional)').fill(`first-${marker}`);
  await page.getByLabel('First message (optional)').fill(`echo hello-${marker}`);
  await page.getByRole('button', { name: 'Create session' }).click();
  await page.getByRole('heading', { name: `first-${marker}` }).waitFor();
  sessionId = decodeURIComponent(new URL(page.url()).hash.split('/')[2]);

  await page.goto(`${server.base}/#/environments/${env.id}`);
  await page.evaluate(() => { window.__loaded = true; });
  const row = page.getByRole('region', { name: 'Work items' }).locator('tbody tr').first();
  await row.locator('.badge', { hasText: 'queued' }).waitFor();
  // Record every state the list shows from now on, as the page renders it.
  await page.evaluate(() => {
    window.__states = [];
    const look = () => {
      const state = document.querySelector('[aria-label="Work items"] tbody tr .badge')?.textContent;
      if (state && window.__states[window.__states.length - 1] !== state) window.__states.push(state);
    };
    new MutationObserver(look).observe(document.querySelector('main'), { childList: true, subtree: true });
    look();
  });
  env.workId = await row.locator('a').first().getAttribute('title');
  noProblems();
});

test('3. a real tether worker with the shell agent starts and shows up among the workers', async () => {
  worker = startWorker(server, env.id, env.key, { TETHER_AGENT_MAX_IDLE: '4s' });
  await page.getByRole('region', { name: 'Workers' }).locator('tbody tr .mono').first().waitFor({ timeout: 30_000 });
  assert.equal(worker.exited(), false, worker.log());
  noProblems();
});

test('4 (second half). the item goes queued → active → stopped in the live list without a reload (starting, which lasts milliseconds, is in the timeline of 5)', async () => {
  await until('the item to stop', async () => (await page.evaluate(() => window.__states)).includes('stopped'), 60_000);
  const states = await page.evaluate(() => window.__states);
  const order = ['queued', 'starting', 'active', 'stopping', 'stopped'];
  assert.equal(states[0], 'queued', states.join(' → '));
  assert.equal(states[states.length - 1], 'stopped', states.join(' → '));
  assert.ok(states.includes('active'), `active was shown: ${states.join(' → ')}`);
  for (let i = 1; i < states.length; i += 1) {
    assert.ok(order.indexOf(states[i]) > order.indexOf(states[i - 1]), `states only move forward: ${states.join(' → ')}`);
  }
  assert.equal(await page.evaluate(() => window.__loaded), true, 'no reload');
  console.log(`dashboard: the list showed ${states.join(' → ')}`);
  await page.locator('#workers-h').scrollIntoViewIfNeeded();
  await shot('environment');
  noProblems();
});

test('5. the history of that item: a timeline with causes, and its metadata', async () => {
  await page.getByRole('region', { name: 'Work items' }).getByRole('link', { name: /work_/ }).first().click();
  await page.getByRole('heading', { name: /Work item/ }).waitFor();
  const timeline = page.locator('ol.timeline');
  await timeline.locator('li').last().locator('.move .badge', { hasText: 'stopped' }).last().waitFor();
  const causes = await timeline.locator('.cause').allTextContents();
  for (const cause of ['enqueued', 'delivered', 'acked', 'first_heartbeat']) {
    assert.ok(causes.includes(cause), `${cause} in ${causes}`);
  }
  const targets = await timeline.locator('li').evaluateAll((items) => items.map((li) => li.className.replace('to-', '')));
  assert.equal(targets[0], 'queued');
  assert.ok(targets.indexOf('starting') < targets.indexOf('active'), targets.join(','));
  assert.equal(targets[targets.length - 1], 'stopped');
  await page.getByRole('region', { name: 'Metadata' }).getByText('tether.exit_code').waitFor();
  // Times in the viewer's zone (the browser runs in Asia/Kolkata, UTC+5:30), not the server's UTC.
  const created = await page.locator('time').first().getAttribute('datetime');
  const shown = await page.locator('time').first().textContent();
  assert.match(shown, /GMT\+5:30/, shown);
  const local = new Date(Date.parse(created) + 330 * 60_000);
  const hh = local.getUTCHours() % 12 || 12;
  assert.ok(shown.includes(`${String(hh).padStart(2, '0')}:${String(local.getUTCMinutes()).padStart(2, '0')}`),
    `${created} shown as ${shown}`);
  await shot('work-item');
  noProblems();
});

test('7 and 8. the session view streams the agent\'s answer live; markup in names and text stays text', async () => {
  await page.getByRole('link', { name: sessionId }).click();
  await page.getByText('Live: new events appear as they happen.').waitFor();
  await page.evaluate(() => { window.__loaded = true; });
  const probe = `echo '<b>bold-${marker}</b><script>window.__xss=3</script>'`;
  await page.getByLabel('Message (Ctrl+Enter sends)').fill(probe);
  await page.getByRole('button', { name: 'Send' }).click();
  const answer = page.locator('.ev-agent-tool_result .event-text', { hasText: `bold-${marker}` });
  await answer.waitFor({ timeout: 60_000 });
  assert.equal((await answer.textContent()).trim(), `<b>bold-${marker}</b><script>window.__xss=3</script>`);
  await page.locator('.ev-session-status_idle').last().waitFor();
  assert.equal(await page.evaluate(() => window.__loaded), true, 'no reload: the answer came over the stream');
  assert.equal(await page.locator('main b, main script').count(), 0, 'no element was made from event text');
  await shot('session');

  // 8. An environment named with markup: shown as those characters everywhere, never run.
  await page.getByRole('navigation').getByRole('link', { name: 'Environments' }).click();
  await page.getByLabel('New self-hosted environment').fill(XSS_NAME);
  await page.getByRole('button', { name: 'Create environment' }).click();
  await page.getByRole('heading', { name: XSS_NAME, level: 1 }).waitFor();
  await page.getByRole('navigation').getByRole('link', { name: 'Environments' }).click();
  await page.getByRole('link', { name: XSS_NAME }).waitFor();
  assert.equal(await page.locator('main img, main script').count(), 0);
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  await shot('overview');
  noProblems();
});

test('an event of hundreds of kilobytes is shown cut, saying how much is left out', async () => {
  const text = `${marker}-${'z'.repeat(300_000)}`;
  await api(server, 'POST', `/sessions/${sessionId}/events`, {
    events: [{ type: 'agent.message', content: [{ type: 'text', text }] }],
  });
  await page.goto(`${server.base}/#/sessions/${sessionId}`);
  const shown = page.locator('.ev-agent-message .event-text', { hasText: `${marker}-zzz` });
  await shown.waitFor({ timeout: 30_000 });
  const seen = await shown.textContent();
  assert.ok(seen.length < 9_000, `${seen.length} characters shown`);
  assert.match(seen, /… 29\d,\d{3} more characters \(the API has the whole event\)$/);
  noProblems();
});

test('6. a force-stop from the UI reaches the worker: its program is terminated', async () => {
  await page.goto(`${server.base}/#/sessions/${sessionId}`);
  await page.getByText('Live: new events appear as they happen.').waitFor();
  await page.getByLabel('Message (Ctrl+Enter sends)').fill(`sleep 60 # ${marker}`);
  await page.getByLabel('Message (Ctrl+Enter sends)').press('Control+Enter');
  await page.locator('.ev-agent-tool_use .event-text', { hasText: `sleep 60 # ${marker}` }).waitFor({ timeout: 60_000 });
  const program = await until('the shell agent to run under the worker',
    () => descendantsOf(worker.pid).find((c) => c.comm.startsWith('tether-shell')));

  await page.goto(`${server.base}/#/environments/${env.id}`);
  await page.getByLabel('Show').selectOption('active');
  // A row that shows the item active: until the filtered page arrives, the list still holds the stopped
  // items of the earlier scenarios.
  const link = page.getByRole('region', { name: 'Work items' }).getByRole('row')
    .filter({ has: page.locator('.badge.state-active') }).getByRole('link', { name: /work_/ }).first();
  await link.waitFor();
  await link.click();
  await page.getByRole('button', { name: 'Force-stop…' }).click();
  const dialog = page.getByRole('dialog');
  await dialog.getByText('the worker kills its program').waitFor();
  await dialog.getByRole('button', { name: 'Force-stop' }).click();
  await page.getByText('Force-stopped: the item is now stopped.').waitFor();
  await page.locator('ol.timeline .cause', { hasText: 'force_stopped' }).waitFor();
  // An operator's stop: a message sent now gets the session's next item, which is held until the
  // stopped lease's end, since the program may still be running.
  await api(server, 'POST', `/sessions/${sessionId}/events`,
    { events: [{ type: 'user.message', content: [{ type: 'text', text: 'true' }] }] });
  const next = await until('the session\'s next item', async () => {
    const listed = await api(server, 'GET', `/environments/${env.id}/work?state=queued&limit=100`);
    return listed.data.find((item) => item.data.id === sessionId);
  });
  const history = await api(server, 'GET', `/environments/${env.id}/work/${next.id}/history`);
  assert.match(history.data[0].detail ?? '', /^held until /, JSON.stringify(history.data[0]));
  // The worker learns of it from its next heartbeat (every 5 s with --ttl 10) and kills the program.
  await until('the program to be terminated', () => !descendantsOf(worker.pid).some((c) => c.pid === program.pid), 30_000);
  assert.equal(worker.exited(), false, 'the worker itself keeps running');
  noProblems();
});

/** Every visible text of the page against its background: WCAG AA (4.5:1, 3:1 for large text). */
function contrastProblems() {
  return page.evaluate(() => {
    const rgb = (text) => text.match(/[\d.]+/g).map(Number);
    const luminance = ([r, g, b]) => {
      const lin = (c) => { const v = c / 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
      return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
    };
    const background = (element) => {
      for (let e = element; e; e = e.parentElement) {
        const c = rgb(getComputedStyle(e).backgroundColor);
        if (c.length < 4 || c[3] === 1) return c.slice(0, 3);
      }
      return [255, 255, 255];
    };
    const problems = [];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const element = node.parentElement;
      if (!node.textContent.trim() || !element.checkVisibility() || element.closest('button:disabled, svg, .visually-hidden')) continue;
      const style = getComputedStyle(element);
      const fg = luminance(rgb(style.color));
      const bg = luminance(background(element));
      const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
      const size = parseFloat(style.fontSize);
      const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
      if (ratio < (large ? 3 : 4.5)) problems.push(`${ratio.toFixed(2)}:1 "${node.textContent.trim().slice(0, 40)}"`);
    }
    return problems;
  });
}

test('keys: revoke one after a confirmation; sessions: listed with their status', async () => {
  await page.goto(`${server.base}/#/environments/${env.id}`);
  await page.getByLabel('Key name (optional)').fill('spare');
  await page.getByRole('button', { name: 'Create key' }).click();
  await page.locator('#new-key-token').waitFor();
  const keys = page.getByRole('region', { name: 'Environment keys' });
  const spare = keys.locator('tr', { hasText: 'spare' });
  await spare.getByRole('button', { name: 'Revoke' }).click();
  const dialog = page.getByRole('dialog');
  await dialog.getByRole('button', { name: 'Cancel' }).click();
  assert.equal(await spare.getByRole('button', { name: 'Revoke' }).count(), 1, 'cancel revokes nothing');
  await spare.getByRole('button', { name: 'Revoke' }).click();
  await dialog.getByRole('button', { name: 'Revoke key' }).press('Enter');
  await spare.getByText('revoked').waitFor();
  await keys.locator('tr', { hasText: 'ci-worker' }).getByText('active').waitFor();
  const listed = await api(server, 'GET', `/environments/${env.id}/keys`);
  assert.ok(listed.data.find((k) => k.name === 'spare').revoked_at);
  assert.equal(listed.data.find((k) => k.name === 'ci-worker').revoked_at, null);

  await page.getByRole('navigation').getByRole('link', { name: 'Sessions' }).click();
  const row = page.getByRole('region', { name: 'Sessions' }).locator('tr', { hasText: `first-${marker}` });
  await row.locator('.badge').waitFor();
  assert.match(await row.locator('.badge').textContent(), /^(idle|running)$/);
  await shot('sessions');
  noProblems();
});

test('text meets WCAG AA contrast on every main view', async () => {
  for (const hash of ['#/', `#/environments/${env.id}`, `#/environments/${env.id}/work/${env.workId}`, '#/sessions', `#/sessions/${sessionId}`]) {
    await page.goto(`${server.base}/${hash}`);
    await page.locator('main h1').first().waitFor();
    await page.waitForLoadState('networkidle');
    await page.waitForTimeout(300);
    assert.deepEqual(await contrastProblems(), [], hash);
  }
  noProblems();
});

test('usable at phone width: nothing but tables scrolls sideways', async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  for (const hash of ['#/', `#/environments/${env.id}`, `#/sessions/${sessionId}`]) {
    await page.goto(`${server.base}/${hash}`);
    await page.locator('main h1').first().waitFor();
    await page.waitForLoadState('networkidle');
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `${hash} overflows by ${overflow} px`);
  }
  await page.goto(`${server.base}/#/`);
  await page.locator('.card.env').first().waitFor();
  await shot('overview-phone');
  await page.setViewportSize({ width: 1280, height: 800 });
  noProblems();
});

test('the work list of an environment holding 10,000 items', async () => {
  const big = await api(server, 'POST', '/environments', { name: 'ten thousand', config: { type: 'self_hosted' } });
  const agent = await api(server, 'POST', '/agents', { name: 'bulk', model: 'none' });
  const total = 10_000;
  let next = 0;
  const started = Date.now();
  await Promise.all(Array.from({ length: 16 }, async () => {
    while (next < total) {
      next += 1;
      try {
        await api(server, 'POST', '/sessions', { agent: agent.id, environment_id: big.id });
      } catch (e) {
        next = total; // the other loops stop too, rather than outlive the test
        throw e;
      }
    }
  }));
  const seeded = Date.now() - started;
  const stats = await api(server, 'GET', `/environments/${big.id}/work/stats`);
  assert.equal(stats.depth, total);

  const measure = async (prepare) => page.evaluate(async ([hash, state]) => {
    const t0 = performance.now();
    location.hash = hash;
    let rows = [];
    while (performance.now() - t0 < 30_000) {
      rows = document.querySelectorAll('[aria-label="Work items"] tbody tr .badge');
      if (rows.length === 50 && (!state || document.querySelector('select[name=state]').value === state)) {
        return performance.now() - t0;
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    throw new Error(`the work list showed ${rows.length} rows, not 50, after 30 s`);
  }, prepare);
  await page.goto(`${server.base}/#/`);
  await page.locator('main h1').waitFor();
  const cold = await measure([`#/environments/${big.id}`, '']);
  await page.goto(`${server.base}/#/`);
  await page.locator('main h1').waitFor();
  const warm = await measure([`#/environments/${big.id}`, '']);
  console.log(`dashboard: seeded ${total} work items in ${(seeded / 1000).toFixed(1)} s; ` +
    `work list of ${total} items shown in ${cold.toFixed(0)} ms (first), ${warm.toFixed(0)} ms (again), ` +
    'from navigation to 50 rendered rows, headless Chromium');

  // The pager, backwards from the newest page: each page is the 50 items before the last one's
  // first, and Earlier is offered until the oldest item is on the page.
  const ids = [];
  for (let cursor = null; ;) {
    const listed = await api(server, 'GET', `/environments/${big.id}/work?limit=100${cursor ? `&page=${cursor}` : ''}`);
    ids.push(...listed.data.map((i) => i.id));
    if (!listed.has_more) break;
    cursor = listed.next_page;
  }
  assert.equal(ids.length, total);
  const shown = () => page.evaluate(() => [...document.querySelectorAll('[aria-label="Work items"] tbody tr td:first-child [title]')]
    .map((e) => e.getAttribute('title')));
  const button = (name) => page.getByRole('button', { name, exact: true });
  const showsPage = async (expected) => until('the page of the pager', async () =>
    JSON.stringify(await shown()) === JSON.stringify(expected));
  // The page opens on the newest items.
  await showsPage(ids.slice(total - 50));
  assert.equal(await button('Newest').isDisabled(), true);
  assert.equal(await button('Later').isDisabled(), true);
  assert.equal(await button('Earlier').isDisabled(), false);
  await button('Earlier').click();
  await showsPage(ids.slice(total - 100, total - 50));
  assert.equal(await button('Later').isDisabled(), false);
  await button('Later').click();
  await showsPage(ids.slice(total - 50));
  // A backward page that reaches the oldest item offers nothing earlier.
  await button('Oldest').click();
  await showsPage(ids.slice(0, 50));
  await button('Later').click();
  await showsPage(ids.slice(50, 100));
  await button('Earlier').click();
  await showsPage(ids.slice(0, 50));
  assert.equal(await button('Earlier').isDisabled(), true, 'nothing precedes the oldest item');
  noProblems();
});

test('a cloud environment\'s page asks nothing of a queue; a link that is not well encoded shows a message; a form offers every environment', async () => {
  // A cloud environment: its card names it without a link, and its page (sessions link to it) says
  // that it has no queue instead of asking for one every 2 s.
  const cloud = await api(server, 'POST', '/environments', { name: `cloud-${marker}`, config: { type: 'cloud' } });
  const queueRequests = [];
  const count = (request) => { if (request.url().includes(`/environments/${cloud.id}/work`)) queueRequests.push(request.url()); };
  page.on('request', count);
  await page.goto(`${server.base}/#/environments/${cloud.id}`);
  await page.getByRole('heading', { name: `cloud-${marker}` }).waitFor();
  await page.getByText('A cloud environment: it has no work queue.').waitFor();
  page.off('request', count);
  assert.deepEqual(queueRequests, [], 'no request for a queue it does not have');

  // A link whose id is not well %-encoded: the page says what the server said, not a blank.
  expectedFailures = [{ text: 'status of 404', path: '/api/v1/cloud/sessions/' }];
  await page.goto(`${server.base}/#/sessions/sess_%zz`);
  await page.getByRole('alert').filter({ hasText: 'no session sess_%zz' }).first().waitFor();
  expectedFailures = [];

  // More environments than one page holds: the session form offers the newest too.
  let newest;
  for (let i = 0; i < 101; i += 1) {
    newest = await api(server, 'POST', '/environments', { name: `many-${i}`, config: { type: 'self_hosted' } });
  }
  await page.goto(`${server.base}/#/sessions`);
  const choices = page.getByRole('combobox', { name: 'Environment' });
  await choices.locator(`option[value="${newest.id}"]`).waitFor({ state: 'attached' });
  assert.equal(await choices.locator(`option[value="${cloud.id}"]`).count(), 0, 'no cloud environment is offered');
  noProblems();
});

test('a session or work item that does not exist says so in its page, offers nothing, and its message stays with it', async () => {
  const missingSession = 'sess_01a242b0fb1a72ac8a84e902533b8cf7';
  const missingWork = 'work_01a242b0fb1a72ac8a84e902533b8cf7';
  expectedFailures = [{ text: 'status of 404', path: '/api/v1/cloud/' }];
  await page.goto(`${server.base}/#/sessions/${missingSession}`);
  await page.getByRole('alert').filter({ hasText: `no session ${missingSession}` }).first().waitFor();
  assert.equal(await page.getByRole('button', { name: 'Send' }).count(), 0, 'no form to send to a session that is not there');
  assert.equal(await page.getByText('Connecting…').count(), 0, 'no stream is waited for');

  await page.goto(`${server.base}/#/environments/${env.id}/work/${missingWork}`);
  await page.getByRole('alert').filter({ hasText: missingWork }).first().waitFor();
  assert.equal(await page.getByRole('button', { name: 'Stop…', exact: true }).isDisabled(), true);
  assert.equal(await page.getByRole('button', { name: 'Force-stop…' }).isDisabled(), true);

  // Another view: the item's message does not follow.
  await page.goto(`${server.base}/#/`);
  await page.getByRole('heading', { name: 'Environments' }).waitFor();
  await until('the last view\'s messages to go', async () => (await page.getByRole('alert').count()) === 0);
  expectedFailures = [];
  noProblems();
});

test('a server that goes away shows as a message, not a blank', async () => {
  await page.goto(`${server.base}/#/environments/${env.id}`);
  await page.getByRole('region', { name: 'Work items' }).locator('tbody tr').first().waitFor();
  expectedFailures = [{ text: 'ERR_CONNECTION_REFUSED', path: '/api/v1/cloud/' }];
  await worker.stop();
  worker = undefined;
  await server.stop();
  await page.getByRole('alert').filter({ hasText: 'the server cannot be reached' }).first().waitFor({ timeout: 15_000 });
  assert.equal(await page.getByRole('region', { name: 'Work items' }).locator('tbody tr').count() > 0, true,
    'what was shown stays on screen');
  await shot('server-gone');
  noProblems();
});

test('9. no console error and no request to another origin in any scenario', () => {
  noProblems();
});
