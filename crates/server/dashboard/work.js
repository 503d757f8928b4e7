// An environment's page (its queue, work items, workers and keys) and a work item's page.

import * as api from './api.js';
import { h, fill, field, table } from './dom.js';
import { localTime, ago, shortId, zone } from './format.js';
import { queueChart, legend } from './chart.js';
import { statsList, CLOUD_NOTE } from './views.js';
import { notify, confirmAction, onSubmit } from './app.js';

/** Refresh period of the live views. */
const LIVE_MS = 2000;
/** Work items per page (the API allows up to 100). */
const WORK_PAGE = 50;
/** A well-formed work id after every real one: `before_id` of it is the newest page (D-4). */
const AFTER_EVERY_ID = `work_${'f'.repeat(32)}`;
const STATES = ['queued', 'starting', 'active', 'stopping', 'stopped'];

function idCell(id, href) {
  const text = shortId(id);
  return href ? h('a', { href, title: id, class: 'mono' }, text) : h('span', { title: id, class: 'mono' }, text);
}

function time(iso) {
  return iso ? h('time', { datetime: iso }, localTime(iso)) : '—';
}

export function stateBadge(state) {
  return h('span', { class: `badge state-${state}` }, state);
}

function workHref(envId, workId) {
  return `#/environments/${api.seg(envId)}/work/${api.seg(workId)}`;
}

function sessionHref(sessionId) {
  return `#/sessions/${api.seg(sessionId)}`;
}

/** Item id → worker id, for the items workers hold (GET …/workers, §11.4). */
function holders(workers) {
  const map = new Map();
  for (const w of workers.data) for (const item of w.items) map.set(item.id, w.worker_id);
  return map;
}

// ---------------------------------------------------------------------------------- environment page

function environmentCrumbs(envId) {
  return h('p', { class: 'crumbs' }, h('a', { href: '#/' }, 'Environments'), ' / ', h('span', {}, envId));
}

export function environmentPage(main, ctx, envId) {
  fill(main, environmentCrumbs(envId), h('h1', {}, 'Environment'), h('p', { class: 'muted' }, 'Loading…'));
  // A cloud environment has no queue to show (its queue's endpoints refuse it): its page says so and
  // polls nothing. Sessions link to their environment whichever kind it is.
  api.get(`/environments/${api.seg(envId)}`, { signal: ctx.signal }).then((env) => {
    if (!ctx.active) return;
    if (env.config?.type === 'self_hosted') {
      queuePage(main, ctx, envId);
    } else {
      document.title = `${env.name} · Tether`;
      fill(main, environmentCrumbs(envId), h('h1', {}, env.name), h('p', { class: 'muted' }, h('code', {}, envId)),
        h('p', {}, CLOUD_NOTE));
    }
  }, (e) => {
    if (!ctx.active || e.name === 'AbortError') return;
    fill(main, environmentCrumbs(envId), h('h1', {}, 'Environment'), h('p', { role: 'alert' }, e.message));
  });
}

function queuePage(main, ctx, envId) {
  const base = `/environments/${api.seg(envId)}`;
  const title = h('h1', {}, 'Environment');
  const idLine = h('p', { class: 'muted' }, h('code', {}, envId));
  const stats = h('div', {});
  const chart = h('figure', {});
  const work = h('div', {});
  const pager = h('div', { class: 'pager', role: 'group', 'aria-label': 'Work item pages' });
  const position = h('p', { class: 'muted', 'aria-live': 'polite' });
  const workers = h('div', {});
  const keys = h('div', {});
  const newKey = h('div', { 'aria-live': 'polite' });

  // The list's position: the newest page by default, where new items appear.
  let cursor = { before: AFTER_EVERY_ID };
  let stateFilter = '';
  const filter = h('select', { name: 'state' },
    h('option', { value: '' }, 'all states'),
    STATES.map((s) => h('option', { value: s }, s)));
  filter.addEventListener('change', () => {
    stateFilter = filter.value;
    cursor = { before: AFTER_EVERY_ID };
    refreshWork().catch((e) => notify(e.message, { key: 'work' }));
  });

  fill(main,
    environmentCrumbs(envId),
    title, idLine,
    h('section', { 'aria-labelledby': 'queue-h' }, h('h2', { id: 'queue-h' }, 'Queue'), stats, chart),
    h('section', { 'aria-labelledby': 'work-h' },
      h('div', { class: 'title-row' }, h('h2', { id: 'work-h' }, 'Work items'),
        h('p', { class: 'muted' }, `Live: refreshed every ${LIVE_MS / 1000} s. Times in ${zone}.`)),
      h('div', { class: 'toolbar' }, field('Show', filter), pager), position, work),
    h('section', { 'aria-labelledby': 'workers-h' }, h('h2', { id: 'workers-h' }, 'Workers'),
      h('p', { class: 'muted' }, 'Workers seen polling in the last 5 minutes.'), workers),
    h('section', { 'aria-labelledby': 'keys-h' }, h('h2', { id: 'keys-h' }, 'Environment keys'),
      h('p', { class: 'muted' }, 'A key lets a worker take this environment\'s work and nothing else.'),
      keyForm(), newKey, keys));

  async function refreshQueue() {
    const [env, s, history] = await Promise.all([
      api.get(base, { signal: ctx.signal }),
      api.get(`${base}/work/stats`, { signal: ctx.signal }),
      api.get(`${base}/work/stats/history`, { signal: ctx.signal }),
    ]);
    fill(title, env.name);
    document.title = `${env.name} · Tether`;
    fill(stats, statsList(s));
    fill(chart, queueChart(history.data, env.name, chart.clientWidth || 600), h('figcaption', {}, legend(), '(last hour)'));
  }

  async function refreshWork() {
    const started = performance.now();
    const backward = Boolean(cursor.before);
    // A page read backwards asks for one item more: `has_more` tells what follows a page in queue
    // order (§1.8), so that extra item, the earliest, is what tells whether an earlier page exists.
    const limit = backward ? WORK_PAGE + 1 : WORK_PAGE;
    const params = { limit, state: stateFilter, after_id: cursor.after, before_id: cursor.before };
    const [page, seen] = await Promise.all([
      api.get(`${base}/work${api.query(params)}`, { signal: ctx.signal }),
      api.get(`${base}/workers`, { signal: ctx.signal }),
    ]);
    if (!ctx.active) return;
    const held = holders(seen);
    const now = Date.now();
    const beyond = backward && page.data.length > WORK_PAGE;
    const items = beyond ? page.data.slice(1) : page.data;
    const firstId = items.length ? items[0].id : null;
    const lastId = items.length ? items[items.length - 1].id : null;
    fill(work, table('Work items', [
      ['Item', (i) => idCell(i.id, workHref(envId, i.id))],
      ['State', (i) => stateBadge(i.state)],
      ['Age', (i) => ago(i.created_at, now)],
      ['Holder', (i) => held.get(i.id) ?? '—'],
      ['Last heartbeat', (i) => (i.latest_heartbeat_at ? [time(i.latest_heartbeat_at), ` (${ago(i.latest_heartbeat_at, now)} ago)`] : '—')],
      ['Deliveries', (i) => String(i.delivery_count ?? 0)],
      ['Requeues', (i) => String(i.requeue_count ?? 0)],
      ['Session', (i) => idCell(i.data.id, sessionHref(i.data.id))],
    ], items, stateFilter ? `No ${stateFilter} items on this page.` : 'No work items.'));
    work.dataset.renderedMs = String(Math.round(performance.now() - started));
    const atNewest = cursor.before === AFTER_EVERY_ID;
    const atOldest = !cursor.before && !cursor.after;
    const earlier = backward ? beyond : !atOldest && items.length > 0;
    const later = backward ? !atNewest && items.length > 0 : page.has_more;
    const move = (next) => () => {
      cursor = next;
      refreshWork().catch((e) => notify(e.message, { key: 'work' }));
    };
    fill(pager,
      h('button', { type: 'button', disabled: atOldest, onclick: move({}) }, 'Oldest'),
      h('button', { type: 'button', disabled: !earlier, onclick: move({ before: firstId }) }, 'Earlier'),
      h('button', { type: 'button', disabled: !later, onclick: move({ after: lastId }) }, 'Later'),
      h('button', { type: 'button', disabled: atNewest, onclick: move({ before: AFTER_EVERY_ID }) }, 'Newest'));
    fill(position, items.length
      ? `Items ${shortId(firstId)} to ${shortId(lastId)} in queue order, ${WORK_PAGE} a page` +
        `${atNewest ? ' (the newest)' : ''}.`
      : '');
    fill(workers, table('Workers', [
      ['Worker', (w) => h('span', { class: 'mono' }, w.worker_id)],
      ['Last poll', (w) => [time(w.last_poll_at), ` (${ago(w.last_poll_at, now)} ago)`]],
      ['Items held', (w) => (w.items.length
        ? w.items.map((i) => [idCell(i.id, workHref(envId, i.id)), ' ', stateBadge(i.state), ' '])
        : 'none')],
    ], seen.data, 'No worker has polled in the last 5 minutes.'));
  }

  async function refreshKeys() {
    const page = await api.get(`${base}/keys?limit=100`, { signal: ctx.signal });
    fill(keys, table('Environment keys', [
      ['Name', (k) => k.name ?? '—'],
      ['Id', (k) => h('span', { class: 'mono' }, k.id)],
      ['Hint', (k) => (k.hint ? h('span', { class: 'mono' }, k.hint) : '—')],
      ['Created', (k) => time(k.created_at)],
      ['Status', (k) => (k.revoked_at ? ['revoked ', time(k.revoked_at)] : 'active')],
      ['', (k) => (k.revoked_at ? '' : h('button', { type: 'button', class: 'danger', onclick: () => revoke(k) }, 'Revoke'))],
    ], page.data, 'No keys yet.'));
  }

  async function revoke(key) {
    const ok = await confirmAction(`Revoke key ${key.name ?? key.id}?`,
      'Workers using it are refused from their next request on. This cannot be undone.', 'Revoke key');
    if (!ok) return;
    try {
      await api.del(`${base}/keys/${api.seg(key.id)}`, { signal: ctx.signal });
      notify(`Key ${key.name ?? key.id} revoked.`, { kind: 'info', key: 'keys' });
      await refreshKeys();
    } catch (e) {
      notify(`Could not revoke the key: ${e.message}`, { key: 'keys' });
    }
  }

  function keyForm() {
    const name = h('input', { type: 'text', name: 'key-name', maxlength: 200, placeholder: 'e.g. laptop' });
    const button = h('button', { type: 'submit' }, 'Create key');
    const form = h('form', { class: 'inline-form', 'aria-label': 'Create an environment key' },
      field('Key name (optional)', name), button);
    onSubmit(form, button, { key: 'keys', what: 'create the key' },
      () => api.post(`${base}/keys`, name.value ? { name: name.value } : {}, { signal: ctx.signal }),
      async (created) => {
        name.value = '';
        showNewKey(created);
        await refreshKeys();
      });
    return form;
  }

  function showNewKey(created) {
    const secret = h('code', { class: 'secret', id: 'new-key-token' }, created.token);
    const copy = h('button', { type: 'button' }, 'Copy');
    copy.addEventListener('click', async () => {
      try {
        await navigator.clipboard.writeText(created.token);
        fill(copy, 'Copied');
      } catch {
        getSelection().selectAllChildren(secret);
        notify('The browser did not allow copying: the key is selected, copy it with the keyboard.', { key: 'keys' });
      }
    });
    fill(newKey, h('div', { class: 'card new-key', role: 'status' },
      h('p', {}, h('strong', {}, 'New key — shown only this once. '), 'Give it to the worker: ',
        h('code', {}, 'tether worker --environment ', envId, ' --key … -- PROGRAM')),
      h('div', { class: 'secret-row' }, secret, copy),
      h('button', { type: 'button', class: 'link', onclick: () => fill(newKey) }, 'Hide')));
    copy.focus();
  }

  ctx.every(LIVE_MS, refreshQueue, 'queue');
  ctx.every(LIVE_MS, refreshWork, 'work');
  refreshKeys().catch((e) => notify(e.message, { key: 'keys' }));
}

// ----------------------------------------------------------------------------------- work item page

/** Largest history shown: 10 pages of 100 transitions. */
const HISTORY_PAGES = 10;

async function fullHistory(base, signal) {
  const rows = [];
  let page = '';
  let heartbeats = 0;
  for (let i = 0; i < HISTORY_PAGES; i += 1) {
    const got = await api.get(`${base}/history${api.query({ limit: 100, page })}`, { signal });
    rows.push(...got.data);
    heartbeats = got.heartbeat_count ?? heartbeats;
    if (!got.has_more) return { rows, heartbeats, complete: true };
    page = got.next_page;
  }
  return { rows, heartbeats, complete: false };
}

export function workItemPage(main, ctx, envId, workId) {
  const base = `/environments/${api.seg(envId)}/work/${api.seg(workId)}`;
  const summary = h('div', {});
  const metadata = h('div', {});
  const timeline = h('ol', { class: 'timeline', 'aria-live': 'polite' });
  const actions = h('div', { class: 'actions' });
  fill(main,
    h('p', { class: 'crumbs' }, h('a', { href: '#/' }, 'Environments'), ' / ',
      h('a', { href: `#/environments/${api.seg(envId)}` }, shortId(envId)), ' / ', h('span', {}, shortId(workId))),
    h('h1', {}, 'Work item ', h('code', {}, workId)),
    actions, summary,
    h('section', { 'aria-labelledby': 'history-h' }, h('h2', { id: 'history-h' }, 'History'),
      h('p', { class: 'muted' }, `Every state change with its cause, oldest first; times in ${zone}.`), timeline),
    h('section', { 'aria-labelledby': 'meta-h' }, h('h2', { id: 'meta-h' }, 'Metadata'), metadata));

  let state = null;
  async function stop(force) {
    const ok = await confirmAction(
      force ? `Force-stop ${shortId(workId)}?` : `Stop ${shortId(workId)}?`,
      force
        ? 'It is stopped at once; the worker kills its program on its next heartbeat, without a chance to finish.'
        : 'The worker is asked to finish and confirm; a queued item stops at once.',
      force ? 'Force-stop' : 'Stop');
    if (!ok) return;
    try {
      // The worker may still be running the program: its session's next item waits for the lease.
      const item = await api.post(`${base}/stop`, { force, hold_next_item: true }, { signal: ctx.signal });
      notify(`${force ? 'Force-stopped' : 'Stop requested'}: the item is now ${item.state}.`, { kind: 'info', key: 'stop' });
      await refresh();
    } catch (e) {
      notify(`Could not stop the item: ${e.message}`, { key: 'stop' });
    }
  }
  const stopButton = h('button', { type: 'button', onclick: () => stop(false) }, 'Stop…');
  const forceButton = h('button', { type: 'button', class: 'danger', onclick: () => stop(true) }, 'Force-stop…');
  // Until the item is read: a page of one that does not exist (or no longer) offers nothing to stop.
  stopButton.disabled = true;
  forceButton.disabled = true;
  fill(actions, stopButton, forceButton);

  async function refresh() {
    const [item, history, seen] = await Promise.all([
      api.get(base, { signal: ctx.signal }),
      fullHistory(base, ctx.signal),
      api.get(`/environments/${api.seg(envId)}/workers`, { signal: ctx.signal }),
    ]);
    if (!ctx.active) return;
    state = item.state;
    stopButton.disabled = state === 'stopped';
    forceButton.disabled = state === 'stopped';
    const row = (label, value) => [h('dt', {}, label), h('dd', {}, value)];
    fill(summary, h('dl', { class: 'fields' },
      row('State', stateBadge(item.state)),
      row('Session', h('a', { href: sessionHref(item.data.id), class: 'mono' }, item.data.id)),
      row('Holder', holders(seen).get(item.id) ?? '—'),
      row('Created', [time(item.created_at), ` (${ago(item.created_at)} ago)`]),
      row('Acknowledged', time(item.acknowledged_at)),
      row('Started', time(item.started_at)),
      row('Last heartbeat', time(item.latest_heartbeat_at)),
      row('Stop requested', time(item.stop_requested_at)),
      row('Stopped', time(item.stopped_at)),
      row('Deliveries', String(item.delivery_count ?? 0)),
      row('Requeues', String(item.requeue_count ?? 0)),
      row('Heartbeats', String(history.heartbeats))));
    const entries = Object.entries(item.metadata ?? {});
    fill(metadata, table('Metadata', [['Key', ([k]) => h('span', { class: 'mono' }, k)], ['Value', ([, v]) => v]],
      entries, 'No metadata.'));
    fill(timeline, history.rows.map((t) => h('li', { class: `to-${t.to}` },
      h('span', { class: 'when' }, time(t.at)), ' ',
      h('span', { class: 'move' }, t.from ? stateBadge(t.from) : 'new', ' → ', stateBadge(t.to)), ' ',
      h('span', { class: 'cause' }, t.cause),
      t.worker_id ? [' by ', h('span', { class: 'mono' }, t.worker_id)] : null,
      t.detail ? [' — ', t.detail] : null)),
    history.complete ? null : h('li', {}, `Only the first ${HISTORY_PAGES * 100} changes are shown.`));
  }
  ctx.every(LIVE_MS, refresh, 'item');
}
