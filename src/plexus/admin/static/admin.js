// The Plexus admin page: an overview of every node and a page per channel.
//
// It polls JSON endpoints under /admin/api/ (the overview every second, a
// channel page's details every 2 s and its live tail every second), only
// while the tab is visible. Every state-changing request carries the
// session's CSRF token in X-CSRF-Token. Everything the server or its users
// supplied goes into the page with textContent, never parsed as HTML.

const OVERVIEW_EVERY = 1000;
const CHANNEL_EVERY = 2000;
const TAIL_EVERY = 1000;
const SERIES_SECONDS = 600; // what the charts show at most (the server keeps as much)
const MIN_SPAN = 60; // seconds: a young server's charts still have a time scale
const TAIL_ROWS = 200; // rows kept on screen
const SVG = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);
const el = {
  where: $('where'),
  who: $('who'),
  logout: $('logout'),
  problem: $('problem'),
  notice: $('notice'),
  loginView: $('login-view'),
  loginForm: $('login-form'),
  password: $('password'),
  loginError: $('login-error'),
  overviewView: $('overview-view'),
  nodes: $('nodes'),
  channels: $('channels'),
  channelsEmpty: $('channels-empty'),
  openForm: $('open-form'),
  openName: $('open-name'),
  disconnectForm: $('disconnect-form'),
  disconnectKind: $('disconnect-kind'),
  disconnectName: $('disconnect-name'),
  channelView: $('channel-view'),
  channelName: $('channel-name'),
  channelError: $('channel-error'),
  people: $('people'),
  peopleTitle: $('people-title'),
  peopleEmpty: $('people-empty'),
  unsubscribeForm: $('unsubscribe-form'),
  unsubscribeUser: $('unsubscribe-user'),
  publishForm: $('publish-form'),
  publishData: $('publish-data'),
  publishError: $('publish-error'),
  tail: $('tail'),
  tailEmpty: $('tail-empty'),
  tailState: $('tail-state'),
  history: $('history'),
  historyEmpty: $('history-empty'),
};

const state = {
  csrf: null,
  user: null,
  view: null, // 'login' | 'overview' | 'channel'
  channel: null,
  generation: 0, // bumped on every view change: stale polls stop themselves
  series: new Map(), // second -> point (the cluster's)
  tailId: null,
  tailSeq: 0,
};

window.plexusAdmin = { state }; // for tests and for people poking around

// ---------------------------------------------------------------- helpers

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = 'GET', body } = {}) {
  const headers = {};
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
  if (method !== 'GET') {
    headers['Content-Type'] = 'application/json';
    if (state.csrf) headers['X-CSRF-Token'] = state.csrf;
    init.body = JSON.stringify(body === undefined ? {} : body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, 'unavailable', `server unreachable (${err.message})`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // not JSON: the status tells
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    throw new ApiError(response.status, error.code || 'internal', error.message || `HTTP ${response.status}`);
  }
  return data;
}

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

function number(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  return Number(value).toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function clock(ms) {
  if (typeof ms !== 'number') return '';
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

function json(value) {
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

let noticeTimer = null;
function notice(message, kind = 'info') {
  el.notice.textContent = message;
  el.notice.className = `notice ${kind}`;
  el.notice.dataset.kind = kind;
  show(el.notice, true);
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => show(el.notice, false), 8000);
}

function problem(message) {
  el.problem.textContent = message || '';
  show(el.problem, Boolean(message));
}

// A poll that keeps running while its view is on screen and the tab visible
// (and `work` does not return false); it waits for each answer before
// scheduling the next, so polls never pile up.
function poll(every, work) {
  const generation = state.generation;
  const step = async () => {
    if (generation !== state.generation) return;
    if (document.visibilityState === 'visible') {
      try {
        if ((await work()) === false) return;
      } catch (err) {
        if (generation !== state.generation) return;
        if (err instanceof ApiError && err.status === 401) {
          loggedOut('Your session ended: log in again.');
          return;
        }
        problem(err.message);
      }
    }
    if (generation === state.generation) setTimeout(step, every);
  };
  step();
}

// ---------------------------------------------------------------- views

function setView(view) {
  state.view = view;
  state.generation += 1;
  show(el.loginView, view === 'login');
  show(el.overviewView, view === 'overview');
  show(el.channelView, view === 'channel');
  show(el.logout, view !== 'login');
  show(el.who, view !== 'login');
}

function route() {
  if (!state.csrf) return;
  const hash = location.hash || '#/';
  const match = hash.match(/^#\/channel\/(.+)$/);
  if (match) {
    let name;
    try {
      name = decodeURIComponent(match[1]);
    } catch {
      name = match[1];
    }
    openChannel(name);
  } else {
    openOverview();
  }
}

function loggedIn(session) {
  state.csrf = session.csrf;
  state.user = session.user;
  el.who.textContent = session.user;
  el.where.textContent = session.node ? `via ${session.node}` : '';
  el.loginError.textContent = '';
  show(el.loginError, false);
  route();
}

function loggedOut(message) {
  state.csrf = null;
  state.user = null;
  setView('login');
  problem('');
  el.where.textContent = '';
  if (message) {
    el.loginError.textContent = message;
    show(el.loginError, true);
  }
  el.password.focus();
}

el.loginForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const password = el.password.value;
  show(el.loginError, false);
  try {
    const session = await api('/admin/api/login', { method: 'POST', body: { password } });
    el.password.value = '';
    loggedIn(session);
  } catch (err) {
    el.loginError.textContent = err.message;
    show(el.loginError, true);
  }
});

el.logout.addEventListener('click', async () => {
  try {
    await api('/admin/api/logout', { method: 'POST' });
  } catch {
    // the cookie may be gone already; forget the session here anyway
  }
  loggedOut('');
});

window.addEventListener('hashchange', route);
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && state.csrf) route(); // catch up at once
});

// ---------------------------------------------------------------- overview

function openOverview() {
  setView('overview');
  state.channel = null;
  let lastPoll = 0;
  poll(OVERVIEW_EVERY, async () => {
    // The whole kept series on the first poll, or after a pause (a hidden
    // tab, a slow answer): afterwards the last few seconds, merged by second.
    // Only this browser's clock is compared with itself: the server's may differ.
    const full = Date.now() - lastPoll > 4000;
    const data = await api(`/admin/api/overview${full ? '?full=1' : ''}`);
    lastPoll = Date.now();
    renderOverview(data);
  });
}

function renderOverview(data) {
  problem(data.problem);
  const totals = data.totals;
  $('total-nodes').textContent = number(totals.nodes);
  $('total-connections').textContent = number(totals.connections);
  $('total-subscriptions').textContent = number(totals.subscriptions);
  $('total-in').textContent = number(totals.in_rate, 1);
  $('total-out').textContent = number(totals.out_rate, 1);
  $('total-slow').textContent = number(totals.slow_consumers);

  for (const point of data.series) state.series.set(point.t, point);
  const horizon = Math.max(0, ...state.series.keys()) - SERIES_SECONDS; // the server's clock
  for (const t of state.series.keys()) if (t < horizon) state.series.delete(t);
  const points = [...state.series.values()].sort((a, b) => a.t - b.t);
  chart($('chart-connections'), points, [{ key: 'connections', name: 'connections' }], 0);
  chart($('chart-deliveries'), points, [
    { key: 'deliveries', name: 'deliveries/s' },
    { key: 'published', name: 'published/s' },
  ], 1);
  chart($('chart-latency'), points, [
    { key: 'p50', name: 'p50' },
    { key: 'p99', name: 'p99' },
  ], 3);

  el.nodes.replaceChildren();
  for (const node of data.nodes) {
    const row = make('tr', node.stale ? 'stale' : '');
    row.dataset.testid = 'node-row';
    row.dataset.node = node.node;
    const status = node.stale ? 'stale' : node.status || '?';
    const cells = [
      make('td', 'name', node.node),
      make('td', '', node.version),
      make('td', '', duration(node.uptime)),
      make('td', 'num', number(node.connections)),
      make('td', 'num', number(node.subscriptions)),
      make('td', 'num', number(node.in_rate, 1)),
      make('td', 'num', number(node.out_rate, 1)),
      make('td', 'num', number(node.slow_consumers)),
      make('td', `status-${status}`, status),
    ];
    cells[0].title = node.node;
    cells[0].dataset.testid = 'node-name';
    cells[3].dataset.testid = 'node-connections';
    cells[4].dataset.testid = 'node-subscriptions';
    row.append(...cells);
    el.nodes.append(row);
  }

  el.channels.replaceChildren();
  for (const channel of data.channels) {
    const row = make('tr');
    row.dataset.testid = 'channel-row';
    row.dataset.channel = channel.channel;
    const name = make('td', 'name');
    const link = make('a', 'link', channel.channel);
    link.href = channelHref(channel.channel);
    link.dataset.testid = 'channel-link';
    link.title = channel.channel;
    name.append(link);
    const subscribers = make('td', 'num', number(channel.subscribers));
    subscribers.dataset.testid = 'channel-subscribers-cell';
    row.append(name, subscribers, make('td', 'num', number(channel.rate, 1)), make('td', 'num', number(channel.messages)));
    el.channels.append(row);
  }
  show(el.channelsEmpty, data.channels.length === 0);
}

// A line chart of what is kept (up to SERIES_SECONDS, at least MIN_SPAN):
// one polyline per series, drawn in a 600x150 box stretched to the card's
// width. data-* attributes expose what is drawn (for tests; the legend says
// the latest values in words).
function chart(figure, points, lines, digits) {
  const svg = figure.querySelector('svg');
  const legend = figure.querySelector('.legend');
  const width = 600;
  const height = 150;
  const now = points.length ? points[points.length - 1].t : Math.floor(Date.now() / 1000);
  const first = points.length ? points[0].t : now;
  const span = Math.min(SERIES_SECONDS, Math.max(MIN_SPAN, now - first));
  const start = now - span;
  let max = 0;
  for (const line of lines) {
    for (const p of points) {
      const v = p[line.key];
      if (typeof v === 'number' && v > max) max = v;
    }
  }
  const top = niceCeiling(max);
  svg.replaceChildren();
  for (const f of [0.25, 0.5, 0.75]) {
    const grid = document.createElementNS(SVG, 'line');
    grid.setAttribute('class', 'grid');
    grid.setAttribute('x1', '0');
    grid.setAttribute('x2', String(width));
    grid.setAttribute('y1', String(height * f));
    grid.setAttribute('y2', String(height * f));
    svg.append(grid);
  }
  legend.replaceChildren();
  lines.forEach((line, index) => {
    const coords = [];
    let last = null;
    for (const p of points) {
      const v = p[line.key];
      if (typeof v !== 'number') continue;
      if (p.t < start) continue;
      const x = ((p.t - start) / span) * (width - 4); // room for the last dot
      const y = height - (top ? (v / top) * (height - 4) : 0) - 2;
      coords.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      last = v;
    }
    const polyline = document.createElementNS(SVG, 'polyline');
    polyline.setAttribute('class', `s${index}`);
    polyline.setAttribute('points', coords.join(' '));
    polyline.dataset.series = line.key;
    svg.append(polyline);
    if (coords.length) {
      // The latest value as a dot, visible even when it is the only point: a
      // round cap on a zero-length stroke stays round in the stretched box.
      const [x, y] = coords[coords.length - 1].split(',');
      const dot = document.createElementNS(SVG, 'path');
      dot.setAttribute('class', `dot s${index}`);
      dot.setAttribute('d', `M${x} ${y}h0`);
      svg.append(dot);
    }
    legend.append(make('span', `k${index}`, `${line.name} ${number(last, digits)}`));
    if (index === 0) {
      figure.dataset.last = last === null ? '' : String(last);
      figure.dataset.points = String(coords.length);
    }
  });
  figure.dataset.max = String(max);
  figure.querySelector('.ymax').textContent = `max ${number(top, digits)}`;
  figure.querySelector('.span').textContent = span >= 120 ? `last ${Math.round(span / 60)} min` : `last ${span} s`;
}

function niceCeiling(value) {
  if (!(value > 0)) return 0;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function channelHref(name) {
  return `#/channel/${encodeURIComponent(name)}`;
}

el.openForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const name = el.openName.value.trim();
  if (name) location.hash = channelHref(name);
});

el.disconnectForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const kind = el.disconnectKind.value === 'client' ? 'client' : 'user';
  const name = el.disconnectName.value.trim();
  if (!name) return;
  await act('/admin/api/disconnect', { [kind]: name }, (r) => `Disconnected ${r.disconnected} connection(s) of ${kind} ${name}.`);
});

async function act(path, body, describe) {
  try {
    const result = await api(path, { method: 'POST', body });
    notice(describe(result));
    return result;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) loggedOut('Your session ended: log in again.');
    else notice(`${err.code}: ${err.message}`, 'error');
    return null;
  }
}

// ---------------------------------------------------------------- channel page

function openChannel(name) {
  setView('channel');
  state.channel = name;
  state.tailId = null;
  state.tailSeq = 0;
  el.channelName.textContent = name;
  el.tail.replaceChildren();
  el.history.replaceChildren();
  el.people.replaceChildren();
  el.tailEmpty.textContent = 'Waiting for messages published from now on…';
  show(el.tailEmpty, true);
  show(el.channelError, false);
  el.publishError.textContent = '';
  show(el.publishError, false);
  el.tailState.dataset.state = 'off';
  for (const id of ['channel-offset', 'channel-epoch', 'channel-subscribers', 'channel-present']) $(id).textContent = '–';
  const generation = state.generation;
  poll(CHANNEL_EVERY, async () => {
    try {
      renderChannel(await api(`/admin/api/channel?name=${encodeURIComponent(name)}`));
    } catch (err) {
      if (err instanceof ApiError && err.status === 400) {
        channelError(err);
        return false; // a bad name: nothing more to ask
      }
      throw err;
    }
  });
  pollTail(name, generation);
}

function channelError(err) {
  el.channelError.textContent = `${err.code}: ${err.message}`;
  show(el.channelError, true);
}

function pollTail(name, generation) {
  const step = async () => {
    if (generation !== state.generation) return;
    if (document.visibilityState === 'visible') {
      try {
        const query = `channel=${encodeURIComponent(name)}&after=${state.tailSeq}&tail=${state.tailId || ''}`;
        const data = await api(`/admin/api/tail?${query}`);
        if (generation !== state.generation) return;
        if (data.tail !== state.tailId) {
          if (state.tailId !== null) appendTail({ type: 'note', text: 'the live tail restarted: events may have been missed' });
          state.tailId = data.tail;
        }
        for (const event of data.events) appendTail(event);
        state.tailSeq = data.seq;
        el.tailState.dataset.state = 'on';
        el.tailState.title = 'live';
      } catch (err) {
        if (generation !== state.generation) return;
        el.tailState.dataset.state = 'error';
        el.tailState.title = err.message;
        if (err instanceof ApiError && err.status === 401) {
          loggedOut('Your session ended: log in again.');
          return;
        }
        if (err instanceof ApiError && err.status === 400) return; // a bad name: shown by the details poll
        el.tailEmpty.textContent = `Live tail unavailable: ${err.message}`;
        show(el.tailEmpty, el.tail.childElementCount === 0);
      }
    }
    if (generation === state.generation) setTimeout(step, TAIL_EVERY);
  };
  step();
}

function renderChannel(data) {
  problem('');
  $('channel-offset').textContent = number(data.offset);
  $('channel-epoch').textContent = data.epoch || '–';
  $('channel-subscribers').textContent = number(data.subscribers);
  $('channel-present').textContent = data.presence ? number(data.present) : 'not kept';

  const rows = data.presence
    ? data.presence.map((p) => ({ client: p.client, user: p.user, info: p.info, node: null }))
    : data.clients.map((c) => ({ client: c.client, user: c.user, info: undefined, node: c.node }));
  el.peopleTitle.textContent = data.presence ? 'Presence' : 'Subscribers';
  el.people.replaceChildren();
  for (const person of rows) el.people.append(personRow(data.channel, person));
  show(el.peopleEmpty, rows.length === 0);

  el.history.replaceChildren();
  for (const message of data.history.slice().reverse()) el.history.append(eventRow(message, 'history-row'));
  show(el.historyEmpty, data.history.length === 0);
}

function personRow(channel, person) {
  const li = make('li');
  li.dataset.testid = 'person';
  li.dataset.client = person.client;
  const user = make('span', 'user', person.user === null || person.user === undefined ? 'anonymous' : person.user);
  user.dataset.testid = 'person-user';
  const client = make('span', 'client', person.client);
  client.dataset.testid = 'person-client';
  li.append(user, client);
  if (person.node) li.append(make('span', 'node', `on ${person.node}`));
  const actions = make('span', 'actions');
  const unsubscribe = make('button', 'danger', 'Unsubscribe');
  unsubscribe.type = 'button';
  unsubscribe.dataset.testid = 'person-unsubscribe';
  unsubscribe.addEventListener('click', () =>
    act('/admin/api/unsubscribe', { channel, client: person.client }, (r) => `Unsubscribed ${r.unsubscribed} subscription(s) of client ${person.client}.`),
  );
  const disconnect = make('button', 'danger', 'Disconnect');
  disconnect.type = 'button';
  disconnect.dataset.testid = 'person-disconnect';
  disconnect.addEventListener('click', () =>
    act('/admin/api/disconnect', { client: person.client }, (r) => `Disconnected ${r.disconnected} connection(s) (client ${person.client}).`),
  );
  actions.append(unsubscribe, disconnect);
  li.append(actions);
  if (person.info !== undefined && person.info !== null) {
    const info = make('span', 'info', json(person.info));
    info.dataset.testid = 'person-info';
    li.append(info);
  }
  return li;
}

function eventRow(event, testid) {
  const li = make('li');
  li.dataset.testid = testid;
  li.dataset.type = event.type;
  const kind = make('span', 'kind', event.type);
  li.append(kind);
  if (event.type === 'message') {
    li.dataset.offset = String(event.offset);
    const from = event.from ? event.from.user || event.from.client : 'server';
    li.append(make('span', 'meta', `#${event.offset} · ${clock(event.time)} · from ${from}`));
    const data = make('pre', 'data', json(event.data));
    data.dataset.testid = 'event-data';
    li.append(data);
  } else if (event.type === 'join' || event.type === 'leave') {
    li.append(make('span', 'meta', `${event.user === null ? 'anonymous' : event.user} · ${event.client}`));
  } else if (event.type === 'gap') {
    li.append(make('span', 'meta', 'some messages could not be shown (the channel skipped ahead)'));
  } else {
    li.append(make('span', 'meta', event.text || json(event)));
  }
  return li;
}

function appendTail(event) {
  show(el.tailEmpty, false);
  el.tail.prepend(eventRow(event, 'tail-row')); // newest first
  while (el.tail.childElementCount > TAIL_ROWS) el.tail.lastElementChild.remove();
}

el.publishForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  show(el.publishError, false);
  let data;
  try {
    data = JSON.parse(el.publishData.value);
  } catch (err) {
    el.publishError.textContent = `not valid JSON: ${err.message}`;
    show(el.publishError, true);
    return;
  }
  const channel = state.channel;
  const result = await act('/admin/api/publish', { channel, data }, (r) => `Published to ${channel} at offset ${r.offset}.`);
  if (result === null) {
    el.publishError.textContent = el.notice.textContent;
    show(el.publishError, true);
  }
});

el.unsubscribeForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const user = el.unsubscribeUser.value.trim();
  if (!user) return;
  const channel = state.channel;
  await act('/admin/api/unsubscribe', { channel, user }, (r) => `Unsubscribed ${r.unsubscribed} subscription(s) of user ${user} from ${channel}.`);
});

// ---------------------------------------------------------------- start

(async () => {
  try {
    loggedIn(await api('/admin/api/session'));
  } catch (err) {
    loggedOut(err instanceof ApiError && err.status === 401 ? '' : err.message);
  }
})();
