// The chat page: one WebSocket to /ws, reconnecting with backoff when it
// drops. Everything shown comes from the server's frames: `welcome` (members
// and recent history), `message`, `joined`/`left` (with the member list and
// the server's time), `members` (the list after many changed at once: who
// is `back` after Redis lost them, who is `gone` with a crashed instance),
// `error` and `notice`.
//
// A WebSocket the server refuses (a bad room or name in the link) only
// closes with 1006: the browser hides the HTTP answer. So when a connection
// closes before its welcome, the page asks the same URL over plain HTTP,
// where the server says why in its JSON error, and stops retrying if it
// refused the join.
"use strict";

const $ = (id) => document.getElementById(id);
const seen = new Set(); // message ids already shown: a reconnect's history overlaps
let socket = null;
let wanted = null; // {room, name} while the user wants to be in a room
let retry = 0;
let retryTimer = null;

function line(className, parts) {
  const li = document.createElement("li");
  li.className = className;
  for (const [cls, text] of parts) {
    const span = document.createElement("span");
    if (cls) span.className = cls;
    span.textContent = text;
    li.appendChild(span);
  }
  const list = $("messages");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.appendChild(li);
  if (atBottom) list.scrollTop = list.scrollHeight;
  return li;
}

function showMessage(m) {
  if (seen.has(m.id)) return;
  seen.add(m.id);
  const when = new Date(m.ts).toLocaleTimeString();
  const li = line("message", [["when", when], ["who", m.name], ["text", m.text]]);
  li.dataset.id = m.id;
}

function showMembers(members) {
  const ul = $("members");
  ul.replaceChildren(...members.map((name) => {
    const li = document.createElement("li");
    li.textContent = name;
    return li;
  }));
}

function status(text, state) {
  $("status").textContent = text;
  $("status").className = state || "";
}

// "ada, bob and cy", or "ada, bob, cy and 397 others": a `members` frame
// may name a whole room.
function some(names) {
  const shown = names.slice(0, 3);
  const others = names.length - shown.length;
  if (others > 0) return `${shown.join(", ")} and ${others} others`;
  if (shown.length < 2) return shown.join("");
  return `${shown.slice(0, -1).join(", ")} and ${shown[shown.length - 1]}`;
}

// When the server logged a presence change, in local time.
function at(frame) {
  return frame.at ? new Date(frame.at).toLocaleTimeString() : "";
}

// Why the server refuses this join, or null if it would take it (its
// answer to a plain GET is then `not_websocket`) or cannot be asked.
async function refusal(url) {
  try {
    const response = await fetch(url.replace(/^ws/, "http"));
    const body = await response.json();
    const error = body.error || {};
    const refused = response.status >= 400 && response.status < 500;
    return refused && error.code !== "not_websocket" ? error.message : null;
  } catch (_) {
    return null; // the server is not there: keep trying
  }
}

function connected(up) {
  $("text").disabled = !up;
  $("send").disabled = !up;
}

function connect() {
  const { room, name } = wanted;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/ws?room=${encodeURIComponent(room)}&name=${encodeURIComponent(name)}`;
  status(`connecting to ${room}…`);
  const ws = new WebSocket(url);
  const target = wanted;
  let welcomed = false;
  socket = ws;
  ws.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    switch (frame.type) {
      case "welcome":
        welcomed = true;
        retry = 0;
        connected(true);
        status(`in ${frame.room} as ${frame.name}, served by ${frame.instance}`, "up");
        frame.history.forEach(showMessage);
        showMembers(frame.members);
        break;
      case "message":
        showMessage(frame);
        break;
      case "joined":
        line("system", [["when", at(frame)], [null, `${frame.name} joined`]]);
        showMembers(frame.members);
        break;
      case "left":
        line("system", [["when", at(frame)], [null, `${frame.name} left`]]);
        showMembers(frame.members);
        break;
      case "members":
        if (frame.back.length) {
          line("system", [["when", at(frame)], [null, `${some(frame.back)} back after the server lost them`]]);
        }
        if (frame.gone.length) {
          line("system", [["when", at(frame)], [null, `${some(frame.gone)} left: their server stopped answering`]]);
        }
        showMembers(frame.members);
        break;
      case "error":
        line("error", [[null, `${frame.code}: ${frame.message}`]]);
        break;
      case "notice":
        line("system", [[null, frame.message]]);
        break;
    }
  };
  ws.onclose = async (event) => {
    if (socket !== ws) return; // replaced by a newer connection
    socket = null;
    connected(false);
    if (!wanted) {
      status("not connected");
      return;
    }
    if (!welcomed) {
      const reason = await refusal(url);
      if (wanted !== target || socket) return; // the user joined elsewhere meanwhile
      if (reason) {
        wanted = null;
        status(`refused: ${reason}`, "refused");
        return;
      }
    }
    // Back off 0.5 s, 1 s, 2 s … up to 10 s, so a restarting server is not
    // flooded by every page at once.
    const delay = Math.min(10000, 500 * 2 ** retry++);
    const why = event.code ? `closed (${event.code}${event.reason ? ": " + event.reason : ""})` : "closed";
    status(`${why}; reconnecting in ${(delay / 1000).toFixed(1)} s`, "down");
    retryTimer = setTimeout(connect, delay);
  };
}

function join(room, name) {
  clearTimeout(retryTimer);
  wanted = null;
  if (socket) socket.close(1000, "switching rooms");
  socket = null;
  $("messages").replaceChildren();
  seen.clear();
  showMembers([]);
  wanted = { room, name };
  retry = 0;
  history.replaceState(null, "", `?room=${encodeURIComponent(room)}&name=${encodeURIComponent(name)}`);
  connect();
}

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  join($("room").value.trim(), $("name").value.trim());
});

$("say-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(JSON.stringify({ type: "say", text }));
  $("text").value = "";
});

// /?room=lobby&name=ada joins at once.
const params = new URLSearchParams(location.search);
if (params.get("room")) $("room").value = params.get("room");
if (params.get("name")) $("name").value = params.get("name");
if (params.get("room") && params.get("name")) join(params.get("room"), params.get("name"));
