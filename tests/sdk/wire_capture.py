"""Record exactly what the official SDKs put on the wire (no Tether server needed).

Starts a tiny fake HTTP server on 127.0.0.1 that answers every route both
dialects use with canned, schema-complete bodies, drives every SDK method the
Tether tests rely on (plus `anthropic.lib.environments` poller / EnvironmentWorker)
against it, and prints one line per request: method, path+query, the headers
that matter, and the body.  Used to write WIRE_NOTES.md; re-run it after bumping
an SDK version and diff the output.

    .venv/bin/python wire_capture.py            # both SDKs
    .venv/bin/python wire_capture.py qca        # one of: qca, anthropic, poller, worker
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

NOISE = {
    "host", "accept-encoding", "connection", "user-agent", "content-length",
    "x-stainless-lang", "x-stainless-package-version", "x-stainless-os", "x-stainless-arch",
    "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-read-timeout",
    "x-qoder-lang", "x-qoder-package-version", "x-qoder-os", "x-qoder-arch", "x-qoder-runtime",
    "x-qoder-runtime-version",
}

ENV = "env_019e64e01a137caf953ac2ac7b42ec5c"
WORK = "work_019f3be4fd2475d9a784bf2c739e1194"
SESS = "sess_019f3be3fa66750bb9a1fbcde85b5fe1"
AGENT = "agent_019f3be3fa66750bb9a1fbcde85b5fe2"
TS = "2026-07-01T08:15:01Z"
SECRET = base64.urlsafe_b64encode(
    json.dumps({"sessions_token": "tth_ses_CAPTURE", "api_base_url": "http://127.0.0.1:9/"}).encode()
).decode().rstrip("=")


def work(state="queued", secret=None):
    return {
        "id": WORK, "type": "work", "environment_id": ENV,
        "data": {"type": "session", "id": SESS}, "state": state, "created_at": TS,
        "acknowledged_at": None if state == "queued" else TS, "started_at": None,
        "latest_heartbeat_at": None, "stop_requested_at": None, "stopped_at": None,
        "metadata": {"k": "v"}, "secret": secret,
    }


ENVIRONMENT = {
    "id": ENV, "type": "environment", "name": "e", "description": "", "config": {"type": "self_hosted"},
    "metadata": {}, "archived_at": None, "created_at": TS, "updated_at": TS, "scope": "organization",
}
AGENT_OBJ = {
    "id": AGENT, "type": "agent", "name": "a", "model": {"id": "claude-sonnet-4-6"}, "description": None,
    "system": None, "tools": [{"type": "custom", "name": "add", "description": "add",
                               "input_schema": {"type": "object", "properties": {}}}],
    "skills": [], "mcp_servers": [], "metadata": {}, "version": 1,
    "execution_identity": {"type": "service_account"},
    "created_at": TS, "updated_at": TS, "archived_at": None,
}
SESSION = {
    "id": SESS, "type": "session", "agent": {k: v for k, v in AGENT_OBJ.items()
                                             if k not in ("created_at", "updated_at", "archived_at", "metadata")},
    "agent_id": AGENT, "environment_id": ENV, "status": "idle", "title": None, "metadata": {},
    "environment_variables": {}, "resources": [], "vault_ids": [], "outcome_evaluations": [],
    "stats": {}, "usage": {}, "created_at": TS, "updated_at": TS, "archived_at": None,
}
EV_TOOL = {"id": "evt_01", "type": "agent.custom_tool_use", "name": "add", "input": {"a": 1, "b": 2},
           "processed_at": TS}
EV_IDLE = {"id": "evt_02", "type": "session.status_idle", "stop_reason": {"type": "end_turn"},
           "processed_at": TS}


def page(items):
    return {"data": items, "first_id": None, "last_id": None, "has_more": False, "next_page": None}


class State:
    polls = 0
    heartbeats = 0
    log: list[str] = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # silence
        pass

    def _record(self, body: bytes):
        hdrs = {k.lower(): v for k, v in self.headers.items() if k.lower() not in NOISE}
        line = f"{self.command} {self.path}\n    headers={json.dumps(hdrs, sort_keys=True)}"
        if body:
            line += f"\n    body={body.decode()!s}"
        elif self.command != "GET":
            line += "\n    body=<none>"
        State.log.append(line)

    def _send(self, status, obj, ctype="application/json"):
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _resource(self, parts, obj, deleted_type):
        """`/things` (a page of `obj`, or `obj` created) or `/things/{id}` (`obj`, or its deletion)."""
        if len(parts) == 1:
            return self._send(200, page([obj]) if self.command == "GET" else obj)
        if self.command == "DELETE":
            return self._send(200, {"id": obj["id"], "type": deleted_type})
        return self._send(200, obj)

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    def _handle(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        self._record(body)
        p = urlsplit(self.path).path
        for prefix in ("/api/v1/cloud", "/v1"):
            if p.startswith(prefix + "/"):
                p = p[len(prefix):]
                break
        m = self.command
        parts = p.strip("/").split("/")
        if parts[0] == "environments":
            if len(parts) <= 2:
                return self._resource(parts, ENVIRONMENT, "environment_deleted")
            if parts[2] == "archive":
                return self._send(200, ENVIRONMENT)
            # work
            if len(parts) == 3:
                return self._send(200, page([work()]))
            if parts[3] == "poll":
                State.polls += 1
                if State.polls == 1:
                    return self._send(200, work(secret=SECRET))
                time.sleep(0.2)
                return self._send(200, b"null")
            if parts[3] == "stats":
                return self._send(200, {"type": "work_queue_stats", "depth": 0, "pending": 0,
                                        "oldest_queued_at": None, "workers_polling": 1})
            if len(parts) == 4:
                return self._send(200, work("active"))
            action = parts[4]
            if action == "ack":
                return self._send(200, work("starting"))
            if action == "heartbeat":
                State.heartbeats += 1
                st = "active" if State.heartbeats < 3 else "stopping"
                return self._send(200, {"type": "work_heartbeat", "last_heartbeat": f"2026-07-01T08:15:0{State.heartbeats}.000001Z",
                                        "lease_extended": True, "state": st, "ttl_seconds": 2})
            if action == "stop":
                return self._send(200, work("stopped"))
        if parts[0] == "agents":
            if len(parts) == 1 and m == "GET":
                return self._send(200, page([AGENT_OBJ]))
            return self._send(200, AGENT_OBJ)
        if parts[0] == "sessions":
            if len(parts) <= 2:
                return self._resource(parts, SESSION, "session_deleted")
            if parts[2] == "cancel":
                return self._send(200, {"id": SESS, "type": "session", "status": "canceling"})
            if parts[2] == "archive":
                return self._send(200, SESSION)
            if parts[2] == "events":
                if len(parts) == 4 and parts[3] == "stream":
                    frames = b""
                    for ev in (EV_TOOL, EV_IDLE):
                        frames += f"id: {ev['id']}\nevent: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.end_headers()
                    self.wfile.write(frames)
                    self.wfile.flush()
                    time.sleep(1.5)
                    self.close_connection = True
                    return
                if m == "GET":
                    return self._send(200, page([EV_TOOL, EV_IDLE]))
                sent = json.loads(body)["events"]
                return self._send(200, {"data": [dict(e, id="evt_99", processed_at=TS) for e in sent]})
        self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": p}})


def serve():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def section(title):
    State.log.append(f"\n### {title}")


def run_qca(base):
    from qca import Managed

    c = Managed(access_token="tth_adm_QCA", base_url=f"{base}/api/v1/cloud", max_retries=0)
    section("qca environments")
    c.environments.create(name="e", config={"type": "self_hosted"}, metadata={"a": "b"})
    c.environments.list(limit=5, include_archived=True)
    c.environments.retrieve(ENV)
    c.environments.update(ENV, metadata={"a": None}, name="n")
    c.environments.archive(ENV)
    c.environments.delete(ENV)
    section("qca work")
    w = c.environments.work
    State.polls = 0
    w.poll(ENV, block_ms=999, reclaim_older_than_ms=0, worker_id="w-1")
    w.poll(ENV)
    w.ack(WORK, environment_id=ENV)
    w.heartbeat(WORK, environment_id=ENV, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=30)
    w.heartbeat(WORK, environment_id=ENV)
    w.update(WORK, environment_id=ENV, metadata={"k": "v", "gone": None})
    w.stop(WORK, environment_id=ENV)
    w.stop(WORK, environment_id=ENV, force=True)
    w.stats(ENV)
    w.retrieve(WORK, environment_id=ENV)
    w.list(ENV, limit=10, after_id=WORK)
    section("qca agents")
    c.agents.create(name="a", model="claude-sonnet-4-6",
                    tools=[{"type": "custom", "name": "add", "description": "add",
                            "input_schema": {"type": "object", "properties": {}}}])
    c.agents.retrieve(AGENT)
    c.agents.update(AGENT, version=1, description="d")
    c.agents.list(limit=2)
    c.agents.archive(AGENT)
    section("qca sessions")
    c.sessions.create(agent=AGENT, environment_id=ENV, title="t", metadata={"job": "x"})
    c.sessions.create(agent={"type": "agent", "id": AGENT, "version": 1}, environment_id=ENV)
    c.sessions.list(agent_id=AGENT, statuses=["idle", "running"], include_archived=False, limit=3)
    c.sessions.retrieve(SESS)
    c.sessions.update(SESS, title="t2", metadata={"a": None})
    c.sessions.cancel(SESS)
    c.sessions.archive(SESS)
    c.sessions.delete(SESS)
    section("qca events")
    c.sessions.events.send(SESS, events=[{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}])
    c.sessions.events.list(SESS, limit=50, order="asc", types=["agent.message"])
    with c.sessions.events.stream(SESS, last_event_id="evt_00") as s:
        for ev in s:
            State.log.append(f"    <- stream event type={ev.type} id={ev.id}")


def run_anthropic(base):
    from anthropic import Anthropic

    c = Anthropic(api_key="tth_adm_ANT", base_url=base, max_retries=0)
    section("anthropic environments")
    c.beta.environments.create(name="e", config={"type": "self_hosted"}, metadata={"a": "b"})
    c.beta.environments.list(limit=5, include_archived=True)
    c.beta.environments.retrieve(ENV)
    c.beta.environments.update(ENV, metadata={"a": None}, name="n")
    c.beta.environments.archive(ENV)
    c.beta.environments.delete(ENV)
    section("anthropic work")
    w = c.beta.environments.work
    State.polls = 0
    w.poll(ENV, block_ms=999, reclaim_older_than_ms=1, anthropic_worker_id="w-1")
    w.poll(ENV)
    w.ack(WORK, environment_id=ENV)
    w.heartbeat(WORK, environment_id=ENV, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=30)
    w.update(WORK, environment_id=ENV, metadata={"k": "v", "gone": None})
    w.stop(WORK, environment_id=ENV)
    w.stop(WORK, environment_id=ENV, force=True)
    w.stats(ENV)
    w.retrieve(WORK, environment_id=ENV)
    w.list(ENV, limit=10)
    section("anthropic agents")
    c.beta.agents.create(name="a", model="claude-sonnet-4-6",
                         tools=[{"type": "custom", "name": "add", "description": "add",
                                 "input_schema": {"type": "object", "properties": {}}}])
    c.beta.agents.retrieve(AGENT)
    c.beta.agents.update(AGENT, version=1, description="d")
    c.beta.agents.list(limit=2)
    c.beta.agents.archive(AGENT)
    section("anthropic sessions")
    c.beta.sessions.create(agent=AGENT, environment_id=ENV, title="t", metadata={"job": "x"})
    c.beta.sessions.list(agent_id=AGENT, statuses=["idle", "running"], include_archived=False, limit=3)
    c.beta.sessions.retrieve(SESS)
    c.beta.sessions.update(SESS, title="t2", metadata={"a": None})
    c.beta.sessions.archive(SESS)
    c.beta.sessions.delete(SESS)
    section("anthropic events")
    c.beta.sessions.events.send(SESS, events=[{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}])
    c.beta.sessions.events.list(SESS, limit=50, order="asc", types=["agent.message"])
    with c.beta.sessions.events.stream(SESS) as s:
        for ev in s:
            State.log.append(f"    <- stream event type={ev.type} id={ev.id}")


async def run_poller(base):
    from anthropic import AsyncAnthropic

    section("anthropic poller (client.beta.environments.work.poller)")
    State.polls = 0
    c = AsyncAnthropic(api_key="tth_adm_ANT", base_url=base, max_retries=0)
    it = c.beta.environments.work.poller(environment_id=ENV, environment_key="tth_env_KEY", worker_id="w-p",
                                         drain=True)
    async for item in it:
        State.log.append(f"    <- yielded {item.id} state={item.state}")


async def run_worker(base):
    from anthropic import AsyncAnthropic
    from anthropic.lib.environments import EnvironmentWorker
    from anthropic.lib.tools import beta_async_tool

    section("anthropic EnvironmentWorker.run")
    State.polls = 0
    State.heartbeats = 0

    @beta_async_tool
    async def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    c = AsyncAnthropic(api_key="tth_adm_ANT", base_url=base, max_retries=0)
    wk = EnvironmentWorker(c, environment_id=ENV, environment_key="tth_env_KEY", tools=[add], max_idle=0.5,
                           worker_id="w-x", workdir="/tmp")
    try:
        await asyncio.wait_for(wk.run(), timeout=6)
    except asyncio.TimeoutError:
        State.log.append("    (worker cancelled after 6 s)")


def main():
    logging.basicConfig(level=logging.WARNING)
    which = sys.argv[1:] or ["qca", "anthropic", "poller", "worker"]
    srv = serve()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    for w in which:
        if w == "qca":
            run_qca(base)
        elif w == "anthropic":
            run_anthropic(base)
        elif w == "poller":
            asyncio.run(run_poller(base))
        elif w == "worker":
            asyncio.run(run_worker(base))
    print("\n".join(State.log))
    srv.shutdown()


if __name__ == "__main__":
    main()
