// The console's pages. Everything is built with DOM calls (no HTML from
// strings), so nothing a device or user sends can become markup.
import { api, streamEvents, isNotYours } from './api.js';

// ---------------------------------------------------------------- helpers
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k === 'class') el.className = v;
    else if (k === 'for') el.htmlFor = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function when(iso) {
  if (!iso) return '—';
  const t = new Date(iso);
  const s = Math.round((Date.now() - t.getTime()) / 1000);
  const ago = s < 60 ? `${Math.max(s, 0)} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : s < 86400 ? `${Math.round(s / 3600)} h ago` : t.toISOString().slice(0, 10);
  return h('time', { datetime: iso, title: iso }, ago);
}

function short(sha) {
  return sha ? h('code', { title: sha }, sha.slice(0, 12)) : '—';
}

function badge(text, cls) {
  return h('span', { class: `badge ${cls}` }, text);
}

function table(headers, rows, attrs = {}) {
  return h('div', { class: 'table-wrap' }, h('table', attrs,
    h('thead', {}, h('tr', {}, headers.map((x) => h('th', { scope: 'col' }, x)))),
    h('tbody', {}, rows)));
}

function show(view, signal, ...nodes) {
  if (!signal.aborted) view.replaceChildren(...nodes);
}

function every(ms, signal, fn) {
  const timer = setInterval(fn, ms);
  signal.addEventListener('abort', () => clearInterval(timer));
}

export function notFound(view, text) {
  view.replaceChildren(h('section', { class: 'card', 'data-testid': 'not-found' },
    h('h1', {}, 'Not found'),
    h('p', {}, text),
    h('p', {}, h('a', { href: '#/fleet' }, 'Back to the fleet'))));
}

/** The confirmation dialog; resolves true when confirmed. */
function confirmDialog(title, text, extra = null, okLabel = 'Confirm') {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-ok').textContent = okLabel;
  document.getElementById('confirm-extra').replaceChildren(...(extra ? [extra] : []));
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
    document.getElementById('confirm-cancel').focus();
  });
}

function errorLine(e) {
  return h('p', { class: 'error', role: 'alert' }, e.message || String(e));
}

// ---------------------------------------------------------------- fleet
function chart(points) {
  const W = 600;
  const H = 120;
  const pad = 22;
  const now = Date.now();
  const from = now - 3600 * 1000;
  const max = Math.max(1, ...points.map((p) => p.online + p.offline));
  const x = (t) => pad + ((t - from) / (now - from)) * (W - pad - 4);
  const y = (v) => H - pad - (v / max) * (H - pad - 8);
  const line = (key, cls) => svg('polyline', { class: cls, points: points.map((p) => `${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join(' ') });
  const last = points[points.length - 1];
  return h('figure', { class: 'chart card' },
    svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': last ? `Online ${last.online}, offline ${last.offline} now; ${points.length} samples over the last hour` : 'No samples yet' },
      svg('line', { class: 'axis', x1: pad, y1: H - pad, x2: W - 4, y2: H - pad }),
      svg('line', { class: 'axis', x1: pad, y1: 8, x2: pad, y2: H - pad }),
      svg('text', { x: 2, y: 12 }, String(max)),
      svg('text', { x: 10, y: H - pad }, '0'),
      svg('text', { x: pad, y: H - 6 }, '−60 min'),
      svg('text', { x: W - 30, y: H - 6 }, 'now'),
      line('online', 'line-online'),
      line('offline', 'line-offline'),
      ...points.map((p) => svg('circle', { class: 'dot-online', cx: x(p.t).toFixed(1), cy: y(p.online).toFixed(1), r: 2.5 })),
      ...points.map((p) => svg('circle', { class: 'dot-offline', cx: x(p.t).toFixed(1), cy: y(p.offline).toFixed(1), r: 2.5 }))),
    h('figcaption', { class: 'muted' },
      'Online (solid) and offline (dashed) devices over the last hour, sampled every 15 s by this browser since you signed in.'));
}

export async function fleet(view, signal, samples, addSample) {
  let data = await api('/v1/trellis/fleet');
  addSample(data.counts);
  const search = h('input', { type: 'search', id: 'fleet-search', placeholder: 'id, tag, gateway, firmware', 'aria-label': 'Search devices' });
  const state = h('select', { id: 'fleet-state', 'aria-label': 'State' },
    h('option', { value: '' }, 'All'), h('option', { value: 'online' }, 'Online'), h('option', { value: 'offline' }, 'Offline'));
  const counts = h('div', { class: 'counts', 'aria-live': 'polite' });
  const chartHolder = h('div');
  const rows = h('div');
  const render = () => {
    const q = search.value.trim().toLowerCase();
    const devices = data.devices.filter((d) => {
      if (state.value === 'online' && !d.online) return false;
      if (state.value === 'offline' && d.online) return false;
      if (!q) return true;
      const hay = [d.id, d.name || '', d.gateway_id, d.region || '', d.firmware_sha256, String(d.firmware_version), String(d.product_id), ...(d.tags || [])].join(' ').toLowerCase();
      return hay.includes(q);
    });
    counts.replaceChildren(
      h('span', {}, h('strong', { 'data-testid': 'count-total' }, data.counts.total), ' devices'),
      h('span', { class: 'online' }, h('strong', { 'data-testid': 'count-online' }, data.counts.online), ' online'),
      h('span', { class: 'offline' }, h('strong', { 'data-testid': 'count-offline' }, data.counts.offline), ' offline'));
    chartHolder.replaceChildren(chart(samples()));
    rows.replaceChildren(devices.length === 0
      ? h('p', { class: 'muted' }, data.devices.length ? 'No device matches.' : 'No devices in your organisation yet.')
      : table(['Device', 'State', 'Product', 'Firmware', 'Tags', 'Last seen', 'Gateway / region'], devices.map((d) =>
        h('tr', { 'data-testid': 'device-row', 'data-id': d.id, 'data-online': String(d.online) },
          h('td', {}, h('a', { href: `#/devices/${d.id}` }, d.name ? [d.name, ' '] : null, h('code', {}, d.id))),
          h('td', {}, d.online ? badge('online', 'online') : badge('offline', 'offline'),
            d.revoked ? [' ', badge('revoked', 'bad')] : null, d.quarantined ? [' ', badge('quarantined', 'warn')] : null),
          h('td', {}, d.product_id),
          h('td', {}, `v${d.firmware_version} `, short(d.firmware_sha256)),
          h('td', {}, d.tags === null ? h('span', { class: 'muted' }, '?') : (d.tags.join(', ') || '—')),
          h('td', {}, when(d.last_seen)),
          h('td', {}, d.gateway_id ? `${d.gateway_id}${d.region ? ' / ' + d.region : ''}` : '—'))), { class: 'fleet' }));
  };
  search.addEventListener('input', render);
  state.addEventListener('change', render);
  render();
  show(view, signal,
    h('h1', {}, 'Fleet'),
    counts,
    chartHolder,
    h('form', { class: 'inline toolbar', role: 'search' },
      h('label', { for: 'fleet-search' }, 'Search', search),
      h('label', { for: 'fleet-state' }, 'State', state)),
    rows);
  every(5000, signal, async () => {
    try {
      data = await api('/v1/trellis/fleet');
      if (!signal.aborted) render();
    } catch {
      /* the next refresh tries again */
    }
  });
}

// ---------------------------------------------------------------- device
export async function device(view, signal, id) {
  let d;
  try {
    d = await api(`/v1/trellis/devices/${encodeURIComponent(id)}`);
  } catch (e) {
    if (isNotYours(e)) {
      if (!signal.aborted) notFound(view, `Device ${id} was not found, or it is not yours.`);
      return;
    }
    throw e;
  }
  const record = h('div');
  const message = h('p', { role: 'status', 'aria-live': 'polite' });
  const renderRecord = () => {
    const r = d.record || {};
    record.replaceChildren(
      h('div', { class: 'grid' },
        h('section', { class: 'card' }, h('h2', {}, 'Record'),
          h('dl', { class: 'kv' },
            h('dt', {}, 'State'), h('dd', { 'data-testid': 'device-state' }, d.online ? badge('online', 'online') : badge('offline', 'offline')),
            h('dt', {}, 'Product'), h('dd', {}, d.product_id),
            h('dt', {}, 'Platform'), h('dd', {}, d.platform_id),
            h('dt', {}, 'Firmware'), h('dd', {}, `v${d.firmware_version} `, short(d.firmware_sha256)),
            h('dt', {}, 'Name'), h('dd', {}, d.name || '—'),
            h('dt', {}, 'Gateway'), h('dd', {}, d.gateway_id || '—'),
            h('dt', {}, 'Region'), h('dd', { 'data-testid': 'device-region' }, d.region || '—'),
            h('dt', {}, 'Address'), h('dd', {}, d.peer_addr || '—'),
            h('dt', {}, 'Connected'), h('dd', {}, when(d.connected_at)),
            h('dt', {}, 'Last seen'), h('dd', {}, when(d.last_seen)),
            h('dt', {}, 'Registered'), h('dd', {}, when(r.registered_at)),
            h('dt', {}, 'Organisation'), h('dd', {}, r.organization || '—'),
            h('dt', {}, 'Tags'), h('dd', { 'data-testid': 'device-tags' }, (r.tags || []).join(', ') || '—'))),
        h('section', { class: 'card' }, h('h2', {}, 'Flags'),
          h('dl', { class: 'kv' },
            h('dt', {}, 'Revoked'), h('dd', {}, d.revoked || r.revoked ? badge(`revoked ${r.revoked_at || ''}`, 'bad') : 'no'),
            h('dt', {}, 'Quarantine'), h('dd', {}, d.quarantined_until ? badge(`until ${d.quarantined_until}`, 'warn') : 'none'),
            h('dt', {}, 'Clone flags'), h('dd', {}, d.clone_flags.length ? String(d.clone_flags.length) : 'none')),
          d.clone_flags.length ? table(['When', 'Gateway', 'Address', 'Other session', 'Action'], d.clone_flags.map((c) =>
            h('tr', {}, h('td', {}, when(c.time)), h('td', {}, c.gateway_id), h('td', {}, c.peer_addr),
              h('td', {}, `${c.other_gateway_id} ${c.other_peer_addr}`), h('td', {}, c.action)))) : null)),
      h('section', { class: 'card' }, h('h2', {}, 'Recent sessions'),
        d.recent_sessions.length ? table(['When', 'Gateway', 'Address', 'Epoch'], d.recent_sessions.map((s) =>
          h('tr', {}, h('td', {}, when(s.time)), h('td', {}, s.gateway_id), h('td', {}, s.peer_addr), h('td', {}, s.epoch))))
          : h('p', { class: 'muted' }, 'None recorded.')));
  };
  const reload = async () => {
    d = await api(`/v1/trellis/devices/${encodeURIComponent(id)}`);
    if (!signal.aborted) renderRecord();
  };
  renderRecord();

  // Functions and variables.
  const functions = d.functions.map((name) => {
    const args = h('input', { 'aria-label': `Argument for ${name}`, name: 'args', 'data-testid': `args-${name}`, placeholder: 'argument' });
    const out = h('output', { 'data-testid': `result-${name}`, 'aria-live': 'polite' });
    const form = h('form', { class: 'fn', 'data-testid': `fn-${name}` }, h('code', {}, name), args, h('button', { type: 'submit' }, 'Call'), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      out.textContent = '…';
      try {
        const r = await api(`/v1/devices/${encodeURIComponent(id)}/${encodeURIComponent(name)}`, { method: 'POST', body: { args: args.value } });
        out.textContent = String(r.return_value);
      } catch (err) {
        out.textContent = `error: ${err.message}`;
      }
    });
    return form;
  });
  const variables = Object.entries(d.variables).map(([name, type]) => {
    const out = h('output', { 'data-testid': `value-${name}`, 'aria-live': 'polite' });
    const form = h('form', { class: 'fn' }, h('code', {}, name), h('span', { class: 'muted' }, type), h('button', { type: 'submit', class: 'secondary' }, 'Read'), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      out.textContent = '…';
      try {
        const r = await api(`/v1/devices/${encodeURIComponent(id)}/${encodeURIComponent(name)}`);
        out.textContent = String(r.result);
      } catch (err) {
        out.textContent = `error: ${err.message}`;
      }
    });
    return form;
  });

  // The live event feed.
  const events = h('ul', { class: 'events', 'data-testid': 'events', 'aria-live': 'off' });
  const feedState = h('span', { class: 'muted', 'data-testid': 'feed-state' }, 'connecting…');
  streamEvents(`/v1/devices/${encodeURIComponent(id)}/events`, (ev) => {
    const li = h('li', { 'data-name': ev.name, 'data-published': ev.published_at || '' },
      h('span', { class: 'when' }, (ev.published_at || '').slice(11, 19)),
      h('span', {}, h('code', {}, ev.name), ' ', ev.data === null || ev.data === undefined ? '' : String(ev.data)));
    events.prepend(li);
    while (events.children.length > 100) events.lastElementChild.remove();
  }, (st, err) => {
    feedState.textContent = st === 'open' ? 'live' : st === 'error' ? `disconnected (${err && err.message ? err.message : 'error'}); retrying` : 'reconnecting…';
    feedState.dataset.state = st;
  }, signal);

  // Actions, each behind a confirmation.
  const tags = h('input', { id: 'tags', 'aria-label': 'Tags (comma separated)', value: ((d.record && d.record.tags) || []).join(', ') });
  const tagForm = h('form', { class: 'inline' }, h('label', { for: 'tags' }, 'Tags (comma separated)', tags), h('button', { type: 'submit', class: 'secondary' }, 'Save tags'));
  const act = async (fn, done) => {
    message.textContent = '';
    try {
      await fn();
      message.textContent = done;
      await reload();
    } catch (e) {
      message.replaceChildren(errorLine(e));
    }
  };
  tagForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const list = tags.value.split(/[\s,]+/).filter(Boolean);
    if (await confirmDialog('Replace tags?', `Device ${id} gets the tags: ${list.join(', ') || '(none)'}.`, null, 'Save tags')) {
      await act(() => api(`/v1/trellis/devices/${id}/tags`, { method: 'POST', body: { tags: list } }), 'Tags saved.');
    }
  });
  const lift = h('button', { type: 'button', class: 'secondary' }, 'Lift quarantine');
  lift.addEventListener('click', async () => {
    if (await confirmDialog('Lift the quarantine?', `Device ${id} may open sessions again at once.`, null, 'Lift quarantine')) {
      await act(() => api(`/v1/trellis/devices/${id}/lift-quarantine`, { method: 'POST' }), 'Quarantine lifted.');
    }
  });
  const revoke = h('button', { type: 'button', class: 'danger' }, 'Revoke…');
  revoke.addEventListener('click', async () => {
    const reason = h('input', { id: 'revoke-reason', 'aria-label': 'Reason' });
    const extra = h('label', { for: 'revoke-reason' }, 'Reason', reason);
    if (await confirmDialog('Revoke this device?', `Revoking ${id} is final: its key is never trusted again and its session closes.`, extra, 'Revoke')) {
      await act(() => api(`/v1/trellis/devices/${id}/revoke`, { method: 'POST', body: { reason: reason.value || 'revoked in the console' } }), 'Device revoked.');
    }
  });

  show(view, signal,
    h('p', {}, h('a', { href: '#/fleet' }, '← Fleet')),
    h('h1', {}, 'Device ', h('code', { 'data-testid': 'device-id' }, d.id)),
    message,
    record,
    h('div', { class: 'grid' },
      h('section', { class: 'card' }, h('h2', {}, 'Functions'), functions.length ? functions : h('p', { class: 'muted' }, 'None described.')),
      h('section', { class: 'card' }, h('h2', {}, 'Variables'), variables.length ? variables : h('p', { class: 'muted' }, 'None described.'))),
    h('section', { class: 'card' }, h('h2', {}, 'Live events ', feedState), events),
    h('section', { class: 'card' }, h('h2', {}, 'Manage'), tagForm, h('div', { class: 'toolbar' }, lift, revoke)));
  every(10000, signal, () => reload().catch(() => {}));
}

// ---------------------------------------------------------------- releases and rollouts
function stageBars(r) {
  return r.stages.map((s, i) => {
    const done = Boolean(s.completed_at);
    const stateText = done ? 'done' : s.open ? 'open' : 'waiting';
    return h('div', { class: 'stage', 'data-testid': 'stage', 'data-state': stateText, 'data-name': s.name },
      h('div', { class: 'stage-head' },
        h('span', {}, h('strong', {}, s.name || `stage ${i + 1}`), ' ', badge(stateText, done ? 'ok' : s.open ? 'online' : 'offline')),
        h('span', {}, `${s.applied}/${s.devices} applied`, s.failed ? h('span', { class: 'bad' }, ` · ${s.failed} failed`) : null,
          s.in_flight ? ` · ${s.in_flight} updating` : null)),
      h('progress', { max: Math.max(s.devices, 1), value: s.applied, 'aria-label': `${s.name}: ${s.applied} of ${s.devices} applied` }));
  });
}

function stateBadge(state) {
  const cls = { running: 'online', completed: 'ok', aborted: 'bad', paused: 'warn' }[state] || 'offline';
  return h('span', { class: `badge ${cls}`, 'data-testid': 'rollout-state' }, state);
}

export async function releases(view, signal) {
  const [rel, ro] = await Promise.all([api('/v1/trellis/releases'), api('/v1/trellis/rollouts')]);
  const rolloutsHolder = h('div');
  const renderRollouts = (list) => rolloutsHolder.replaceChildren(...(list.length === 0
    ? [h('p', { class: 'muted' }, 'No rollouts yet.')]
    : list.map((r) => h('section', { class: 'card', 'data-testid': 'rollout-card', 'data-id': r.rollout_id },
      h('div', { class: 'stage-head' },
        h('span', {}, h('a', { href: `#/rollouts/${encodeURIComponent(r.rollout_id)}` }, h('code', {}, r.rollout_id)), ' of ', h('code', {}, r.release_id)),
        h('span', {}, stateBadge(r.state), ' ', when(r.created_at))),
      stageBars(r),
      h('p', { class: 'muted' }, `failure ratio ${(r.failure_ratio * 100).toFixed(0)} % (aborts above ${(r.max_failure_ratio * 100).toFixed(0)} %)`, r.message ? ` · ${r.message}` : '')))));
  renderRollouts(ro.rollouts);
  const policies = Object.entries(rel.policies).map(([product, p]) => h('li', {}, `product ${product}: `,
    p ? [`${p.threshold} of `, p.keys.map((k) => k.name).join(', '), p.cloud_only ? h('span', { class: 'bad' }, ' (cloud keys alone meet it)') : null] : h('span', { class: 'warn' }, 'no signing policy')));
  show(view, signal,
    h('h1', {}, 'Releases and rollouts'),
    h('h2', {}, 'Rollouts'),
    rolloutsHolder,
    h('h2', {}, 'Releases'),
    rel.releases.length === 0 ? h('p', { class: 'muted' }, 'No releases yet (trellis firmware upload, trellis release create).')
      : table(['Release', 'Created', 'Image', 'Signatures', 'Against the policy'], rel.releases.map((r) => {
        const c = r.policy_check;
        return h('tr', { 'data-testid': 'release-row', 'data-id': r.release_id },
          h('td', {}, h('code', {}, r.release_id)),
          h('td', {}, when(r.created_at)),
          h('td', {}, short(r.image_sha256), h('span', { class: 'muted hide-narrow' }, ` ${r.image_size} B`)),
          h('td', {}, `${r.signatures}`, c.signed_by && c.signed_by.length ? h('span', { class: 'muted' }, ` (${c.signed_by.join(', ')})`) : null),
          h('td', {}, c.satisfied ? badge('meets the policy', 'ok')
            : [badge('not enough', 'bad'), c.missing && c.missing.length ? ` missing: ${c.missing.join(', ')}` : '', c.error ? ` ${c.error}` : '']));
      })),
    h('h2', {}, 'Signing policies'),
    policies.length ? h('ul', {}, policies) : h('p', { class: 'muted' }, 'None.'));
  every(2000, signal, async () => {
    try {
      const r = await api('/v1/trellis/rollouts');
      if (!signal.aborted) renderRollouts(r.rollouts);
    } catch {
      /* next time */
    }
  });
}

export async function rollout(view, signal, id) {
  const url = `/v1/trellis/rollouts/${encodeURIComponent(id)}`;
  let r;
  try {
    r = await api(url);
  } catch (e) {
    if (isNotYours(e)) {
      if (!signal.aborted) notFound(view, `Rollout ${id} was not found, or it is not yours.`);
      return;
    }
    throw e;
  }
  const body = h('div');
  const message = h('p', { role: 'status', 'aria-live': 'polite' });
  const buttons = {
    pause: h('button', { type: 'button', class: 'secondary' }, 'Pause'),
    resume: h('button', { type: 'button', class: 'secondary' }, 'Resume'),
    abort: h('button', { type: 'button', class: 'danger' }, 'Abort…'),
  };
  const render = () => {
    const ended = r.state === 'completed' || r.state === 'aborted';
    buttons.pause.disabled = ended || r.state === 'paused';
    buttons.resume.disabled = ended || r.state !== 'paused';
    buttons.abort.disabled = ended;
    body.replaceChildren(
      h('section', { class: 'card' },
        h('dl', { class: 'kv' },
          h('dt', {}, 'State'), h('dd', {}, stateBadge(r.state), r.message ? ` ${r.message}` : ''),
          h('dt', {}, 'Release'), h('dd', {}, h('code', {}, r.release_id)),
          h('dt', {}, 'Target'), h('dd', {}, r.target ? `product ${r.target.product_id}${r.target.tag ? `, tag ${r.target.tag}` : ''}${r.target.device_ids.length ? `, ${r.target.device_ids.length} devices` : ''}${r.target.percent ? `, ${r.target.percent} %` : ''}` : '—'),
          h('dt', {}, 'Devices'), h('dd', {}, `${r.totals.applied}/${r.totals.devices} applied, ${r.totals.failed} failed, ${r.totals.in_flight} updating`),
          h('dt', {}, 'Failure ratio'), h('dd', {},
            h('meter', { min: 0, max: 1, low: r.max_failure_ratio * 0.5, high: r.max_failure_ratio, optimum: 0, value: r.failure_ratio, 'aria-label': 'failure ratio' }),
            ` ${(r.failure_ratio * 100).toFixed(0)} % of finished devices; the rollout aborts above ${(r.max_failure_ratio * 100).toFixed(0)} %`),
          h('dt', {}, 'Created'), h('dd', {}, when(r.created_at)))),
      h('section', { class: 'card' }, h('h2', {}, 'Stages'), stageBars(r)),
      h('section', { class: 'card' }, h('h2', {}, 'Devices not yet applied'),
        r.not_applied.length === 0 ? h('p', { class: 'muted', 'data-testid': 'all-applied' }, 'None.')
          : table(['Device', 'Stage', 'State', 'Reason', 'Attempts', 'Updated'], r.not_applied.map((d) =>
            h('tr', {}, h('td', {}, h('a', { href: `#/devices/${d.device_id}` }, h('code', {}, d.device_id))), h('td', {}, d.stage),
              h('td', {}, d.state), h('td', {}, d.reason || '—'), h('td', {}, d.attempts), h('td', {}, when(d.updated_at)))))));
  };
  const act = async (action) => {
    message.textContent = '';
    try {
      r = await api(`${url}/${action}`, { method: 'POST', body: { reason: 'from the console' } });
      message.textContent = `Rollout ${action}d.`;
      render();
    } catch (e) {
      message.replaceChildren(errorLine(e));
    }
  };
  buttons.pause.addEventListener('click', () => act('pause'));
  buttons.resume.addEventListener('click', () => act('resume'));
  buttons.abort.addEventListener('click', async () => {
    if (await confirmDialog('Abort this rollout?', 'Aborting is final: devices not started yet are skipped.', null, 'Abort rollout')) await act('abort');
  });
  render();
  show(view, signal,
    h('p', {}, h('a', { href: '#/releases' }, '← Releases and rollouts')),
    h('h1', {}, 'Rollout ', h('code', {}, r.rollout_id)),
    h('div', { class: 'toolbar' }, buttons.pause, buttons.resume, buttons.abort),
    message,
    body);
  every(1000, signal, async () => {
    if (r.state === 'completed' || r.state === 'aborted') return;
    try {
      const next = await api(url);
      if (!signal.aborted) {
        r = next;
        render();
      }
    } catch {
      /* next time */
    }
  });
}

// ---------------------------------------------------------------- audit
export async function audit(view, signal) {
  const field = (id, label, attrs = {}) => {
    const input = h('input', { id, name: id, ...attrs });
    return [input, h('label', { for: id }, label, input)];
  };
  const [device, deviceLabel] = field('audit-device', 'Device id', { placeholder: '24 hex characters' });
  const [kind, kindLabel] = field('audit-kind', 'Kind (action)', { list: 'audit-kinds', placeholder: 'revoke, open_session, …' });
  const [actor, actorLabel] = field('audit-actor', 'Actor contains');
  const [limit, limitLabel] = field('audit-limit', 'Newest', { type: 'number', min: 1, max: 1000, value: 100 });
  const kinds = h('datalist', { id: 'audit-kinds' });
  const results = h('div');
  const form = h('form', { class: 'inline toolbar', role: 'search' }, deviceLabel, kindLabel, actorLabel, limitLabel, kinds,
    h('button', { type: 'submit' }, 'Filter'));
  const load = async () => {
    const q = new URLSearchParams();
    if (device.value.trim()) q.set('device', device.value.trim());
    if (kind.value.trim()) q.set('kind', kind.value.trim());
    if (actor.value.trim()) q.set('actor', actor.value.trim());
    q.set('limit', limit.value || '100');
    try {
      const data = await api(`/v1/trellis/audit?${q}`);
      if (signal.aborted) return;
      const seen = new Set([...kinds.children].map((o) => o.value));
      for (const rec of data.records) if (!seen.has(rec.action)) { seen.add(rec.action); kinds.append(h('option', { value: rec.action })); }
      results.replaceChildren(data.records.length === 0 ? h('p', { class: 'muted' }, 'No records match.')
        : table(['When', 'Kind', 'Actor', 'Device', 'Outcome', 'Detail'], data.records.map((rec) =>
          h('tr', { 'data-testid': 'audit-row' },
            h('td', {}, when(rec.time)), h('td', {}, h('code', {}, rec.action)), h('td', {}, rec.actor),
            h('td', {}, rec.device_id ? h('a', { href: `#/devices/${rec.device_id}` }, h('code', {}, rec.device_id.slice(0, 12))) : '—'),
            h('td', { class: rec.outcome === 'ok' ? 'ok' : 'bad' }, rec.outcome),
            h('td', { class: 'mono' }, Object.entries(rec.detail).map(([k, v]) => `${k}=${v}`).join(' '))))));
    } catch (e) {
      results.replaceChildren(errorLine(e));
    }
  };
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    load();
  });
  show(view, signal, h('h1', {}, 'Audit'), form, results);
  await load();
}

export const pages = { fleet, device, releases, rollout, audit };
