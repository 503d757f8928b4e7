// The worker side of a peer (graphile-worker or the raw SKIP LOCKED loop), in a process of its own so
// that its CPU time can be read from /proc and charged to it, as a Tether server's is.
//
//   node peer-worker.mjs graphile|raw CONNECTION_STRING      (started by bench.mjs with an IPC channel)
//
// Commands arrive as IPC messages; each answers with one message when it is done:
//   {cmd: "wake"}                         one worker; reports {ev: "got", t} per item until {cmd: "halt"}
//   {cmd: "drain", n, concurrency}        that many workers until n items are done: {ev: "drained", ms}
//   {cmd: "idle", concurrency, pool}      that many workers on an empty queue until {cmd: "halt"}
//   {cmd: "cycle", n}                     one worker, n items, the time per item: {ev: "cycled", samples}
// Times are milliseconds on CLOCK_MONOTONIC (process.hrtime), comparable between processes.
import pg from "pg";
import { run, Logger } from "graphile-worker";

const [system, connectionString] = process.argv.slice(2);
const now = () => Number(process.hrtime.bigint()) / 1e6;
const send = (message) => process.send(message);
const quiet = new Logger(() => () => {});

// --- graphile-worker: its own runner, configured as its documentation recommends (a pool at least as
// large as the concurrency), tasks named "bench"; the "other" task stands for another environment.
async function graphileRunner({ concurrency, pool, onJob }) {
    return run({
        connectionString,
        concurrency,
        maxPoolSize: pool ?? concurrency + 2,
        noHandleSignals: true,
        pollInterval: 2000,
        logger: quiet,
        taskList: { bench: async (payload) => onJob(payload) },
    });
}

// --- The raw loop: claim the oldest unclaimed row with FOR UPDATE SKIP LOCKED, then delete it. Idle
// workers wait for a NOTIFY (sent by a statement trigger on INSERT) or one second, then claim again.
const CLAIM = `UPDATE raw_jobs SET locked_by = $1, locked_at = now()
  WHERE id = (SELECT id FROM raw_jobs WHERE queue = $2 AND locked_at IS NULL
              ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING id, payload`;
const COMPLETE = "DELETE FROM raw_jobs WHERE id = $1";

async function rawRunner({ concurrency, pool, onJob, timed }) {
    const db = new pg.Pool({ connectionString, max: pool ?? concurrency });
    const listener = new pg.Client({ connectionString });
    // An idle connection whose database was dropped under it reports an error event, which would end
    // this process if nobody listened; queries in flight reject anyway.
    const ended = (error) => console.error(`peer-worker: a database connection ended: ${error.message}`);
    db.on("error", ended);
    listener.on("error", ended);
    await listener.connect();
    let generation = 0;
    const waiters = new Set();
    listener.on("notification", () => {
        generation += 1;
        for (const wake of waiters) wake();
        waiters.clear();
    });
    await listener.query("LISTEN raw_jobs");
    let stopping = false;
    const loop = async (index) => {
        while (!stopping) {
            const seen = generation;
            const started = now();
            const { rows } = await db.query({ name: "claim", text: CLAIM, values: [`w${index}`, "main"] });
            if (rows.length) {
                onJob(rows[0].payload);
                await db.query({ name: "complete", text: COMPLETE, values: [rows[0].id] });
                timed?.(now() - started);
                continue;
            }
            if (generation !== seen) continue;
            await new Promise((resolve) => {
                const timer = setTimeout(resolve, 1000);
                waiters.add(() => {
                    clearTimeout(timer);
                    resolve();
                });
            });
        }
    };
    const loops = Array.from({ length: concurrency }, (_, i) => loop(i));
    return {
        async stop() {
            stopping = true;
            for (const wake of waiters) wake();
            waiters.clear();
            await Promise.all(loops);
            await listener.end();
            await db.end();
        },
    };
}

const runner = system === "graphile" ? graphileRunner : system === "raw" ? rawRunner : null;
if (!runner) {
    console.error(`peer-worker: unknown system ${system}`);
    process.exit(2);
}

let current = null; // the runner a "halt" stops

async function handle(message) {
    switch (message.cmd) {
        case "wake":
            current = await runner({ concurrency: 1, onJob: () => send({ ev: "got", t: now() }) });
            send({ ev: "ready" });
            break;
        case "idle":
            current = await runner({ concurrency: message.concurrency, pool: message.pool, onJob: () => {} });
            send({ ev: "ready" });
            break;
        case "halt":
            await current?.stop();
            current = null;
            send({ ev: "halted" });
            break;
        case "drain": {
            let done = 0;
            let finished;
            const all = new Promise((resolve) => (finished = resolve));
            const started = now();
            let last = started;
            const r = await runner({
                concurrency: message.concurrency,
                onJob: () => {
                    done += 1;
                    if (done === message.n) {
                        last = now();
                        finished();
                    }
                },
            });
            await all;
            await r.stop();
            send({ ev: "drained", ms: last - started, done });
            break;
        }
        case "cycle": {
            // graphile-worker does not expose a claim, so its time per item is the interval between one
            // job's start and the next one's: complete, fetch the next, call the task. The raw loop times
            // its claim and complete directly.
            const samples = [];
            let previous = null;
            let finished;
            const all = new Promise((resolve) => (finished = resolve));
            let r = null;
            const record = (ms) => {
                if (samples.length < message.n) samples.push(ms);
                if (samples.length === message.n) finished();
            };
            r = await runner({
                concurrency: 1,
                onJob: () => {
                    if (system !== "graphile") return;
                    const t = now();
                    if (previous !== null) record(t - previous);
                    previous = t;
                },
                timed: system === "raw" ? record : undefined,
            });
            await all;
            await r.stop();
            send({ ev: "cycled", samples });
            break;
        }
        default:
            throw new Error(`unknown command ${JSON.stringify(message)}`);
    }
}

process.on("message", (message) => {
    handle(message).catch((error) => {
        send({ ev: "error", error: String(error?.stack ?? error) });
    });
});
process.on("disconnect", () => process.exit(0));
