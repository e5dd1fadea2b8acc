// The auditors' console (served by the gateway at /console/console.js; nothing else loaded).
// It calls the gateway's auditor APIs with the browser's session cookie. Every value from the
// APIs is put into the page as text (textContent, SVG attributes), never as HTML.
'use strict';

(() => {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  let csrfToken = null;

  const $ = (sel) => document.querySelector(sel);

  /** An element with attributes and children (strings become text nodes). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.setAttribute('class', v);
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, String(v));
    }
  }

  function append(node, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
    }
  }

  function say(text, isError) {
    const m = $('#message');
    m.textContent = text;
    m.className = isError ? 'message error' : 'message';
    m.hidden = !text;
  }

  function errorText(body, status) {
    const issue = body && body.issue && body.issue[0];
    if (issue && issue.details && issue.details.text) return `${status}: ${issue.details.text}`;
    return `HTTP ${status}`;
  }

  /** Call the gateway; JSON in and out. A lost session goes back to the login. */
  async function api(path, options) {
    const opts = options || {};
    const headers = { Accept: 'application/json, application/fhir+json', ...(opts.headers || {}) };
    const resp = await fetch(path, { ...opts, headers, credentials: 'same-origin', cache: 'no-store' });
    if (resp.status === 401) {
      location.assign(`/login?return_to=${encodeURIComponent('/console' + location.hash)}`);
      throw new Error('the session has ended; logging in again');
    }
    const type = resp.headers.get('content-type') || '';
    const body = type.includes('json') ? await resp.json() : await resp.text();
    if (!resp.ok) throw new Error(errorText(body, resp.status));
    return body;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of params) if (v !== '' && v !== null && v !== undefined) q.append(k, v);
    return q.toString();
  }

  function today() {
    return new Date().toISOString().slice(0, 10);
  }

  function daysAgo(n) {
    return new Date(Date.now() - n * 86400000).toISOString().slice(0, 10);
  }

  /** A gateway link (absolute, with the public base URL) as a path on this origin. */
  function localPath(url) {
    const u = new URL(url, location.href);
    return u.pathname + u.search;
  }

  // ---- AuditEvent fields -------------------------------------------------------------------

  const requestor = (ev) => (ev.agent || []).find((a) => a.requestor) || {};
  const institutionOf = (ev) => {
    const who = requestor(ev).who || {};
    return (who.identifier && who.identifier.value) || '';
  };
  const userOf = (ev) => requestor(ev).altId || '';
  const purposeOf = (ev) => {
    const p = requestor(ev).purposeOfUse;
    return (p && p[0] && p[0].coding && p[0].coding[0].code) || '';
  };
  const patientOf = (ev) => {
    const e = (ev.entity || []).find((x) => x.role && x.role.code === '1');
    return (e && e.what && e.what.identifier && e.what.identifier.value) || '';
  };
  const objectOf = (ev) => (ev.entity || [])
    .filter((x) => !(x.role && x.role.code === '1'))
    .map((x) => (x.what && x.what.reference) || x.description || '')
    .filter(Boolean)
    .join('; ');
  const consentOf = (ev) => {
    const ext = (ev.extension || []).find((x) => (x.url || '').includes('consent'));
    const d = ext && (ext.extension || []).find((x) => x.url === 'decision');
    return (d && d.valueCode) || '';
  };
  const eventName = (ev) => {
    const sub = (ev.subtype && ev.subtype[0] && ev.subtype[0].code) || '';
    const type = (ev.type && ev.type.code) || '';
    return type === 'rest' ? `${sub} (${ev.action})` : `${type}/${sub} (${ev.action})`;
  };
  const outcomeText = (o) => ({ 0: 'success', 4: 'refused', 8: 'failed', 12: 'major failure' }[o] || o);
  const outcomeCell = (ev) => el('td', { class: ev.outcome === '0' ? 'outcome-ok' : 'outcome-bad', title: ev.outcomeDesc || null },
    `${ev.outcome} ${outcomeText(ev.outcome)}`);

  // ---- Views -------------------------------------------------------------------------------

  const views = ['events', 'timeline', 'alerts', 'chain', 'charts', 'reports'];
  const loaded = {};

  function show(view) {
    const name = views.includes(view) ? view : 'events';
    for (const v of views) $(`#view-${v}`).hidden = v !== name;
    for (const a of document.querySelectorAll('nav.tabs a')) {
      a.classList.toggle('active', a.dataset.view === name);
    }
    if (!loaded[name]) {
      loaded[name] = true;
      if (name === 'alerts') loadAlerts();
      if (name === 'charts') loadCharts();
    }
  }

  // Events --------------------------------------------------------------------------------------

  let nextEvents = null;

  function eventFilterQuery() {
    const from = $('#f-from').value;
    const to = $('#f-to').value;
    return query([
      ['patient', $('#f-patient').value.trim()],
      ['agent', $('#f-agent').value.trim()],
      ['date', from ? `ge${from}` : ''],
      ['date', to ? `le${to}` : ''],
      ['outcome', $('#f-outcome').value],
      ['purpose', $('#f-purpose').value],
      ['_count', $('#f-count').value],
    ]);
  }

  function eventRow(ev) {
    const patient = patientOf(ev);
    const jsonRow = el('tr', { class: 'json-row', hidden: true },
      el('td', { colspan: 10 }, el('pre', { class: 'json' }, JSON.stringify(ev, null, 2))));
    const row = el('tr', { 'data-id': ev.id },
      el('td', {}, ev.recorded),
      el('td', {}, eventName(ev)),
      outcomeCell(ev),
      el('td', { class: 'institution' }, institutionOf(ev)),
      el('td', {}, userOf(ev)),
      el('td', {}, purposeOf(ev)),
      el('td', {}, patient ? el('a', { class: 'link-button', href: '#timeline', onclick: (e) => {
        e.preventDefault();
        openTimeline(patient);
      } }, patient) : ''),
      el('td', {}, objectOf(ev)),
      el('td', {}, consentOf(ev)),
      el('td', {}, el('button', { type: 'button', class: 'show-json', onclick: () => { jsonRow.hidden = !jsonRow.hidden; } }, 'JSON')));
    return [row, jsonRow];
  }

  async function searchEvents(path, appendRows) {
    const body = $('#event-table tbody');
    try {
      const bundle = await api(path);
      if (!appendRows) body.replaceChildren();
      const entries = bundle.entry || [];
      for (const e of entries) append(body, eventRow(e.resource));
      const next = (bundle.link || []).find((l) => l.relation === 'next');
      nextEvents = next ? localPath(next.url) : null;
      $('#event-more').hidden = !nextEvents;
      const shown = body.querySelectorAll('tr[data-id]').length;
      $('#event-status').textContent = `${shown} event(s), newest first${nextEvents ? '; older events on the next page' : ''}.`;
      say('');
    } catch (err) {
      say(`Search failed: ${err.message}`, true);
    }
  }

  // Timeline ------------------------------------------------------------------------------------

  function openTimeline(patient) {
    $('#t-patient').value = patient;
    location.hash = '#timeline';
    loadTimeline();
  }

  async function loadTimeline() {
    const patient = $('#t-patient').value.trim();
    if (!patient) return;
    const events = [];
    let path = `/fhir/AuditEvent?${query([['patient', patient], ['_count', '500']])}`;
    try {
      // At most 4 pages (2,000 events) on one screen.
      for (let page = 0; path && page < 4; page += 1) {
        const bundle = await api(path);
        for (const e of bundle.entry || []) events.push(e.resource);
        const next = (bundle.link || []).find((l) => l.relation === 'next');
        path = next ? localPath(next.url) : null;
      }
    } catch (err) {
      say(`Timeline failed: ${err.message}`, true);
      return;
    }
    say('');
    renderTimeline(patient, events, Boolean(path));
  }

  function renderTimeline(patient, events, truncated) {
    const list = $('#timeline-list');
    const strip = $('#timeline-strip');
    list.replaceChildren();
    strip.replaceChildren();
    const institutions = new Set(events.map(institutionOf).filter(Boolean));
    const refused = events.filter((e) => e.outcome !== '0').length;
    $('#timeline-status').textContent = events.length === 0
      ? `No recorded access to ${patient}.`
      : `${events.length} record(s) about ${patient} by ${institutions.size} institution(s), ${refused} refused or failed; from ${events[events.length - 1].recorded} to ${events[0].recorded}${truncated ? ' (only the newest 2,000 shown)' : ''}.`;
    if (events.length === 0) return;
    // A strip: one mark per record along the time axis (oldest left).
    const times = events.map((e) => Date.parse(e.recorded));
    const [min, max] = [Math.min(...times), Math.max(...times)];
    const width = 900;
    const x = (t) => 10 + (max === min ? (width - 20) / 2 : ((t - min) / (max - min)) * (width - 20));
    const marks = events.map((e, i) => svg('circle', {
      cx: x(times[i]).toFixed(1), cy: e.outcome === '0' ? 18 : 34, r: 5,
      class: e.outcome === '0' ? 'accesses' : 'denials',
    }, svg('title', {}, `${e.recorded} ${institutionOf(e) || userOf(e) || 'unauthenticated'} ${eventName(e)}`)));
    strip.append(svg('svg', { width, height: 60, viewBox: `0 0 ${width} 60`, role: 'img', 'aria-label': 'Accesses over time' },
      svg('line', { x1: 10, y1: 26, x2: width - 10, y2: 26, class: 'axis' }),
      marks,
      svg('text', { x: 10, y: 56 }, events[events.length - 1].recorded.slice(0, 16).replace('T', ' ')),
      svg('text', { x: width - 10, y: 56, 'text-anchor': 'end' }, events[0].recorded.slice(0, 16).replace('T', ' '))));
    // Grouped by day, newest first.
    let dayList = null;
    let currentDay = null;
    for (const e of events) {
      const day = e.recorded.slice(0, 10);
      if (day !== currentDay) {
        currentDay = day;
        dayList = el('ul');
        list.append(el('li', { class: 'day' }, el('h3', {}, day), dayList));
      }
      const who = institutionOf(e) || userOf(e) || 'unauthenticated';
      const purpose = purposeOf(e);
      const consent = consentOf(e);
      dayList.append(el('li', { class: e.outcome === '0' ? 'access' : 'refused' },
        el('b', {}, e.recorded.slice(11, 19)), ' ',
        el('span', { class: 'institution' }, who), ' · ', eventName(e),
        purpose ? ` · purpose ${purpose}` : '',
        ` · ${outcomeText(e.outcome)}`,
        consent ? ` · consent ${consent}` : '',
        objectOf(e) ? ` · ${objectOf(e)}` : ''));
    }
  }

  // Alerts --------------------------------------------------------------------------------------

  async function loadAlerts() {
    const body = $('#alert-table tbody');
    try {
      const list = await api(`/audit/alerts?${query([['status', $('#a-status').value], ['_count', '500']])}`);
      body.replaceChildren();
      for (const a of list.items) body.append(alertRow(a));
      $('#alert-status').textContent = `${list.items.length} alert(s), newest first.`;
    } catch (err) {
      say(`Alerts failed: ${err.message}`, true);
    }
  }

  function detailText(detail) {
    if (detail && typeof detail === 'object') {
      return Object.entries(detail).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`).join(', ');
    }
    return String(detail);
  }

  function alertRow(a) {
    const ackCell = el('td', { class: 'ack' });
    if (a.status === 'acknowledged') {
      ackCell.append(`by ${a.ack_by} at ${a.ack_at}: `, el('q', { class: 'ack-note' }, a.ack_note || ''));
    } else {
      const note = el('input', { type: 'text', class: 'ack-note-input', 'aria-label': `Note for alert ${a.id}`, maxlength: 2000, placeholder: 'What was checked' });
      const button = el('button', { type: 'submit', class: 'ack-button' }, 'Acknowledge');
      const form = el('form', { class: 'ack-form', onsubmit: async (e) => {
        e.preventDefault();
        if (!note.value.trim()) {
          say('An acknowledgement needs a note.', true);
          return;
        }
        button.disabled = true;
        try {
          const updated = await api(`/audit/alerts/${encodeURIComponent(a.id)}/ack`, {
            method: 'POST',
            headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrfToken || '' },
            body: JSON.stringify({ note: note.value.trim() }),
          });
          row.replaceWith(alertRow(updated));
          say(`Alert ${a.rule} acknowledged.`);
        } catch (err) {
          button.disabled = false;
          say(`Acknowledgement failed: ${err.message}`, true);
        }
      } }, note, ' ', button);
      ackCell.append(form);
    }
    const row = el('tr', { 'data-id': a.id, 'data-rule': a.rule },
      el('td', {}, a.created_at),
      el('td', { class: 'rule' }, a.rule),
      el('td', {}, a.agent || ''),
      el('td', {}, a.patient_id ? el('a', { class: 'link-button', href: '#timeline', onclick: (e) => {
        e.preventDefault();
        openTimeline(a.patient_id);
      } }, a.patient_id) : ''),
      el('td', {}, detailText(a.detail)),
      el('td', { class: 'alert-state' }, a.status),
      ackCell);
    return row;
  }

  // Chain ---------------------------------------------------------------------------------------

  async function verifyChain() {
    const button = $('#verify-chain');
    button.disabled = true;
    $('#chain-verdict').textContent = 'verifying…';
    $('#chain-verdict').className = '';
    $('#chain-result').hidden = false;
    try {
      const r = await api(`/audit/chain?${query([['from', $('#c-from').value], ['to', $('#c-to').value]])}`);
      $('#chain-verdict').textContent = r.status;
      $('#chain-verdict').className = r.status;
      $('#chain-summary').textContent = r.summary;
      const facts = [
        ['Positions checked', r.first_seq ? `${r.first_seq}..${r.last_seq}` : '—'],
        ['Records', r.records],
        ['Checkpoints verified', r.checkpoints],
        ['Chain head', r.head_seq],
        ['Last signed checkpoint', r.checkpoint_seq || 'none yet'],
        ['Checkpoint key id', r.key_id],
        ['Verified at (UTC)', r.verified_at],
        ['Took', `${r.duration_ms} ms`],
      ];
      $('#chain-facts tbody').replaceChildren(...facts.map(([k, v]) => el('tr', {}, el('th', {}, k), el('td', {}, String(v)))));
      $('#chain-problems').hidden = r.status !== 'failed';
      $('#chain-broken-at').textContent = r.broken_at === null ? '' : String(r.broken_at);
      $('#chain-problem-table tbody').replaceChildren(...r.problems.map((p) => el('tr', {},
        el('td', { class: 'num' }, String(p.seq)), el('td', {}, p.kind), el('td', {}, p.detail))));
      say('');
    } catch (err) {
      $('#chain-verdict').textContent = 'not verified';
      say(`Verification failed to run: ${err.message}`, true);
    } finally {
      button.disabled = false;
    }
  }

  // Charts --------------------------------------------------------------------------------------

  async function loadCharts() {
    if (!$('#g-to').value) $('#g-to').value = today();
    if (!$('#g-from').value) $('#g-from').value = daysAgo(13);
    try {
      const stats = await api(`/audit/stats/daily?${query([['from', $('#g-from').value], ['to', $('#g-to').value]])}`);
      renderCharts(stats);
      say('');
    } catch (err) {
      say(`Charts failed: ${err.message}`, true);
    }
  }

  function renderCharts(stats) {
    const rows = $('#chart-rows');
    rows.replaceChildren();
    $('#chart-status').textContent = `${stats.rows.length} requester(s), ${stats.from} to ${stats.to} (UTC days).`;
    const n = stats.days.length;
    const max = Math.max(1, ...stats.rows.flatMap((r) => r.accesses.concat(r.denials)));
    const slot = Math.max(8, Math.min(40, Math.floor(860 / Math.max(n, 1))));
    const barW = Math.max(3, Math.floor((slot - 2) / 2));
    const plotH = 80;
    const top = 12;
    const width = 40 + n * slot;
    const labelEvery = Math.ceil(n / Math.floor(860 / 44));
    for (const r of stats.rows) {
      const parts = [svg('line', { x1: 36, y1: plotH + 4, x2: width, y2: plotH + 4, class: 'axis' }),
        svg('text', { x: 32, y: 12, 'text-anchor': 'end' }, String(max)),
        svg('text', { x: 32, y: plotH + 4, 'text-anchor': 'end' }, '0')];
      stats.days.forEach((day, i) => {
        const x0 = 40 + i * slot;
        for (const [kind, values, dx] of [['accesses', r.accesses, 0], ['denials', r.denials, barW]]) {
          const v = values[i];
          const h = v === 0 ? 0 : Math.max(1, Math.round((v / max) * plotH));
          parts.push(svg('rect', { x: x0 + dx, y: plotH + 4 - h, width: barW, height: h, class: kind, 'data-day': day, 'data-value': v },
            svg('title', {}, `${r.requester} ${day}: ${v} ${kind}`)));
          if (v > 0) {
            parts.push(svg('text', { x: x0 + dx + barW / 2, y: plotH + 1 - h, 'text-anchor': 'middle', class: `value ${kind}` }, String(v)));
          }
        }
        if (i % labelEvery === 0) parts.push(svg('text', { x: x0, y: plotH + 18 }, day.slice(5)));
      });
      rows.append(el('figure', { class: 'chart-row', 'data-requester': r.requester },
        el('h3', {}, el('span', { class: 'requester' }, r.requester),
          el('span', { class: 'totals' }, `${r.total_accesses} accesses, ${r.total_denials} refused or failed`)),
        svg('svg', { width, height: plotH + 24 + top, viewBox: `0 ${-top} ${width} ${plotH + 24 + top}`, role: 'img',
          'aria-label': `${r.requester}: accesses and denials per day` }, parts)));
    }
    if (stats.rows.length === 0) rows.append(el('p', {}, 'No records in this period.'));
  }

  // Reports -------------------------------------------------------------------------------------

  function updateReportLinks() {
    const params = [['from', $('#r-from').value], ['to', $('#r-to').value]];
    $('#report-html').href = `/audit/report?${query([...params, ['format', 'html']])}`;
    $('#report-csv').href = `/audit/report?${query([...params, ['format', 'csv']])}`;
  }

  // Session -------------------------------------------------------------------------------------

  async function loadSession() {
    try {
      const s = await api('/console/session');
      csrfToken = s.csrf_token;
      $('#who').textContent = `${s.name || s.subject} (${s.roles.join(', ')})`;
    } catch (err) {
      say(`Session: ${err.message}`, true);
    }
  }

  async function logout() {
    try {
      await api('/logout', { method: 'POST', headers: { 'X-CSRF-Token': csrfToken || '' } });
    } catch (err) {
      say(`Logout failed: ${err.message}`, true);
      return;
    }
    document.body.replaceChildren(el('main', { class: 'refused' }, el('h1', {}, 'Logged out'),
      el('p', {}, el('a', { href: '/console' }, 'Open the console again'))));
  }

  function start() {
    const onSubmit = (selector, action) => $(selector).addEventListener('submit', (e) => {
      e.preventDefault();
      action();
    });
    onSubmit('#event-filter', () => searchEvents(`/fhir/AuditEvent?${eventFilterQuery()}`, false));
    $('#event-more').addEventListener('click', () => nextEvents && searchEvents(nextEvents, true));
    onSubmit('#timeline-form', loadTimeline);
    onSubmit('#alert-filter', loadAlerts);
    onSubmit('#chain-form', verifyChain);
    onSubmit('#chart-form', loadCharts);
    $('#r-from').value = daysAgo(30);
    $('#r-to').value = today();
    $('#r-from').addEventListener('change', updateReportLinks);
    $('#r-to').addEventListener('change', updateReportLinks);
    updateReportLinks();
    $('#logout').addEventListener('click', logout);
    window.addEventListener('hashchange', () => show(location.hash.slice(1)));
    loadSession().then(() => {
      show(location.hash.slice(1));
      searchEvents(`/fhir/AuditEvent?${eventFilterQuery()}`, false);
    });
  }

  document.addEventListener('DOMContentLoaded', start);
})();
