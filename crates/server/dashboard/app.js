// The dashboard's shell: sign-in state, the hash router, messages, confirmations, and the refresh
// loop every view uses. Views live in views.js, work.js and sessions.js.

import * as api from './api.js';
import { h, fill } from './dom.js';
import { signIn, overview } from './views.js';
import { environmentPage, workItemPage } from './work.js';
import { sessionsPage, sessionPage } from './sessions.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const messages = document.getElementById('messages');

// ------------------------------------------------------------------------------------------ messages

const shown = new Map();

/**
 * Shows a message until dismissed, or until the view that raised it is left. A `key` names its source
 * (a refresh loop, a form): a newer message with the same key replaces the older one, and
 * `clearMessage(key)` removes it once things work again. A `sticky` one outlives the view (the notice
 * of a forced sign-out, raised as the view changes).
 */
export function notify(text, { kind = 'error', key, sticky = false } = {}) {
  const id = key ?? `m${Math.random()}`;
  shown.get(id)?.remove();
  const item = h('div', { class: `message ${kind}`, role: kind === 'error' ? 'alert' : 'status', dataset: sticky ? { sticky: '' } : {} },
    h('span', {}, text),
    h('button', { type: 'button', class: 'link', onclick: () => { item.remove(); shown.delete(id); } },
      'Dismiss'));
  shown.set(id, item);
  messages.append(item);
  while (messages.children.length > 5) messages.firstElementChild.remove();
}

export function clearMessage(key) {
  shown.get(key)?.remove();
  shown.delete(key);
}

/**
 * Makes `form` send `request()` when submitted, with `button` disabled meanwhile. Once the request has
 * succeeded, the message under `key` is cleared and `then(answer)` runs; a failure of either is shown
 * under `key` as "Could not <what>: <reason>".
 */
export function onSubmit(form, button, { key, what }, request, then) {
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    button.disabled = true;
    try {
      const answer = await request();
      clearMessage(key);
      await then(answer);
    } catch (error) {
      notify(`Could not ${what}: ${error.message}`, { key });
    } finally {
      button.disabled = false;
    }
  });
}

function clearAllMessages() {
  messages.replaceChildren();
  shown.clear();
}

/** A view's messages go with it: what went wrong on one page says nothing of the next. */
function clearViewMessages() {
  for (const [id, item] of shown) {
    if (item.dataset.sticky === undefined) {
      item.remove();
      shown.delete(id);
    }
  }
}

// ------------------------------------------------------------------------------------- confirmation

const dialog = document.getElementById('confirm');

/** Asks before something that cannot be undone; resolves to true when the user confirms. */
export function confirmAction(question, detail, action) {
  fill(dialog.querySelector('h2'), question);
  fill(dialog.querySelector('p'), detail);
  fill(dialog.querySelector('button[value=confirm]'), action);
  dialog.returnValue = '';
  dialog.showModal();
  dialog.querySelector('button[value=cancel]').focus();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'confirm'), { once: true });
  });
}

// ------------------------------------------------------------------------------------ view context

/** What a view may use while it is on screen; everything it started stops when it is left. */
class ViewContext {
  constructor() {
    this.controller = new AbortController();
  }

  get signal() {
    return this.controller.signal;
  }

  get active() {
    return !this.signal.aborted;
  }

  /**
   * Runs `refresh` now and again `ms` after each run ends (never two at once; skipped while the tab is
   * hidden). A failure is shown as a message, replaced by the next one and cleared by a success.
   */
  every(ms, refresh, key) {
    const run = async () => {
      if (!this.active) return;
      if (!document.hidden) {
        try {
          await refresh();
          clearMessage(key);
        } catch (e) {
          if (this.active && e.name !== 'AbortError') notify(e.message, { key });
        }
      }
      if (this.active) setTimeout(run, ms);
    };
    return run();
  }

  close() {
    this.controller.abort();
  }
}

// ------------------------------------------------------------------------------------------ routing

let current = null;

/** A segment of the location's hash; one that is not well %-encoded is taken as it is (an id the
 * server then does not know), rather than leaving the page blank. */
function decodeSegment(segment) {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

function route() {
  current?.close();
  clearViewMessages();
  current = new ViewContext();
  const ctx = current;
  const signedIn = Boolean(api.token.get());
  nav.hidden = !signedIn;
  if (!signedIn) {
    signIn(main, ctx, () => { clearAllMessages(); route(); });
    return;
  }
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeSegment);
  let title = 'Environments';
  if (parts[0] === 'environments' && parts[1] && parts[2] === 'work' && parts[3]) {
    title = 'Work item';
    workItemPage(main, ctx, parts[1], parts[3]);
  } else if (parts[0] === 'environments' && parts[1]) {
    title = 'Environment';
    environmentPage(main, ctx, parts[1]);
  } else if (parts[0] === 'sessions' && parts[1]) {
    title = 'Session';
    sessionPage(main, ctx, parts[1]);
  } else if (parts[0] === 'sessions') {
    title = 'Sessions';
    sessionsPage(main, ctx);
  } else {
    overview(main, ctx);
  }
  document.title = `${title} · Tether`;
  for (const link of nav.querySelectorAll('a')) {
    const here = link.getAttribute('href') === `#/${parts[0] === 'sessions' ? 'sessions' : ''}`;
    if (here) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

/** Goes to a view (a hash such as "#/sessions/sess_…"). */
export function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

api.onUnauthorized((error) => {
  api.token.clear();
  clearAllMessages();
  go('#/');
  notify(`Signed out: the server refused the token (${error.message}). Sign in with a valid admin token.`,
    { key: 'auth', sticky: true });
});

document.getElementById('signout').addEventListener('click', () => {
  api.token.clear();
  clearAllMessages();
  go('#/');
});

window.addEventListener('hashchange', () => {
  route();
  main.focus({ preventScroll: true });
});
window.addEventListener('unhandledrejection', (e) => {
  if (e.reason?.name !== 'AbortError') notify(String(e.reason?.message ?? e.reason));
});
route();
