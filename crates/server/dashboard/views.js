// Sign-in and the environments overview.

import * as api from './api.js';
import { h, fill, field } from './dom.js';
import { localTime, ago, zone } from './format.js';
import { queueChart, legend } from './chart.js';
import { go, onSubmit } from './app.js';

/** Refresh period of the overview. */
const OVERVIEW_MS = 5000;
/** Environments shown on one page of the overview. */
const OVERVIEW_PAGE = 20;

export function signIn(main, ctx, signedIn) {
  const input = h('input', {
    type: 'password', name: 'token', autocomplete: 'off', spellcheck: 'false', required: true,
    placeholder: 'tth_adm_…',
  });
  const status = h('p', { class: 'form-status', role: 'alert' });
  const button = h('button', { type: 'submit' }, 'Sign in');
  const form = h('form', { class: 'card narrow', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to Tether'),
    h('p', {}, 'Paste an admin token (',
      h('code', {}, 'tether token create'),
      ', or the admin-token file the server wrote on its first start). It stays in this tab only ' +
      'and is sent with each request as a bearer header.'),
    field('Admin token', input), status, button);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const value = input.value.trim();
    fill(status);
    button.disabled = true;
    try {
      // The environment list needs an admin token: an environment key or a session token gets 403.
      await api.get('/environments?limit=1', { token: value, signal: ctx.signal });
      api.token.set(value);
      signedIn();
    } catch (error) {
      const why = error.status === 401
        ? 'The server does not know this token, or it has been revoked.'
        : error.status === 403
          ? 'This token is not an admin token (an environment key or session token cannot sign in).'
          : error.message;
      fill(status, `Sign-in failed: ${why}`);
    } finally {
      button.disabled = false;
    }
  });
  fill(main, form);
  input.focus();
}

function stat(label, value, cls) {
  return h('div', { class: `stat ${cls ?? ''}` }, h('dt', {}, label), h('dd', {}, String(value)));
}

/** The figures of one queue (§2.5, §11.3), as a definition list. */
export function statsList(stats) {
  const states = stats.states ?? {};
  return h('dl', { class: 'stats' },
    stat('Depth', stats.depth),
    stat('Pending', stats.pending),
    stat('Queued', states.queued ?? 0),
    stat('Starting', states.starting ?? 0),
    stat('Active', states.active ?? 0),
    stat('Stopping', states.stopping ?? 0),
    stat('Oldest queued', stats.oldest_queued_at ? ago(stats.oldest_queued_at) : '—'),
    stat('Workers polling', stats.workers_polling));
}

export function environmentLink(env) {
  return h('a', { href: `#/environments/${api.seg(env.id)}` }, env.name);
}

function createEnvironmentForm(ctx) {
  const name = h('input', { type: 'text', name: 'name', required: true, maxlength: 200 });
  const button = h('button', { type: 'submit' }, 'Create environment');
  const form = h('form', { class: 'inline-form', 'aria-label': 'Create a self-hosted environment' },
    field('New self-hosted environment', name), button);
  onSubmit(form, button, { key: 'create-environment', what: 'create the environment' },
    () => api.post('/environments', { name: name.value, config: { type: 'self_hosted' } }, { signal: ctx.signal }),
    (env) => go(`#/environments/${api.seg(env.id)}`));
  return form;
}

/** What a cloud environment's card and page say: there is nothing more to show. */
export const CLOUD_NOTE = 'A cloud environment: it has no work queue.';

async function environmentCard(env, signal) {
  const meta = h('p', { class: 'muted' }, h('code', {}, env.id), ` · created ${localTime(env.created_at)}`);
  if (env.config?.type !== 'self_hosted') {
    return h('section', { class: 'card env' }, h('h2', {}, env.name), meta, h('p', {}, CLOUD_NOTE));
  }
  const head = h('h2', {}, environmentLink(env));
  const base = `/environments/${api.seg(env.id)}/work`;
  const [stats, history] = await Promise.all([
    api.get(`${base}/stats`, { signal }),
    api.get(`${base}/stats/history`, { signal }),
  ]);
  return h('section', { class: 'card env', 'aria-label': `Environment ${env.name}` }, head, meta,
    statsList(stats),
    h('figure', {}, queueChart(history.data, env.name), h('figcaption', {}, legend(), '(last hour)')));
}

export function overview(main, ctx) {
  const list = h('div', { class: 'cards', 'aria-live': 'off' }, h('p', { class: 'muted' }, 'Loading…'));
  const pager = h('div', { class: 'pager' });
  let cursor = '';
  fill(main,
    h('div', { class: 'title-row' }, h('h1', {}, 'Environments'),
      h('p', { class: 'muted' }, `Times in your zone (${zone}). Refreshes every ${OVERVIEW_MS / 1000} s.`)),
    createEnvironmentForm(ctx), list, pager);
  const refresh = async () => {
    const page = await api.get(`/environments${api.query({ limit: OVERVIEW_PAGE, page: cursor })}`,
      { signal: ctx.signal });
    const cards = await Promise.all(page.data.map((env) => environmentCard(env, ctx.signal)));
    if (!ctx.active) return;
    fill(list, cards.length ? cards : h('p', {}, 'No environments yet: create one above.'));
    fill(pager,
      cursor ? h('button', { type: 'button', onclick: () => { cursor = ''; refresh(); } }, 'First page') : null,
      page.has_more ? h('button', { type: 'button', onclick: () => { cursor = page.next_page; refresh(); } }, 'Next page') : null);
  };
  ctx.every(OVERVIEW_MS, refresh, 'overview');
}
