// The nchan peer's companion process: what nginx + nchan cannot do on their own.
//  - auth: answers nginx's `auth_request` subrequest (GET /auth, the client's URI in
//    X-Original-URI): 200 with X-User (and X-Business in MODE=business) when the `token`
//    query arg is a valid HS256 token (common.js `verify`), 403 otherwise.
//  - feeder: tails the `orders` table by rowid every 2 ms (like node-ws.js) and POSTs each
//    change, as `changeEvent(row)`, to nchan's publisher location on the same nginx:
//    MODE=user -> channel `user.<creator_id>`, MODE=business -> channel
//    `business.<creator_id>` (one publish per change; nchan fans it out).
// AUTH_PORT, PUB_PORT, DB, SECRET, MODE from the env.
const http = require("http");
const Database = require("better-sqlite3");
const { verify, changeEvent } = require("../common.js");

const { AUTH_PORT, PUB_PORT, DB, SECRET, MODE = "user" } = process.env;
const db = new Database(DB, { readonly: true });

// user -> business, read once at start (as node-ws reads its routing table).
const businessOf = new Map();
if (MODE === "business") {
  for (const u of db.prepare("SELECT _id, business_id FROM users").all()) businessOf.set(u._id, u.business_id);
}

// --- auth_request endpoint -----------------------------------------------------------------
const auth = http.createServer((req, res) => {
  const url = new URL(req.headers["x-original-uri"] || "/", "http://x");
  const user = verify(url.searchParams.get("token"), SECRET);
  let business;
  if (user && MODE === "business") business = businessOf.get(user);
  if (!user || (MODE === "business" && business == null)) {
    res.statusCode = 403; // auth_request passes 403 on: no 101, no subscription
    res.end();
    return;
  }
  res.setHeader("X-User", user);
  if (business != null) res.setHeader("X-Business", business);
  res.end();
});
auth.keepAliveTimeout = 120000; // longer than nginx's upstream keepalive_timeout
auth.listen(Number(AUTH_PORT), "127.0.0.1");

// --- feeder --------------------------------------------------------------------------------
// A few keep-alive connections to the publisher; a channel always uses the same one
// (maxSockets 1 per agent: requests queue FIFO), so a channel's messages stay in order.
const AGENTS = 4;
const agents = Array.from({ length: AGENTS }, () => new http.Agent({ keepAlive: true, maxSockets: 1 }));
function agentFor(channel) {
  let h = 0;
  for (let i = 0; i < channel.length; i++) h = (h * 31 + channel.charCodeAt(i)) | 0;
  return agents[(h >>> 0) % AGENTS];
}
let published = 0, failed = 0;
function publish(channel, body) {
  const req = http.request({
    host: "127.0.0.1", port: Number(PUB_PORT), method: "POST", path: "/pub/" + encodeURIComponent(channel),
    agent: agentFor(channel), headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) },
  }, (res) => {
    if (res.statusCode >= 300) { failed++; if (failed <= 5) console.error(`publish ${channel}: HTTP ${res.statusCode}`); }
    else published++;
    res.resume();
  });
  req.on("error", (e) => { failed++; if (failed <= 5) console.error(`publish ${channel}: ${e.message}`); });
  req.end(body);
}

const prefix = MODE === "business" ? "business." : "user.";
let last = db.prepare("SELECT coalesce(max(rowid), 0) AS m FROM orders").get().m;
const tail = db.prepare("SELECT rowid AS r, _id, creator_id, item_id, quantity, status FROM orders WHERE rowid > ? ORDER BY rowid LIMIT 512");
function poll() {
  for (;;) {
    const rows = tail.all(last);
    for (const row of rows) {
      last = row.r;
      publish(prefix + row.creator_id, changeEvent(row));
    }
    if (rows.length < 512) break;
  }
  setTimeout(poll, 2);
}
poll();
process.on("SIGTERM", () => { console.error(`published ${published}, failed ${failed}`); process.exit(0); });
