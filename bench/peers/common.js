// Shared by the Node `ws` and Bun peers: HS256 token check, the change event, routing.
// The contract is changecast's: GET /v1/ws?token=<jwt> (claim `sub` = user id), a `ready`
// event, then {"type":"change","id":"<epoch>-<seq>","route":"orders","op":"insert",...}.
// Changes come from polling the `orders` table by rowid every 2 ms.
const crypto = require("crypto");

function b64url(buf) {
  return buf.toString("base64").replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
}

function verify(token, secret) {
  if (!token) return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const sig = b64url(crypto.createHmac("sha256", secret).update(parts[0] + "." + parts[1]).digest());
  if (sig !== parts[2]) return null;
  try {
    const header = JSON.parse(Buffer.from(parts[0], "base64url").toString());
    if (header.alg !== "HS256") return null;
    const claims = JSON.parse(Buffer.from(parts[1], "base64url").toString());
    if (typeof claims.exp !== "number" || claims.exp * 1000 < Date.now()) return null;
    return claims.sub || null;
  } catch (e) {
    return null;
  }
}

const EPOCH = Date.now().toString(36);
let seq = 0;

function changeEvent(row) {
  seq += 1;
  const doc = { _id: row._id, creator_id: row.creator_id, item_id: row.item_id, quantity: row.quantity, status: row.status };
  return JSON.stringify({ type: "change", id: EPOCH + "-" + seq, route: "orders", op: "insert", collection: "orders", key: row._id, at: new Date().toISOString(), doc });
}

function readyEvent(user) {
  return JSON.stringify({ type: "ready", user, position: EPOCH + "-" + seq, resumed: false });
}

// Recipients: MODE=user -> the user in creator_id; MODE=business -> every user of the business
// (users table read once at start, as a cache would).
function router(mode, db) {
  if (mode !== "business") return (row) => [row.creator_id];
  const byBusiness = new Map();
  for (const u of db.prepare("SELECT _id, business_id FROM users").all()) {
    if (!byBusiness.has(u.business_id)) byBusiness.set(u.business_id, []);
    byBusiness.get(u.business_id).push(u._id);
  }
  return (row) => byBusiness.get(row.creator_id) || [];
}

module.exports = { verify, changeEvent, readyEvent, router };
