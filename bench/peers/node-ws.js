// Node.js + ws peer: an idiomatic user -> Set<socket> map. PORT, DB, SECRET, MODE from the env.
const http = require("http");
const { WebSocketServer } = require("ws");
const Database = require("better-sqlite3");
const { verify, changeEvent, readyEvent, router } = require("./common.js");

const { PORT = "8090", DB, SECRET, MODE = "user" } = process.env;
const db = new Database(DB, { readonly: true });
const route = router(MODE, db);
const sockets = new Map(); // user -> Set<ws>

const server = http.createServer((req, res) => {
  if (req.url === "/healthz") { res.end('{"status":"ok"}'); return; }
  res.statusCode = 404; res.end();
});
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://x");
  const user = url.pathname === "/v1/ws" ? verify(url.searchParams.get("token"), SECRET) : null;
  if (!user) { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (!sockets.has(user)) sockets.set(user, new Set());
    sockets.get(user).add(ws);
    ws.on("close", () => { const s = sockets.get(user); s.delete(ws); if (s.size === 0) sockets.delete(user); });
    ws.on("error", () => {});
    ws.send(readyEvent(user));
  });
});

let last = db.prepare("SELECT coalesce(max(rowid), 0) AS m FROM orders").get().m;
const tail = db.prepare("SELECT rowid AS r, _id, creator_id, item_id, quantity, status FROM orders WHERE rowid > ? ORDER BY rowid LIMIT 512");
function poll() {
  for (;;) {
    const rows = tail.all(last);
    for (const row of rows) {
      last = row.r;
      const json = changeEvent(row);
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
server.listen(Number(PORT), "127.0.0.1");
