// Bun peer: Bun.serve's built-in WebSocket server (uWebSockets). Per-user events go through a
// user -> Set<socket> map; account-wide events use Bun's own pub/sub, the way a Bun app fans
// out to a group: each socket subscribes to its business's topic and one server.publish()
// reaches them all (uWebSockets' topic tree, with its own batching per socket).
import { Database } from "bun:sqlite";
const { verify, changeEvent, readyEvent, router } = require("./common.js");

const { PORT = "8091", DB, SECRET, MODE = "user" } = process.env;
const db = new Database(DB, { readonly: true });
const route = router(MODE, db);
const sockets = new Map();
const businessOf = new Map();
if (MODE === "business") {
  for (const u of db.query("SELECT _id, business_id FROM users").all()) businessOf.set(u._id, u.business_id);
}

const server = Bun.serve({
  port: Number(PORT),
  hostname: "127.0.0.1",
  fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === "/healthz") return new Response('{"status":"ok"}');
    if (url.pathname !== "/v1/ws") return new Response("not found", { status: 404 });
    const user = verify(url.searchParams.get("token"), SECRET);
    if (!user) return new Response("unauthorized", { status: 401 });
    if (server.upgrade(req, { data: { user } })) return;
    return new Response("upgrade failed", { status: 400 });
  },
  websocket: {
    perMessageDeflate: false,
    open(ws) {
      const u = ws.data.user;
      if (MODE === "business") {
        const b = businessOf.get(u);
        if (b != null) ws.subscribe("business." + b);
      } else {
        if (!sockets.has(u)) sockets.set(u, new Set());
        sockets.get(u).add(ws);
      }
      ws.send(readyEvent(u));
    },
    message() {},
    close(ws) {
      const s = sockets.get(ws.data.user);
      if (s) { s.delete(ws); if (s.size === 0) sockets.delete(ws.data.user); }
    },
  },
});

let last = db.query("SELECT coalesce(max(rowid), 0) AS m FROM orders").get().m;
const tail = db.query("SELECT rowid AS r, _id, creator_id, item_id, quantity, status FROM orders WHERE rowid > ? ORDER BY rowid LIMIT 512");
function poll() {
  for (;;) {
    const rows = tail.all(last);
    for (const row of rows) {
      last = row.r;
      const json = changeEvent(row);
      if (MODE === "business") {
        server.publish("business." + row.creator_id, json);
        continue;
      }
      for (const user of route(row)) {
        const s = sockets.get(user);
        if (s) for (const ws of s) ws.send(json);
      }
    }
    if (rows.length < 512) break;
  }
  setTimeout(poll, 2);
}
poll();
