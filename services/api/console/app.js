// The console's shell: sign-in, navigation (hash routing), the fleet
// sampler behind the fleet chart, and one page at a time.
import { api, isAuthError } from './api.js';
import { h, pages, notFound } from './pages.js';

const view = document.getElementById('view');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
const whoName = document.getElementById('who-name');
let me = null;
let cleanup = null;

// ---- fleet samples for the chart: taken in the browser since sign-in,
// kept for an hour in sessionStorage (counts only, never a credential).
const SAMPLES = 'trellis.console.samples';
const SAMPLE_MS = 15000;
let sampler = null;

export function samples() {
  try {
    const list = JSON.parse(sessionStorage.getItem(SAMPLES) || '[]');
    const since = Date.now() - 3600 * 1000;
    return Array.isArray(list) ? list.filter((s) => s.t >= since) : [];
  } catch {
    return [];
  }
}

export function addSample(counts) {
  const list = samples();
  list.push({ t: Date.now(), online: counts.online, offline: counts.offline });
  sessionStorage.setItem(SAMPLES, JSON.stringify(list));
}

async function sample() {
  try {
    const fleet = await api('/v1/trellis/fleet');
    addSample(fleet.counts);
  } catch (e) {
    if (isAuthError(e)) signedOut();
  }
}

function startSampler() {
  if (sampler) return;
  sampler = setInterval(sample, SAMPLE_MS);
}

// ---- session
function signedIn(identity) {
  me = identity;
  whoName.textContent = `${identity.user}@${identity.org}`;
  who.hidden = false;
  nav.hidden = false;
  startSampler();
}

function signedOut() {
  me = null;
  who.hidden = true;
  nav.hidden = true;
  if (sampler) clearInterval(sampler);
  sampler = null;
  sessionStorage.removeItem(SAMPLES);
  if (location.hash !== '#/signin') location.hash = '#/signin';
  else route();
}

document.getElementById('sign-out').addEventListener('click', async () => {
  try {
    await api('/v1/trellis/session', { method: 'DELETE' });
  } finally {
    signedOut();
  }
});

function signInPage() {
  const error = h('p', { class: 'error', role: 'alert', 'data-testid': 'signin-error' });
  const submit = async (event, body) => {
    event.preventDefault();
    error.textContent = '';
    try {
      signedIn(await api('/v1/trellis/session', { method: 'POST', body }));
      location.hash = sessionStorage.getItem('trellis.console.next') || '#/fleet';
      sessionStorage.removeItem('trellis.console.next');
    } catch (e) {
      error.textContent = isAuthError(e) ? 'Sign-in refused: the token or password is not valid.' : e.message;
    }
  };
  const token = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'off', required: true });
  const tokenForm = h('form', { 'data-testid': 'token-form' },
    h('label', { for: 'token' }, 'Access token', token),
    h('button', { type: 'submit' }, 'Sign in with token'));
  tokenForm.addEventListener('submit', (e) => submit(e, { token: token.value }));
  const user = h('input', { id: 'username', name: 'username', autocomplete: 'username', required: true });
  const password = h('input', { id: 'password', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const passwordForm = h('form', {},
    h('label', { for: 'username' }, 'User name (or user@organisation)', user),
    h('label', { for: 'password' }, 'Password (a Trellis token of that user)', password),
    h('button', { type: 'submit', class: 'secondary' }, 'Sign in with password'));
  passwordForm.addEventListener('submit', (e) => submit(e, { username: user.value, password: password.value }));
  view.replaceChildren(h('section', { class: 'signin card' },
    h('h1', {}, 'Sign in to Trellis'),
    error,
    tokenForm,
    h('h2', {}, 'or with a user name and password'),
    passwordForm,
    h('p', { class: 'muted' }, 'The session is an HttpOnly cookie; signing out clears it.')));
  token.focus();
}

// ---- routing
// Each page gets an AbortSignal that fires when the page is left: its
// timers and streams stop, and it no longer writes to the view.
const ROUTES = [
  [/^#\/fleet$/, 'fleet', (m, signal) => pages.fleet(view, signal, samples, addSample)],
  [/^#\/devices\/([^/]+)$/, 'fleet', (m, signal) => pages.device(view, signal, decodeURIComponent(m[1]))],
  [/^#\/releases$/, 'releases', (m, signal) => pages.releases(view, signal)],
  [/^#\/rollouts\/([^/]+)$/, 'releases', (m, signal) => pages.rollout(view, signal, decodeURIComponent(m[1]))],
  [/^#\/audit$/, 'audit', (m, signal) => pages.audit(view, signal)],
];

async function route() {
  if (cleanup) cleanup.abort();
  cleanup = new AbortController();
  const signal = cleanup.signal;
  const hash = location.hash || '#/fleet';
  if (hash === '#/signin') {
    if (me) {
      location.hash = '#/fleet';
      return;
    }
    for (const a of nav.querySelectorAll('a')) a.removeAttribute('aria-current');
    signInPage();
    return;
  }
  if (!me) {
    try {
      const identity = await api('/v1/trellis/session');
      if (signal.aborted) return;
      signedIn(identity);
    } catch (e) {
      if (signal.aborted) return;
      if (isAuthError(e)) {
        sessionStorage.setItem('trellis.console.next', hash);
        location.hash = '#/signin';
        return;
      }
      view.replaceChildren(h('p', { class: 'error', role: 'alert' }, e.message));
      return;
    }
  }
  for (const [pattern, section, render] of ROUTES) {
    const m = hash.match(pattern);
    if (!m) continue;
    for (const a of nav.querySelectorAll('a')) {
      if (a.dataset.page === section) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    view.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
    try {
      await render(m, signal);
    } catch (e) {
      if (signal.aborted) return;
      if (isAuthError(e)) signedOut();
      else view.replaceChildren(h('p', { class: 'error', role: 'alert' }, e.message));
    }
    view.focus({ preventScroll: true });
    return;
  }
  notFound(view, 'No such page.');
}

window.addEventListener('hashchange', route);
route();
