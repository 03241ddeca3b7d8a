// The Plexus chat app: rooms are `chat:<name>` channels.
//
// Message data shapes (what this app publishes; anything else is shown as text):
//   {kind: "text",   text, nick, uid}
//   {kind: "image",  mime, bytes: Uint8Array, nick, uid, name}
//   {kind: "typing", nick, uid}            (never shown as a chat line)
// `uid` is a random id kept in localStorage: it tells this browser's own
// messages apart (the connection id changes on every reconnect).
//
// All user text goes into the page with textContent, never innerHTML.
import { Plexus } from './plexus.js';

const HISTORY_LINES = 50; // chat lines shown on entering a room
const HISTORY_PAGE = 10; // messages per history request: a page full of images stays < 1 MiB
const HISTORY_MAX_PAGES = 40; // typing messages are in history too; bound the walk back
const MAX_IMAGE_BYTES = 256 * 1024;
const IMAGE_TYPES = new Set(['image/png', 'image/jpeg', 'image/gif', 'image/webp']);
const TYPING_SEND_EVERY = 2500;
const TYPING_SHOW_FOR = 4000;
const TYPING_STALE_AFTER = 15000; // older typing notes (replayed after a reconnect) are ignored
const ROOM_NAME = /^[A-Za-z0-9_.-]{1,48}$/;
const NEAR_BOTTOM = 120;

const $ = (id) => document.getElementById(id);
const el = {
  app: $('app'),
  rooms: $('rooms'),
  roomForm: $('room-form'),
  roomInput: $('room-input'),
  online: $('online'),
  onlineCount: $('online-count'),
  meNick: $('me-nick'),
  meAvatar: $('me-avatar'),
  nickChange: $('nick-change'),
  menu: $('menu'),
  scrim: $('scrim'),
  roomTitle: $('room-title'),
  badge: $('badge'),
  messages: $('messages'),
  typing: $('typing'),
  composer: $('composer'),
  text: $('text'),
  imageInput: $('image-input'),
  nickDialog: $('nick-dialog'),
  nickForm: $('nick-form'),
  nickInput: $('nick-input'),
  template: $('message-template'),
};

// ---------------------------------------------------------------- storage

const store = {
  get(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch {
      // private mode or full: the app works without remembering
    }
  },
};

function randomId() {
  const bytes = new Uint8Array(9);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

const me = {
  nick: typeof store.get('plexus.nick', '') === 'string' ? store.get('plexus.nick', '') : '',
  uid: store.get('plexus.uid', null),
};
if (typeof me.uid !== 'string' || !me.uid) {
  me.uid = randomId();
  store.set('plexus.uid', me.uid);
}

let rooms = store.get('plexus.rooms', ['lobby']);
if (!Array.isArray(rooms)) rooms = ['lobby'];
rooms = rooms.filter((r) => typeof r === 'string' && ROOM_NAME.test(r));
if (!rooms.includes('lobby')) rooms.unshift('lobby');

// ---------------------------------------------------------------- client

const px = new Plexus(undefined, { pingAfter: 15000, pongTimeout: 5000 });
let current = null; // the room on screen
let lastTypingSent = 0;
let badgeTimer = null;

window.plexusChat = { px, me, get room() { return current && current.name; } };

// ---------------------------------------------------------------- helpers

function text(value, max = 200) {
  return typeof value === 'string' ? value.slice(0, max) : '';
}

function firstChar(name) {
  const chars = Array.from(name.trim()); // by code point: keeps emoji and 汉字 whole
  return (chars[0] || '?').toUpperCase();
}

function hue(seed) {
  let h = 0;
  for (let i = 0; i < seed.length; i++) h = (h * 31 + seed.charCodeAt(i)) >>> 0;
  return h % 360;
}

function paintAvatar(node, name) {
  node.textContent = firstChar(name);
  node.style.setProperty('--hue', String(hue(name))); // same name, same colour everywhere
}

function isNearBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < NEAR_BOTTOM;
}

function scrollToBottom() {
  el.messages.scrollTop = el.messages.scrollHeight;
}

function authorOf(msg) {
  const data = msg.data;
  const nick = data && typeof data === 'object' ? text(data.nick, 32) : '';
  if (nick) return nick;
  if (!msg.from) return 'server';
  return msg.from.user || 'anonymous';
}

function isTyping(msg) {
  return msg.data !== null && typeof msg.data === 'object' && msg.data.kind === 'typing';
}

function toast(message, kind = 'info') {
  const node = document.createElement('div');
  node.className = `notice ${kind}`;
  node.dataset.testid = kind === 'error' ? 'error-notice' : 'notice';
  node.textContent = message;
  const stick = isNearBottom();
  el.messages.append(node);
  if (stick) scrollToBottom();
}

// ---------------------------------------------------------------- rendering

function renderMe() {
  el.meNick.textContent = me.nick;
  paintAvatar(el.meAvatar, me.nick);
}

function renderRooms() {
  el.rooms.replaceChildren();
  for (const name of rooms) {
    const li = document.createElement('li');
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'room' + (current && current.name === name ? ' active' : '');
    button.dataset.testid = 'room-item';
    button.dataset.room = name;
    const hash = document.createElement('span');
    hash.className = 'hash';
    hash.textContent = '#';
    const label = document.createElement('span');
    label.textContent = name;
    button.append(hash, label);
    button.addEventListener('click', () => enterRoom(name));
    li.append(button);
    el.rooms.append(li);
  }
}

function renderOnline(room) {
  // One entry per person (uid), however many tabs they have open.
  const people = new Map();
  for (const person of room.presence.values()) people.set(person.uid, person);
  const sorted = [...people.values()].sort((a, b) => a.nick.localeCompare(b.nick));
  el.online.replaceChildren();
  for (const person of sorted) {
    const li = document.createElement('li');
    li.dataset.testid = 'online-user';
    li.dataset.nick = person.nick;
    const avatar = document.createElement('span');
    avatar.className = 'avatar small';
    paintAvatar(avatar, person.nick);
    const name = document.createElement('span');
    name.className = 'name';
    name.dataset.testid = 'online-nick';
    name.textContent = person.nick;
    li.append(avatar, name);
    if (person.uid === me.uid) {
      const you = document.createElement('span');
      you.className = 'you';
      you.textContent = 'you';
      li.append(you);
    }
    el.online.append(li);
  }
  el.onlineCount.textContent = String(sorted.length);
}

function renderTyping(room) {
  const now = Date.now();
  const names = [];
  for (const [uid, t] of room.typers) {
    if (t.until <= now) room.typers.delete(uid);
    else names.push(t.nick);
  }
  let line = '';
  if (names.length === 1) line = `${names[0]} is typing…`;
  else if (names.length === 2) line = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) line = 'Several people are typing…';
  el.typing.textContent = line;
  el.typing.classList.toggle('active', names.length > 0);
  clearTimeout(room.typingTimer);
  if (names.length) room.typingTimer = setTimeout(() => room === current && renderTyping(room), 1000);
}

function renderBadge() {
  const state = px.state;
  let label;
  // Which transport carries the chat: a page that fell back to SSE (its
  // WebSocket was blocked) says so, for whoever wonders why.
  const transport = px.transport === 'sse' ? 'SSE' : 'WebSocket';
  if (state === 'connected') label = `Connected · ${transport}`;
  else if (state === 'connecting') label = 'Connecting…';
  else if (state === 'reconnecting') {
    if (px.retryAt !== null) {
      const seconds = Math.max(1, Math.ceil((px.retryAt - Date.now()) / 1000));
      label = `Reconnecting in ${seconds} s`;
    } else {
      label = 'Reconnecting…';
    }
  } else label = 'Offline';
  if (state !== 'connected' && typeof navigator !== 'undefined' && navigator.onLine === false) label = 'Offline';
  el.badge.textContent = label;
  el.badge.dataset.state = state;
  el.badge.dataset.transport = px.transport || '';
  el.badge.title = state === 'reconnecting' ? 'Click to retry now' : `Connection status (${transport})`;
  if (state === 'reconnecting' && badgeTimer === null) {
    badgeTimer = setInterval(renderBadge, 500);
  } else if (state !== 'reconnecting' && badgeTimer !== null) {
    clearInterval(badgeTimer);
    badgeTimer = null;
  }
}

function buildMessage(room, msg) {
  const data = msg.data;
  const node = el.template.content.firstElementChild.cloneNode(true);
  const author = authorOf(msg);
  const uid = data && typeof data === 'object' ? text(data.uid, 64) : '';
  const mine = uid !== '' && uid === me.uid;
  node.dataset.offset = String(msg.offset);
  node.dataset.kind = data && typeof data === 'object' && typeof data.kind === 'string' ? data.kind : 'other';
  if (mine) node.classList.add('mine');
  paintAvatar(node.querySelector('.avatar'), author);
  node.querySelector('.author').textContent = author;
  const time = node.querySelector('time');
  if (typeof msg.time === 'number') {
    const when = new Date(msg.time);
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    time.title = when.toLocaleString();
  }
  const body = node.querySelector('.body');
  if (data && typeof data === 'object' && data.kind === 'image' && data.bytes instanceof Uint8Array
      && IMAGE_TYPES.has(data.mime)) {
    const url = URL.createObjectURL(new Blob([data.bytes], { type: data.mime }));
    room.urls.push(url);
    const img = document.createElement('img');
    img.dataset.testid = 'message-image';
    img.alt = text(data.name, 100) || 'image';
    img.decoding = 'async';
    img.src = url;
    img.addEventListener('load', () => {
      if (room.stickToBottom) scrollToBottom();
    });
    body.append(img);
    body.classList.add('image');
  } else {
    let content;
    if (typeof data === 'string') content = data;
    else if (data && typeof data === 'object' && typeof data.text === 'string') content = data.text;
    else if (data && typeof data === 'object' && data.kind === 'image') content = '[image that cannot be shown]';
    else content = JSON.stringify(data);
    const p = document.createElement('p');
    p.dataset.testid = 'message-text';
    p.textContent = content;
    body.append(p);
  }
  return node;
}

/** Show a live message (after the history is on screen). */
function showMessage(room, msg) {
  if (room.offsets.has(msg.offset)) return;
  room.offsets.add(msg.offset);
  const stick = isNearBottom() || (msg.data && msg.data.uid === me.uid);
  room.stickToBottom = stick;
  el.messages.append(buildMessage(room, msg));
  if (stick) scrollToBottom();
}

// ---------------------------------------------------------------- rooms

function setNavOpen(open) {
  el.app.classList.toggle('nav-open', open);
  el.scrim.hidden = !open;
}

function leaveRoom() {
  if (!current) return;
  const room = current;
  current = null;
  room.sub.unsubscribe().catch(() => {});
  clearTimeout(room.typingTimer);
  for (const url of room.urls) URL.revokeObjectURL(url);
}

function enterRoom(name) {
  if (!ROOM_NAME.test(name)) {
    toast(`“${name}” is not a room name: use letters, digits, _ . -`, 'error');
    return;
  }
  setNavOpen(false);
  if (current && current.name === name) return;
  leaveRoom();
  if (!rooms.includes(name)) {
    rooms.push(name);
    store.set('plexus.rooms', rooms);
  }
  if (location.hash.slice(1) !== name) history.replaceState(null, '', `#${name}`);
  el.roomTitle.textContent = name;
  document.title = `#${name} · Plexus chat`;
  el.messages.replaceChildren();
  delete el.messages.dataset.loaded;
  el.typing.textContent = '';
  const room = {
    name,
    sub: null,
    offsets: new Set(), // offsets on screen: history and live never show one twice
    loading: true,
    buffer: [], // live messages that arrive while the history loads
    presence: new Map(), // client id -> {nick, uid}
    typers: new Map(), // uid -> {nick, until}
    typingTimer: null,
    urls: [],
    stickToBottom: true,
    needsLoad: true, // history still to be shown (again after a load cut by a disconnect)
    loadGen: 0, // a newer history load makes an older one give up
  };
  current = room;
  renderRooms();
  renderOnline(room);

  const sub = px.subscribe(`chat:${name}`, { info: { nick: me.nick, uid: me.uid } });
  room.sub = sub;
  sub.on('message', (msg) => onMessage(room, msg));
  sub.on('join', (ev) => onJoin(room, ev));
  sub.on('leave', (ev) => onLeave(room, ev));
  sub.on('subscribed', () => {
    // After every (re)subscribe: who is here may have changed while we were away.
    refreshPresence(room);
    if (room.needsLoad) loadHistory(room, false);
  });
  sub.on('lost', () => {
    loadHistory(room, true, 'Some messages could not be recovered: the room was reloaded.');
  });
  sub.on('error', (err) => toast(`Cannot enter #${name}: ${err.message} (${err.code})`, 'error'));
}

async function loadHistory(room, reset, note = '') {
  const gen = ++room.loadGen;
  room.needsLoad = false;
  room.loading = true;
  const position = room.sub.position;
  if (!position) {
    room.needsLoad = true;
    return;
  }
  const { epoch } = position;
  let end = position.offset;
  const lines = [];
  for (let pages = 0; lines.length < HISTORY_LINES && end > 0 && pages < HISTORY_MAX_PAGES; pages++) {
    const start = Math.max(0, end - HISTORY_PAGE);
    let page;
    try {
      page = await room.sub.history({ since: { offset: start, epoch }, limit: end - start });
    } catch (err) {
      if (gen !== room.loadGen || room !== current) return;
      if (err.code === 'disconnected' || err.code === 'timeout') {
        room.needsLoad = true; // the next (re)subscribe loads it again
        return;
      }
      toast(`History unavailable (${err.code})`, 'error');
      break;
    }
    if (gen !== room.loadGen || room !== current) return;
    const messages = page.messages.filter((m) => m.offset > start && m.offset <= end);
    lines.unshift(...messages.filter((m) => !isTyping(m)));
    if (messages.length === 0 || messages[0].offset > start + 1) break; // older ones are gone
    end = start;
  }
  if (gen !== room.loadGen || room !== current) return;
  if (reset) {
    el.messages.replaceChildren();
    room.offsets.clear();
    if (note) toast(note); // below the reloaded history, above what comes next
  }
  const fragment = document.createDocumentFragment();
  for (const msg of lines.slice(-HISTORY_LINES)) {
    if (room.offsets.has(msg.offset)) continue;
    room.offsets.add(msg.offset);
    fragment.append(buildMessage(room, msg));
  }
  el.messages.prepend(fragment);
  room.loading = false;
  const buffered = room.buffer.sort((a, b) => a.offset - b.offset);
  room.buffer = [];
  for (const msg of buffered) showMessage(room, msg);
  room.stickToBottom = true;
  scrollToBottom();
  el.messages.dataset.loaded = 'true';
}

function onMessage(room, msg) {
  if (room !== current) return;
  if (isTyping(msg)) {
    onTyping(room, msg);
    return;
  }
  const uid = msg.data && typeof msg.data === 'object' ? msg.data.uid : undefined;
  if (typeof uid === 'string' && room.typers.delete(uid)) renderTyping(room);
  if (room.loading) room.buffer.push(msg);
  else showMessage(room, msg);
}

function onTyping(room, msg) {
  const uid = text(msg.data.uid, 64);
  if (!uid || uid === me.uid) return;
  // Recovered or replayed typing notes are old news (with room for clock skew).
  if (typeof msg.time === 'number' && Math.abs(Date.now() - msg.time) > TYPING_STALE_AFTER) return;
  room.typers.set(uid, { nick: text(msg.data.nick, 32) || 'Someone', until: Date.now() + TYPING_SHOW_FOR });
  renderTyping(room);
}

function personOf(client, entry) {
  const info = entry && entry.info && typeof entry.info === 'object' ? entry.info : {};
  return {
    nick: text(info.nick, 32) || (entry && entry.user) || 'anonymous',
    uid: text(info.uid, 64) || `client:${client}`,
  };
}

function hasUid(room, uid) {
  for (const person of room.presence.values()) if (person.uid === uid) return true;
  return false;
}

async function refreshPresence(room) {
  try {
    const result = await room.sub.presence();
    if (room !== current) return;
    room.presence = new Map(Object.entries(result.clients || {}).map(([id, c]) => [id, personOf(id, c)]));
    renderOnline(room);
  } catch (err) {
    if (room === current && err.code !== 'disconnected') toast(`Presence unavailable (${err.code})`, 'error');
  }
}

function onJoin(room, ev) {
  if (room !== current) return;
  const person = personOf(ev.client, ev);
  const isNew = !hasUid(room, person.uid);
  room.presence.set(ev.client, person);
  renderOnline(room);
  if (isNew && person.uid !== me.uid) toast(`${person.nick} joined`);
}

function onLeave(room, ev) {
  if (room !== current) return;
  const person = room.presence.get(ev.client);
  room.presence.delete(ev.client);
  renderOnline(room);
  if (person && !hasUid(room, person.uid) && person.uid !== me.uid) {
    room.typers.delete(person.uid);
    renderTyping(room);
    toast(`${person.nick} left`);
  }
}

// ---------------------------------------------------------------- sending

function sendText() {
  const value = el.text.value.trim();
  if (!value || !current) return;
  el.text.value = '';
  autosize();
  lastTypingSent = 0;
  current.sub.publish({ kind: 'text', text: value, nick: me.nick, uid: me.uid }).catch((err) => {
    toast(`Not sent (${err.code}): ${value.slice(0, 60)}`, 'error');
    if (!el.text.value) el.text.value = value;
  });
}

function sendTyping() {
  const room = current;
  if (!room || !el.text.value.trim()) return;
  if (px.state !== 'connected' || room.sub.state !== 'subscribed') return; // not worth queueing
  const now = Date.now();
  if (now - lastTypingSent < TYPING_SEND_EVERY) return;
  lastTypingSent = now;
  room.sub.publish({ kind: 'typing', nick: me.nick, uid: me.uid }).catch(() => {});
}

function imageBudget() {
  // The whole JSON message must fit the server's frame limit; base64 adds a third.
  const max = px.maxMessageSize > 0 ? px.maxMessageSize : Infinity;
  return Math.min(MAX_IMAGE_BYTES, Math.floor(((max - 1024) * 3) / 4));
}

async function shrink(file, budget) {
  const bitmap = await createImageBitmap(file);
  const canvas = document.createElement('canvas');
  const ctx = canvas.getContext('2d');
  try {
    for (const side of [1600, 1200, 900, 640, 480, 320, 240]) {
      const scale = Math.min(1, side / Math.max(bitmap.width, bitmap.height));
      canvas.width = Math.max(1, Math.round(bitmap.width * scale));
      canvas.height = Math.max(1, Math.round(bitmap.height * scale));
      ctx.fillStyle = '#fff'; // JPEG has no transparency
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      for (const quality of [0.85, 0.7, 0.5]) {
        const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/jpeg', quality));
        if (blob && blob.size <= budget) return { bytes: new Uint8Array(await blob.arrayBuffer()), mime: 'image/jpeg' };
      }
    }
  } finally {
    bitmap.close();
  }
  throw Object.assign(new Error('image too large even when scaled down'), { code: 'too_large' });
}

async function sendImage(file) {
  if (!current) return;
  const room = current;
  if (!IMAGE_TYPES.has(file.type)) {
    toast('Only PNG, JPEG, GIF and WebP images can be sent.', 'error');
    return;
  }
  try {
    let bytes = new Uint8Array(await file.arrayBuffer());
    let mime = file.type;
    const budget = imageBudget();
    if (bytes.length > budget) ({ bytes, mime } = await shrink(file, budget));
    const name = file.name.slice(0, 100);
    await room.sub.publish({ kind: 'image', mime, bytes, nick: me.nick, uid: me.uid, name });
  } catch (err) {
    toast(`Image not sent (${err.code || 'error'}): ${err.message}`, 'error');
  }
}

function autosize() {
  el.text.style.height = 'auto';
  el.text.style.height = `${Math.min(el.text.scrollHeight, 160)}px`;
}

// ---------------------------------------------------------------- nickname

function askNick() {
  el.nickInput.value = me.nick;
  if (typeof el.nickDialog.showModal === 'function') el.nickDialog.showModal();
  else el.nickDialog.setAttribute('open', '');
  el.nickInput.focus();
}

el.nickForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const nick = el.nickInput.value.trim().slice(0, 32);
  if (!nick) return;
  const changed = nick !== me.nick;
  me.nick = nick;
  store.set('plexus.nick', nick);
  el.nickDialog.close();
  renderMe();
  if (!started) start();
  else if (changed && current) {
    // Presence info is given at subscribe: subscribe again to show the new name.
    const name = current.name;
    leaveRoom();
    enterRoom(name);
  }
});

el.nickDialog.addEventListener('cancel', (ev) => {
  if (!me.nick) ev.preventDefault(); // a nickname is needed to chat
});

// ---------------------------------------------------------------- wiring

el.composer.addEventListener('submit', (ev) => {
  ev.preventDefault();
  sendText();
});

el.text.addEventListener('keydown', (ev) => {
  // Enter sends, Shift+Enter is a new line; never while an IME composes (Chinese input).
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
    ev.preventDefault();
    sendText();
  }
});

el.text.addEventListener('input', () => {
  autosize();
  sendTyping();
});

el.imageInput.addEventListener('change', () => {
  const file = el.imageInput.files && el.imageInput.files[0];
  el.imageInput.value = '';
  if (file) sendImage(file);
});

el.roomForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = el.roomInput.value.trim().replace(/^#/, '');
  if (!name) return;
  el.roomInput.value = '';
  enterRoom(name);
});

el.nickChange.addEventListener('click', askNick);
el.menu.addEventListener('click', () => setNavOpen(!el.app.classList.contains('nav-open')));
el.scrim.addEventListener('click', () => setNavOpen(false));
el.badge.addEventListener('click', () => px.retryNow());

window.addEventListener('hashchange', () => {
  const name = decodeURIComponent(location.hash.slice(1));
  if (name && (!current || current.name !== name)) enterRoom(name);
});
window.addEventListener('online', renderBadge);
window.addEventListener('offline', renderBadge);

px.on('state', renderBadge);
px.on('retry', renderBadge);
px.on('error', (err) => {
  if (err.code === 'unauthorized' || err.code === 'token_expired') toast(`Disconnected: ${err.message}`, 'error');
  else if (err.code !== 'disconnected') toast(`Server says: ${err.message} (${err.code})`, 'error');
});

let started = false;

function start() {
  started = true;
  renderMe();
  renderBadge();
  px.connect();
  const wanted = decodeURIComponent(location.hash.slice(1));
  enterRoom(ROOM_NAME.test(wanted) ? wanted : rooms[0]);
  el.text.focus();
}

renderRooms();
renderBadge();
if (me.nick) start();
else askNick();
