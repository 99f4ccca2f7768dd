// The console's only way to the API: same origin, the session cookie
// (HttpOnly, set by POST /v1/trellis/session) and the X-Trellis-Console
// header without which the API ignores the cookie. No token in any URL.

export class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
    this.body = body;
  }
}

function describe(status, body) {
  if (body && typeof body === 'object') {
    if (body.error === 'invalid_token' || body.error === 'invalid_request') return 'Not signed in, or the token was refused.';
    const parts = [body.error, body.info, body.error_description].filter((x) => typeof x === 'string' && x);
    if (parts.length) return parts.join(': ');
  }
  return `HTTP ${status}`;
}

const HEADERS = { 'X-Trellis-Console': '1', Accept: 'application/json' };

export async function api(path, { method = 'GET', body } = {}) {
  const headers = { ...HEADERS };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
    cache: 'no-store',
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** Not signed in (or the session's token stopped working). */
export function isAuthError(e) {
  return e instanceof ApiError && (e.status === 401 || (e.status === 400 && e.body && e.body.error === 'invalid_request'));
}

/** A device (or rollout) that does not exist or is not the caller's. */
export function isNotYours(e) {
  if (!(e instanceof ApiError)) return false;
  if (e.status === 404) return true;
  return e.status === 403 && Boolean(e.body) && /recognize/.test(e.body.info || '');
}

/**
 * Reads a server-sent event stream with fetch() (so the session cookie and
 * header go along and no token is put in a URL), calling onEvent({name,
 * data, published_at, coreid}) per event and onState('open'|'closed'|
 * 'error', detail). Reconnects after a second until `signal` aborts.
 */
export async function streamEvents(path, onEvent, onState, signal) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const headers = { ...HEADERS, Accept: 'text/event-stream' };
      if (lastId) headers['Last-Event-ID'] = lastId;
      const response = await fetch(path, { headers, credentials: 'same-origin', cache: 'no-store', signal });
      if (!response.ok) {
        let body = null;
        try { body = await response.json(); } catch { body = null; }
        throw new ApiError(response.status, body);
      }
      onState('open');
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let name = null;
          let data = '';
          let id = null;
          for (const line of frame.split('\n')) {
            if (line.startsWith('event: ')) name = line.slice(7);
            else if (line.startsWith('data: ')) data += line.slice(6);
            else if (line.startsWith('id: ')) id = line.slice(4);
          }
          if (id) lastId = id;
          if (name === null) continue;
          let payload = {};
          try { payload = JSON.parse(data); } catch { payload = { data }; }
          onEvent({ name, ...payload });
        }
      }
      onState('closed');
    } catch (e) {
      if (signal.aborted) return;
      onState('error', e);
      if (e instanceof ApiError && e.status >= 400 && e.status < 500) return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}
