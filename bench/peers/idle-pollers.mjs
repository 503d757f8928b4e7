// Idle Tether workers: COUNT connections, each long-polling an empty environment again and again, in a
// process of their own so that they do not slow the event loop of the worker whose latencies bench.mjs
// measures beside them.
//
//   node idle-pollers.mjs ORIGIN TOKEN ENVIRONMENT COUNT      (started by bench.mjs with an IPC channel)
//
// Sends {ev: "ready"} once every poller has had one answer; stops on {cmd: "halt"} (after the polls in
// flight return, within a second) and answers {ev: "halted"}.
import { Pool } from "undici";

const [origin, token, environment, countText] = process.argv.slice(2);
const count = Number(countText);
const pool = new Pool(origin, {
    connections: count,
    pipelining: 1,
    keepAliveTimeout: 120_000,
    keepAliveMaxTimeout: 600_000,
    headersTimeout: 30_000,
    bodyTimeout: 30_000,
    connectTimeout: 60_000,
});

let stopping = false;
let answered = 0;
let readySent = false;
const pollers = Array.from({ length: count }, async (_, w) => {
    let first = true;
    while (!stopping) {
        const res = await pool.request({
            method: "GET",
            path: `/api/v1/cloud/environments/${environment}/work/poll?block_ms=999`,
            headers: { authorization: `Bearer ${token}`, "worker-id": `idle-${w}` },
        });
        const text = await res.body.text();
        if (res.statusCode !== 200 || text !== "null") {
            throw new Error(`idle poll: ${res.statusCode} ${text.slice(0, 200)}`);
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
    await pool.close();
    process.send({ ev: "halted" });
});
Promise.all(pollers).catch((error) => {
    process.send({ ev: "error", error: String(error?.stack ?? error) });
});
process.on("disconnect", () => process.exit(0));
