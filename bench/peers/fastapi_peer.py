"""The seed's stack: FastAPI + uvicorn, its ConnectionManager written the way the seed writes it:
one socket per user (a new connection replaces the old), a change feed per connection (each
connection polls the orders table by rowid every 2 ms), a lookup per change (account-wide: the
users of the business are queried for every change), and a lock held while sending.
PORT, DB, SECRET, MODE from the environment; run with uvicorn."""
import asyncio, json, os, sqlite3, time, datetime

import jwt
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

DB, SECRET, MODE = os.environ["DB"], os.environ["SECRET"], os.environ.get("MODE", "user")
EPOCH = format(int(time.time() * 1000), "x")
app = FastAPI()


class ConnectionManager:
    def __init__(self):
        self.active_connections: dict[str, WebSocket] = {}
        self.lock = asyncio.Lock()
        self.seq = 0

    async def connect(self, user_id: str, websocket: WebSocket):
        await websocket.accept()
        self.active_connections[user_id] = websocket

    def disconnect(self, user_id: str):
        self.active_connections.pop(user_id, None)

    async def send_personal_message(self, message: str, user_id: str):
        async with self.lock:
            ws = self.active_connections.get(user_id)
            if ws is not None:
                await ws.send_text(message)


manager = ConnectionManager()


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


def recipients(db, row):
    if MODE != "business":
        return [row["creator_id"]]
    return [r[0] for r in db.execute("SELECT _id FROM users WHERE business_id = ?", (row["creator_id"],))]


@app.websocket("/v1/ws")
async def ws_endpoint(websocket: WebSocket, token: str = ""):
    try:
        user_id = jwt.decode(token, SECRET, algorithms=["HS256"])["sub"]
    except Exception:
        await websocket.close(code=1008)
        return
    await manager.connect(user_id, websocket)
    await websocket.send_text(json.dumps({"type": "ready", "user": user_id, "position": f"{EPOCH}-{manager.seq}", "resumed": False}, separators=(",", ":")))
    db = sqlite3.connect(DB)
    db.row_factory = sqlite3.Row
    last = db.execute("SELECT coalesce(max(rowid), 0) FROM orders").fetchone()[0]
    try:
        while True:
            rows = db.execute("SELECT rowid AS r, _id, creator_id, item_id, quantity, status FROM orders WHERE rowid > ? ORDER BY rowid", (last,)).fetchall()
            for row in rows:
                last = row["r"]
                if user_id not in recipients(db, row):
                    continue
                manager.seq += 1
                doc = {k: row[k] for k in ("_id", "creator_id", "item_id", "quantity", "status")}
                at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                msg = json.dumps({"type": "change", "id": f"{EPOCH}-{manager.seq}", "route": "orders", "op": "insert", "collection": "orders", "key": row["_id"], "at": at, "doc": doc}, separators=(",", ":"))
                await manager.send_personal_message(msg, user_id)
            await asyncio.sleep(0.002)
    except (WebSocketDisconnect, RuntimeError, Exception):
        manager.disconnect(user_id)
    finally:
        db.close()
