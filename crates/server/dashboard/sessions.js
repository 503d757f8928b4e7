// Sessions: the list (and creating one), and a session's live view with a box to send a message.

import * as api from './api.js';
import { h, fill, field, table } from './dom.js';
import { localTime, shortId, zone } from './format.js';
import { notify, clearMessage, go, onSubmit } from './app.js';

const LIST_MS = 3000;
const LIST_PAGE = 50;
/** Events kept on screen; older ones are dropped from the page (the API still has them). */
const EVENTS_SHOWN = 1000;
/** Characters of one event's text shown: an event may be a megabyte, written by any worker of the
 * environment, and a thousand of them in full took a tab's memory to gigabytes. The rest is said,
 * and the API has it. */
const TEXT_SHOWN = 8 * 1024;

function time(iso) {
  return iso ? h('time', { datetime: iso }, localTime(iso)) : '—';
}

function statusBadge(status) {
  return h('span', { class: `badge status-${status}` }, status);
}

/** Most choices a form offers from one list. */
const MOST_CHOICES = 1000;

/** The items of a list, following its pages, up to MOST_CHOICES: a form offers every one, not the
 * first page's. */
async function options(path, signal) {
  const items = [];
  let page = '';
  do {
    const answer = await api.get(`${path}${api.query({ limit: 100, page })}`, { signal });
    items.push(...answer.data);
    page = answer.has_more ? answer.next_page : '';
  } while (page && items.length < MOST_CHOICES);
  return items;
}

function createForms(ctx, reload) {
  const agent = h('select', { name: 'agent', required: true });
  const env = h('select', { name: 'environment', required: true });
  const title = h('input', { type: 'text', name: 'title', maxlength: 200 });
  const message = h('textarea', { name: 'message', rows: 2 });
  const button = h('button', { type: 'submit' }, 'Create session');
  const session = h('form', { class: 'card', 'aria-labelledby': 'new-session-h' },
    h('h2', { id: 'new-session-h' }, 'New session'),
    h('div', { class: 'grid-form' }, field('Agent', agent), field('Environment', env), field('Title (optional)', title)),
    field('First message (optional)', message), button);
  onSubmit(session, button, { key: 'create-session', what: 'create the session' }, () => {
    const body = { agent: agent.value, environment_id: env.value };
    if (title.value) body.title = title.value;
    if (message.value.trim()) {
      body.initial_events = [{ type: 'user.message', content: [{ type: 'text', text: message.value }] }];
    }
    return api.post('/sessions', body, { signal: ctx.signal });
  }, (created) => go(`#/sessions/${api.seg(created.id)}`));

  const agentName = h('input', { type: 'text', name: 'agent-name', required: true, maxlength: 64 });
  const model = h('input', { type: 'text', name: 'model', required: true, value: 'none' });
  const agentButton = h('button', { type: 'submit' }, 'Create agent');
  const newAgent = h('form', { class: 'inline-form', 'aria-label': 'Create an agent' },
    field('New agent', agentName), field('Model', model), agentButton);
  onSubmit(newAgent, agentButton, { key: 'create-agent', what: 'create the agent' },
    () => api.post('/agents', { name: agentName.value, model: model.value }, { signal: ctx.signal }),
    async (created) => {
      agentName.value = '';
      await loadChoices(created.id);
    });

  async function loadChoices(selectAgent) {
    const [agents, envs] = await Promise.all([
      options('/agents', ctx.signal),
      options('/environments', ctx.signal),
    ]);
    fill(agent, agents.map((a) => h('option', { value: a.id, selected: a.id === selectAgent }, `${a.name} (${shortId(a.id)})`)));
    fill(env, envs.filter((x) => x.config?.type === 'self_hosted')
      .map((x) => h('option', { value: x.id }, `${x.name} (${shortId(x.id)})`)));
    button.disabled = !agents.length || !env.options.length;
  }
  loadChoices().catch((e) => notify(e.message, { key: 'choices' }));
  reload.choices = loadChoices;
  return [session, newAgent];
}

export function sessionsPage(main, ctx) {
  const list = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const pager = h('div', { class: 'pager' });
  let cursor = '';
  const reload = {};
  fill(main,
    h('div', { class: 'title-row' }, h('h1', {}, 'Sessions'),
      h('p', { class: 'muted' }, `Refreshes every ${LIST_MS / 1000} s. Times in ${zone}.`)),
    createForms(ctx, reload),
    h('section', { 'aria-label': 'Sessions' }, list, pager));
  const refresh = async () => {
    const page = await api.get(`/sessions${api.query({ limit: LIST_PAGE, page: cursor })}`, { signal: ctx.signal });
    if (!ctx.active) return;
    fill(list, table('Sessions', [
      ['Session', (x) => h('a', { href: `#/sessions/${api.seg(x.id)}`, class: 'mono', title: x.id }, shortId(x.id))],
      ['Title', (x) => x.title ?? '—'],
      ['Status', (x) => statusBadge(x.status)],
      ['Agent', (x) => x.agent?.name ?? x.agent_id],
      ['Environment', (x) => h('a', { href: `#/environments/${api.seg(x.environment_id)}`, class: 'mono' }, shortId(x.environment_id))],
      ['Created', (x) => time(x.created_at)],
    ], page.data, 'No sessions yet.'));
    fill(pager,
      cursor ? h('button', { type: 'button', onclick: () => { cursor = ''; refresh(); } }, 'First page') : null,
      page.has_more ? h('button', { type: 'button', onclick: () => { cursor = page.next_page; refresh(); } }, 'Next page') : null);
  };
  ctx.every(LIST_MS, refresh, 'sessions');
}

// ----------------------------------------------------------------------------------------- one session

function textOf(content) {
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) return content == null ? '' : JSON.stringify(content);
  return content.map((block) => (block?.type === 'text' ? block.text : JSON.stringify(block))).join('\n');
}

/** What an event says, as plain text. */
function describe(event) {
  switch (event.type) {
    case 'user.message':
    case 'agent.message':
    case 'agent.thinking':
      return textOf(event.content);
    case 'agent.tool_use':
    case 'agent.custom_tool_use':
      return `${event.name}: ${typeof event.input?.command === 'string' ? event.input.command : JSON.stringify(event.input)}`;
    case 'agent.tool_result':
    case 'user.tool_result':
    case 'user.custom_tool_result':
      return `${event.is_error ? '(error) ' : ''}${textOf(event.content)}`;
    case 'session.status_idle':
      return event.stop_reason?.type ?? '';
    case 'session.error':
      return event.error?.message ?? '';
    default:
      return '';
  }
}

function eventItem(event) {
  return h('li', { class: `event ev-${event.type.replace(/[^a-z_]/g, '-')}`, dataset: { id: event.id } },
    h('div', { class: 'event-head' }, h('span', { class: 'event-type' }, event.type), ' ', time(event.processed_at)),
    h('pre', { class: 'event-text' }, cut(describe(event))));
}

function cut(text) {
  if (text.length <= TEXT_SHOWN) return text;
  const left = text.length - TEXT_SHOWN;
  return `${text.slice(0, TEXT_SHOWN)}\n… ${left.toLocaleString('en')} more characters (the API has the whole event)`;
}

function sessionCrumbs(sessionId) {
  return h('p', { class: 'crumbs' }, h('a', { href: '#/sessions' }, 'Sessions'), ' / ', h('span', {}, shortId(sessionId)));
}

/** A session's page, once the session is read: one that does not exist says so in the page, with
 * nothing to send to and no stream to wait for. */
export function sessionPage(main, ctx, sessionId) {
  fill(main, sessionCrumbs(sessionId), h('h1', {}, 'Session'), h('p', { class: 'muted' }, 'Loading…'));
  api.get(`/sessions/${api.seg(sessionId)}`, { signal: ctx.signal }).then((session) => {
    if (ctx.active) sessionView(main, ctx, sessionId, session);
  }, (e) => {
    if (!ctx.active || e.name === 'AbortError') return;
    fill(main, sessionCrumbs(sessionId), h('h1', {}, 'Session'), h('p', { role: 'alert' }, e.message));
  });
}

function sessionView(main, ctx, sessionId, first) {
  const path = `/sessions/${api.seg(sessionId)}`;
  const title = h('h1', {}, 'Session');
  const facts = h('p', { class: 'muted' });
  const live = h('p', { class: 'live-status', role: 'status' }, 'Connecting…');
  const log = h('ol', { class: 'events', 'aria-label': 'Events', 'aria-live': 'polite' });
  const logBox = h('div', { class: 'event-box', tabindex: 0, role: 'region', 'aria-label': 'Session events' }, log);
  const text = h('textarea', { name: 'message', rows: 3, required: true });
  const send = h('button', { type: 'submit' }, 'Send');
  const cancel = h('button', { type: 'button', class: 'secondary' }, 'Interrupt');
  const form = h('form', { class: 'send', 'aria-label': 'Send a message' },
    field('Message (Ctrl+Enter sends)', text), h('div', { class: 'actions' }, send, cancel));
  fill(main, sessionCrumbs(sessionId), title, facts, live, logBox, form);

  const seen = new Set();
  function add(event) {
    if (seen.has(event.id)) return;
    seen.add(event.id);
    const stick = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 40;
    log.append(eventItem(event));
    while (log.children.length > EVENTS_SHOWN) {
      // Forgotten with it: the ids of a long-lived page's events would otherwise pile up.
      seen.delete(log.firstElementChild.dataset.id);
      log.firstElementChild.remove();
    }
    if (stick) logBox.scrollTop = logBox.scrollHeight;
  }

  async function post(body, what) {
    try {
      await api.post(path + what, body, { signal: ctx.signal });
      return true;
    } catch (error) {
      notify(`Could not ${what === '/cancel' ? 'interrupt the turn' : 'send the message'}: ${error.message}`, { key: 'send' });
      return false;
    }
  }
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (!text.value.trim()) return;
    send.disabled = true;
    const sent = await post({ events: [{ type: 'user.message', content: [{ type: 'text', text: text.value }] }] }, '/events');
    send.disabled = false;
    if (sent) {
      clearMessage('send');
      text.value = '';
    }
    text.focus();
  });
  text.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });
  cancel.addEventListener('click', () => post(undefined, '/cancel'));

  let read = first;
  ctx.every(LIST_MS, async () => {
    const s = read ?? await api.get(path, { signal: ctx.signal });
    read = null;
    fill(title, s.title || 'Session');
    fill(facts, h('code', {}, s.id), ' · ', h('span', { class: `badge status-${s.status}` }, s.status),
      ' · agent ', s.agent?.name ?? s.agent_id, ' · environment ',
      h('a', { href: `#/environments/${api.seg(s.environment_id)}` }, shortId(s.environment_id)),
      ' · created ', time(s.created_at));
  }, 'session');

  (async () => {
    // The newest events first (at most 100), then the live stream from the newest one on.
    const recent = await api.get(`${path}/events?limit=100&order=desc`, { signal: ctx.signal });
    if (!ctx.active) return;
    recent.data.slice().reverse().forEach(add);
    await api.follow(sessionId, {
      lastEventId: recent.data[0]?.id,
      signal: ctx.signal,
      onEvent: add,
      onStatus: (status, detail) => {
        fill(live, status === 'live' ? 'Live: new events appear as they happen.' : detail);
        if (status === 'live') clearMessage('stream');
        else if (status === 'retrying') notify(detail, { key: 'stream' });
      },
    });
  })().catch((e) => {
    if (e.name !== 'AbortError') notify(`Could not load the events: ${e.message}`, { key: 'stream' });
  });
}
