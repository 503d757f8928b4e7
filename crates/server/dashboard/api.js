// The public API, exactly as the CLI uses it: /api/v1/cloud, `Authorization: Bearer <admin token>`,
// JSON in and out, errors read from the envelope. No cookies are ever sent, so there is no CSRF surface;
// the token lives in sessionStorage and is gone when the tab closes.

const PREFIX = '/api/v1/cloud';
const STORAGE_KEY = 'tether.admin-token';
/** Every request gives up after this long, so that a hung server shows up as a message. */
const TIMEOUT_MS = 15_000;
/** Largest line a session stream may send before the dashboard gives up on the stream. */
const MAX_STREAM_LINE = 4 * 1024 * 1024;

export const token = {
  get: () => sessionStorage.getItem(STORAGE_KEY),
  set: (value) => sessionStorage.setItem(STORAGE_KEY, value),
  clear: () => sessionStorage.removeItem(STORAGE_KEY),
};

export class ApiError extends Error {
  constructor(status, message, type) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

let unauthorized = () => {};
/** Called with the error when the server refuses the stored token (revoked, or the store was reset). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/** `?a=1&b=2` from an object, leaving out empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.append(k, String(v));
  }
  const text = q.toString();
  return text ? `?${text}` : '';
}

/** Path segment for an id taken from the page or the API. */
export function seg(id) {
  return encodeURIComponent(id);
}

async function errorFrom(response, what) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status alone must do
  }
  const message = body?.error?.message ?? response.statusText ?? 'request failed';
  return new ApiError(response.status, `${what}: ${message} (HTTP ${response.status})`, body?.error?.type);
}

/**
 * One API call. `options.token` checks a token that is not stored yet (sign-in); `options.signal`
 * cancels it when the view it belongs to goes away.
 */
export async function call(method, path, body, options = {}) {
  const bearer = options.token ?? token.get();
  const headers = { Authorization: `Bearer ${bearer}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const timeout = AbortSignal.timeout(TIMEOUT_MS);
  const signal = options.signal ? AbortSignal.any([options.signal, timeout]) : timeout;
  const what = `${method} ${path.split('?')[0]}`;
  let response;
  try {
    response = await fetch(PREFIX + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch (e) {
    if (options.signal?.aborted) throw e;
    throw new ApiError(0, timeout.aborted
      ? `${what}: no answer within ${TIMEOUT_MS / 1000} s`
      : `${what}: the server cannot be reached (${e.message})`);
  }
  if (!response.ok) {
    const error = await errorFrom(response, what);
    if (response.status === 401 && options.token === undefined) unauthorized(error);
    throw error;
  }
  return response.json();
}

export const get = (path, options) => call('GET', path, undefined, options);
export const post = (path, body, options) => call('POST', path, body ?? {}, options);
export const del = (path, options) => call('DELETE', path, undefined, options);

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/**
 * Follows a session's events (GET …/events/stream, the stream `tether session watch` reads). EventSource
 * cannot send an Authorization header, so this reads the stream with fetch() and parses Server-Sent
 * Events itself. It resumes after `lastEventId`, reconnects with backoff (1 s doubling to 30 s) and
 * `Last-Event-ID` when the connection drops, and stops when `signal` aborts, the session ends, or the
 * server refuses the request for good.
 */
export async function follow(sessionId, { lastEventId, onEvent, onStatus, signal }) {
  let last = lastEventId;
  let backoff = 1000;
  while (!signal.aborted) {
    let ended = false;
    try {
      const headers = { Authorization: `Bearer ${token.get()}`, Accept: 'text/event-stream' };
      if (last) headers['Last-Event-ID'] = last;
      const response = await fetch(`${PREFIX}/sessions/${seg(sessionId)}/events/stream`, {
        headers, signal, cache: 'no-store', credentials: 'omit',
      });
      if (!response.ok) {
        const error = await errorFrom(response, 'the live event stream');
        if (response.status === 401) unauthorized(error);
        if (response.status >= 400 && response.status < 500) {
          onStatus('closed', error.message);
          return;
        }
        throw error;
      }
      onStatus('live');
      backoff = 1000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let frame = { id: '', event: '', data: [] };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        if (buffer.length > MAX_STREAM_LINE && !buffer.includes('\n')) {
          throw new Error('the stream sent a line too long to show');
        }
        let newline;
        while ((newline = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, '');
          buffer = buffer.slice(newline + 1);
          if (line === '') {
            if (frame.data.length) {
              const event = JSON.parse(frame.data.join('\n'));
              if (frame.id) last = frame.id;
              onEvent(event);
              if (event.type === 'session.status_terminated' || event.type === 'session.deleted') ended = true;
            }
            frame = { id: '', event: '', data: [] };
          } else if (!line.startsWith(':')) {
            const colon = line.indexOf(':');
            const name = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
            if (name === 'data') frame.data.push(text);
            else if (name === 'id') frame.id = text;
            else if (name === 'event') frame.event = text;
          }
        }
      }
      if (ended) {
        onStatus('closed', 'the session has ended');
        return;
      }
    } catch (e) {
      if (signal.aborted) return;
      onStatus('retrying', `the live event stream was interrupted (${e.message}); reconnecting`);
    }
    await sleep(backoff, signal);
    backoff = Math.min(backoff * 2, 30_000);
  }
}
