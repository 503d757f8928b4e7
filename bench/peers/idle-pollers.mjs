// Idle Tether workers: COUNT of them, each long-polling an empty environment again and again, in a
// process of their own so that they do not slow the event loop of the worker whose latencies bench.mjs
// measures beside them.
//
//   node idle-pollers.mjs ORIGIN TOKEN ENVIRONMENT COUNT [H2]      (started by bench.mjs with an IPC channel)
//
// Without H2 each worker has an HTTP/1.1 connection of its own. With H2 (a number) the workers share H2
// HTTP/2 connections (cleartext, prior knowledge), COUNT/H2 streams on each: the way the workers of one
// machine would share a connection, and the way graphile-worker's idle workers share a pool.
//
// Sends {ev: "ready"} once every poller has had one answer; stops on {cmd: "halt"} (after the polls in
// flight return, within a second) and answers {ev: "halted"}.
import http2 from "node:http2";
import { Pool } from "undici";

const [origin, token, environment, countText, h2Text] = process.argv.slice(2);
const count = Number(countText);
const h2Connections = h2Text === undefined ? 0 : Number(h2Text);
if (!Number.isInteger(count) || count < 1 || !Number.isInteger(h2Connections) || h2Connections < 0) {
    throw new Error(`idle-pollers: bad COUNT ${countText} or H2 ${h2Text}`);
}

// One GET, answered as { status, text }, over whichever transport was chosen.
let get;
let close;
if (h2Connections > 0) {
    const sessions = Array.from({ length: h2Connections }, () => {
        const session = http2.connect(origin);
        session.on("error", (error) => process.send({ ev: "error", error: `HTTP/2 session: ${error}` }));
        return session;
    });
    get = (w, path, headers) =>
        new Promise((resolve, reject) => {
            const request = sessions[w % sessions.length].request({ ":method": "GET", ":path": path, ...headers });
            let status = 0;
            let text = "";
            request.setEncoding("utf8");
            request.on("response", (head) => (status = head[":status"]));
            request.on("data", (chunk) => (text += chunk));
            request.on("end", () => resolve({ status, text }));
            request.on("error", reject);
            request.end();
        });
    close = async () => {
        await Promise.all(sessions.map((s) => new Promise((resolve) => s.close(resolve))));
    };
} else {
    const pool = new Pool(origin, {
        connections: count,
        pipelining: 1,
        keepAliveTimeout: 120_000,
        keepAliveMaxTimeout: 600_000,
        headersTimeout: 30_000,
        bodyTimeout: 30_000,
        connectTimeout: 60_000,
    });
    get = async (_w, path, headers) => {
        const res = await pool.request({ method: "GET", path, headers });
        return { status: res.statusCode, text: await res.body.text() };
    };
    close = () => pool.close();
}

let stopping = false;
let answered = 0;
let readySent = false;
const pollers = Array.from({ length: count }, async (_, w) => {
    let first = true;
    while (!stopping) {
        const { status, text } = await get(w, `/api/v1/cloud/environments/${environment}/work/poll?block_ms=999`, {
            authorization: `Bearer ${token}`,
            "worker-id": `idle-${w}`,
        });
        if (status !== 200 || text !== "null") {
            throw new Error(`idle poll: ${status} ${text.slice(0, 200)}`);
        }
        if (first) {
            first = false;
            answered += 1;
            if (answered === count && !readySent) {
                readySent = true;
                process.send({ ev: "ready" });
            }
        }
    }
});

process.on("message", async (message) => {
    if (message.cmd !== "halt") return;
    stopping = true;
    await Promise.all(pollers);
    await close();
    process.send({ ev: "halted" });
});
Promise.all(pollers).catch((error) => {
    process.send({ ev: "error", error: String(error?.stack ?? error) });
});
process.on("disconnect", () => process.exit(0));
