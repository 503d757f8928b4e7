"""Tether's Claude Managed Agents dialect (/v1) driven by the official `anthropic` SDK.

Draft: written before the server exists (see WIRE_NOTES.md). Three layers:

1. typed resource methods (`client.beta.environments…`, `…work…`, `…sessions…`),
   the work/environment calls through a client with
   `_strict_response_validation=True` so responses must match the SDK's
   pydantic models exactly (required fields, Literal tags);
2. the SDK's own helpers: the work poller (`client.beta.environments.work.poller`)
   and the lease heartbeat loop of `anthropic.lib.environments` (private
   `_heartbeat_loop`, exactly what `EnvironmentWorker` runs);
3. the full `EnvironmentWorker` with a custom tool, the test playing the
   platform runtime by posting agent-side events with the admin token.
"""

from __future__ import annotations

import time
from functools import partial

import anyio
import pytest
import httpx
from anthropic import (
    Anthropic,
    APIResponseValidationError,
    AsyncAnthropic,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
)
from anthropic.lib.environments import EnvironmentWorker
from anthropic.lib.environments._worker import _heartbeat_loop, _Lease, _LeaseEndReason
from anthropic.lib.tools import beta_async_tool
from anthropic.types.beta.environments import BetaHeartbeatPreconditionFailedError

from conftest import (
    ADMIN_TOKEN,
    CUSTOM_TOOL,
    HTTP_TIMEOUT,
    MODEL,
    TETHER_URL,
    decode_secret,
    mint_environment_key,
    parse_ts,
    uniq,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def make_client(*, strict: bool, token: str = ADMIN_TOKEN, max_retries: int = 0, **kw) -> Anthropic:
    # api_key travels as `Authorization: Bearer …` in anthropic>=2 (not x-api-key)
    return Anthropic(
        api_key=token,
        base_url=TETHER_URL,
        timeout=HTTP_TIMEOUT,
        max_retries=max_retries,
        _strict_response_validation=strict,
        **kw,
    )


def make_async_client(*, strict: bool = False, **kw) -> AsyncAnthropic:
    kw.setdefault("timeout", HTTP_TIMEOUT)
    kw.setdefault("max_retries", 0)
    return AsyncAnthropic(api_key=ADMIN_TOKEN, base_url=TETHER_URL, _strict_response_validation=strict, **kw)


@pytest.fixture(scope="module")
def ant():
    """Strict client: for environments and work (the queue contract)."""
    with make_client(strict=True) as c:
        yield c


@pytest.fixture(scope="module")
def ant_lenient():
    """Lenient client: for agents/sessions/events (see test_agent_and_session_match_the_typed_models)."""
    with make_client(strict=False) as c:
        yield c


@pytest.fixture
def env(ant, ant_lenient):
    e = ant.beta.environments.create(name=uniq("ant-env"), config={"type": "self_hosted"}, metadata={"suite": "anthropic"})
    yield e
    try:
        for s in ant_lenient.beta.sessions.list(include_archived=True, limit=100, extra_query={"environment_id": e.id}):
            if s.environment_id == e.id:
                ant_lenient.beta.sessions.delete(s.id)
        ant.beta.environments.delete(e.id)
    except Exception:
        pass


@pytest.fixture
def agent(ant_lenient):
    return ant_lenient.beta.agents.create(name=uniq("ant-agent"), model=MODEL, tools=[CUSTOM_TOOL])


def work_items(ant, env_id):
    return list(ant.beta.environments.work.list(env_id))


# --------------------------------------------------------------------------- typed methods


def test_environment_crud(ant):
    e = ant.beta.environments.create(name=uniq("ant-env"), config={"type": "self_hosted"}, metadata={"a": "1", "b": "2"})
    assert e.type == "environment" and e.config.type == "self_hosted"
    assert e.metadata == {"a": "1", "b": "2"} and e.archived_at is None
    assert ant.beta.environments.retrieve(e.id).name == e.name
    upd = ant.beta.environments.update(e.id, metadata={"a": None, "c": "3"}, description="x")
    assert upd.metadata == {"b": "2", "c": "3"} and upd.description == "x"
    assert e.id in {x.id for x in ant.beta.environments.list(limit=100)}
    assert ant.beta.environments.archive(e.id).archived_at is not None
    assert e.id not in {x.id for x in ant.beta.environments.list(limit=100)}
    assert e.id in {x.id for x in ant.beta.environments.list(limit=100, include_archived=True)}
    deleted = ant.beta.environments.delete(e.id)
    assert (deleted.id, deleted.type) == (e.id, "environment_deleted")
    with pytest.raises(NotFoundError):
        ant.beta.environments.retrieve(e.id)


def test_agent_and_session_match_the_typed_models(env):
    """Agents and sessions parsed *strictly*: every field the SDK's models REQUIRE must be there.

    Notably `model` as an object `{"id": …}` even when created from a string,
    `execution_identity`, `mcp_servers`, and on the session `resources`,
    `vault_ids`, `outcome_evaluations`, `stats`, `usage` and the agent's `skills`
    (EnvironmentWorker iterates `session.resources` and `session.agent.skills`).
    """
    with make_client(strict=True) as strict:
        try:
            a = strict.beta.agents.create(name=uniq("ant-agent"), model=MODEL, tools=[CUSTOM_TOOL])
            s = strict.beta.sessions.create(agent=a.id, environment_id=env.id, title="strict")
            s2 = strict.beta.sessions.retrieve(s.id)
        except APIResponseValidationError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"response does not validate against the SDK model: {e.__cause__ or e}")
    assert a.model.id == MODEL and a.version == 1
    assert a.execution_identity.type == "service_account"
    assert a.mcp_servers == [] and a.skills == []
    assert [(t.type, t.name) for t in a.tools] == [("custom", "add")]
    assert s2.status == "idle" and s2.type == "session"
    assert s2.agent.id == a.id and s2.agent.version == 1 and s2.agent.model.id == MODEL
    assert s2.agent.skills == [] and [t.name for t in s2.agent.tools] == ["add"]
    assert s2.resources == [] and s2.vault_ids == [] and s2.outcome_evaluations == []


def test_agent_versions_and_the_update_precondition():
    """`version` in an update is the version the caller saw: a stale one is refused (409) and changes
    nothing; without it the update applies unconditionally. `retrieve(version=n)` reads an old version."""
    with make_client(strict=True) as strict:
        a = strict.beta.agents.create(name=uniq("ant-agent"), model=MODEL, tools=[CUSTOM_TOOL])
        a2 = strict.beta.agents.update(a.id, version=a.version, description="v2")
        assert (a2.version, a2.description) == (2, "v2")
        with pytest.raises(ConflictError) as ei:
            strict.beta.agents.update(a.id, version=1, description="stale")
        assert ei.value.status_code == 409 and ei.value.body["error"]["param"] == "version"
        assert strict.beta.agents.retrieve(a.id).description == "v2"
        old = strict.beta.agents.retrieve(a.id, version=1)
        assert (old.version, old.description, old.model.id) == (1, None, MODEL)
        a3 = strict.beta.agents.update(a.id, system="be brief")
        assert a3.version == 3 and a3.description == "v2"
        with pytest.raises(NotFoundError):
            strict.beta.agents.retrieve(a.id, version=9)
        archived = strict.beta.agents.archive(a.id)
        assert archived.archived_at is not None
        assert a.id in {x.id for x in strict.beta.agents.list(include_archived=True, limit=1000)}


def test_x_api_key_and_ignored_beta_markers(ant, env):
    """/v1 also takes the token as `x-api-key` (curl, older SDKs); `?beta=true`, `anthropic-beta`,
    `anthropic-version` and the workspace header are accepted and ignored. Qoder answers 401 to x-api-key."""
    headers = {
        "x-api-key": ADMIN_TOKEN,
        "anthropic-beta": "managed-agents-2026-04-01",
        "anthropic-version": "2023-06-01",
        "anthropic-workspace-id": "wrkspc_ignored",
    }
    r = httpx.get(f"{TETHER_URL}/v1/environments/{env.id}?beta=true", headers=headers, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == env.id
    r = httpx.get(f"{TETHER_URL}/api/v1/cloud/environments/{env.id}", headers={"x-api-key": ADMIN_TOKEN}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    stats = ant.beta.environments.work.stats(env.id, extra_query={"beta": "true"}, betas=["managed-agents-2026-04-01"])
    assert stats.depth == 0


def test_work_lifecycle(ant, ant_lenient, env, agent):
    w = ant.beta.environments.work
    sess = ant_lenient.beta.sessions.create(agent=agent.id, environment_id=env.id, metadata={"job": "j1"})

    [queued] = work_items(ant, env.id)
    assert (queued.type, queued.state, queued.data.type, queued.data.id) == ("work", "queued", "session", sess.id)
    assert queued.metadata == {"job": "j1"} and queued.secret is None

    stats = w.stats(env.id)
    assert (stats.type, stats.depth, stats.pending) == ("work_queue_stats", 1, 0)

    item = w.poll(env.id, block_ms=999, anthropic_worker_id="ant-worker-1")
    assert item is not None and item.id == queued.id and item.state == "queued"
    payload = decode_secret(item.secret)
    assert payload["sessions_token"].startswith("tth_ses_")
    stats = w.stats(env.id)
    assert (stats.depth, stats.pending, stats.workers_polling) == (0, 1, 1)
    assert w.poll(env.id) is None  # JSON `null`, never an empty body

    acked = w.ack(item.id, environment_id=env.id)
    assert acked.state == "starting" and acked.acknowledged_at is not None and acked.secret is None

    hb1 = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=30)
    assert (hb1.type, hb1.state, hb1.lease_extended, hb1.ttl_seconds) == ("work_heartbeat", "active", True, 30)
    hb2 = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb1.last_heartbeat)
    assert hb2.state == "active" and hb2.ttl_seconds == 30  # an explicit TTL persists (D-9b)
    assert parse_ts(hb2.last_heartbeat) > parse_ts(hb1.last_heartbeat)

    # 412 is surfaced as the typed lease-lost error, with the server's view of the lease
    with pytest.raises(BetaHeartbeatPreconditionFailedError) as ei:
        w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb1.last_heartbeat)
    err = ei.value
    assert isinstance(err, PreconditionFailedError) and err.status_code == 412
    assert err.type == "precondition_failed_error" and err.error_code == "heartbeat_precondition_failed"
    cur = err.details.current_state
    # the model's docstring: "Always false: a refused heartbeat does not extend the lease"
    assert cur.state == "active" and cur.ttl_seconds == 30 and cur.lease_extended is False
    assert parse_ts(cur.last_heartbeat) == parse_ts(hb2.last_heartbeat)

    got = w.retrieve(item.id, environment_id=env.id)
    assert got.state == "active" and got.started_at is not None and got.secret is None
    assert parse_ts(got.latest_heartbeat_at) == parse_ts(hb2.last_heartbeat)

    upd = w.update(item.id, environment_id=env.id, metadata={"host": "h1", "job": None})
    assert upd.metadata == {"host": "h1"}

    stopping = w.stop(item.id, environment_id=env.id)
    assert stopping.state == "stopping" and stopping.stop_requested_at is not None
    hb3 = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb2.last_heartbeat)
    assert hb3.state == "stopping"
    done = w.stop(item.id, environment_id=env.id)
    assert done.state == "stopped" and done.stopped_at is not None
    with pytest.raises(ConflictError):
        w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb3.last_heartbeat)
    with pytest.raises(ConflictError):
        w.stop(item.id, environment_id=env.id, force=True)

    # force stop of a live item
    ant_lenient.beta.sessions.create(agent=agent.id, environment_id=env.id)
    item2 = w.poll(env.id, block_ms=999, anthropic_worker_id="ant-worker-1")
    w.ack(item2.id, environment_id=env.id)
    forced = w.stop(item2.id, environment_id=env.id, force=True)
    assert forced.state == "stopped" and forced.stop_requested_at is not None and forced.stopped_at is not None

    assert [x.state for x in work_items(ant, env.id)] == ["stopped", "stopped"]
    stats = w.stats(env.id)
    assert (stats.depth, stats.pending, stats.oldest_queued_at) == (0, 0, None)


def test_work_list_pages_follow_next_page(ant, ant_lenient, env, agent):
    made = [ant_lenient.beta.sessions.create(agent=agent.id, environment_id=env.id).id for _ in range(3)]
    first = ant.beta.environments.work.list(env.id, limit=2)
    assert len(first.data) == 2 and first.next_page
    assert [x.data.id for x in ant.beta.environments.work.list(env.id, limit=2)] == made
    last = ant.beta.environments.work.list(env.id, limit=2, page=first.next_page)
    assert [x.data.id for x in last.data] == made[2:] and last.next_page is None


def test_validation_errors(ant, env):
    w = ant.beta.environments.work
    for bad in (0, 1000):
        with pytest.raises(BadRequestError) as ei:
            w.poll(env.id, block_ms=bad)
        assert ei.value.type == "invalid_request_error"
    with pytest.raises(BadRequestError):
        w.poll(env.id, reclaim_older_than_ms=0)  # Anthropic profile: >= 1
    assert w.poll(env.id, reclaim_older_than_ms=1) is None
    # lists go up to 1000 on /v1 (the SDK worker reads events with limit=1000)
    assert ant.beta.environments.list(limit=1000).data is not None
    with pytest.raises(BadRequestError):
        ant.beta.environments.list(limit=1001)
    with pytest.raises(NotFoundError):
        w.retrieve("work_" + "0" * 32, environment_id=env.id)


def test_conflicts_are_side_effect_free_under_sdk_retries(ant, ant_lenient, env, agent):
    """The anthropic client retries 409 (twice by default): repeating a conflicting call changes nothing."""
    ant_lenient.beta.sessions.create(agent=agent.id, environment_id=env.id)
    item = ant.beta.environments.work.poll(env.id, anthropic_worker_id="ant-r")
    ant.beta.environments.work.stop(item.id, environment_id=env.id, force=True)
    before = ant.beta.environments.work.retrieve(item.id, environment_id=env.id)
    with make_client(strict=True, max_retries=2) as retrying:
        with pytest.raises(ConflictError) as ei:
            retrying.beta.environments.work.ack(item.id, environment_id=env.id)
    # the answer tells the SDK not to retry a deterministic conflict (it would otherwise, twice)
    assert ei.value.response.headers["x-should-retry"] == "false"
    after = ant.beta.environments.work.retrieve(item.id, environment_id=env.id)
    assert after.to_dict() == before.to_dict()


def test_sessions_and_events(ant_lenient, ant, env, agent):
    c = ant_lenient
    # overrides are not implemented: refused rather than silently dropped
    with pytest.raises(BadRequestError) as ei:
        c.beta.sessions.create(
            agent={"type": "agent_with_overrides", "id": agent.id, "system": "other"}, environment_id=env.id
        )
    assert ei.value.body["error"]["param"] == "agent"
    pinned = c.beta.sessions.create(agent={"type": "agent", "id": agent.id, "version": 1}, environment_id=env.id)
    assert pinned.agent.version == 1
    c.beta.sessions.delete(pinned.id)
    sess = c.beta.sessions.create(agent=agent.id, environment_id=env.id, title="t", metadata={"k": "v"})
    assert sess.status == "idle" and sess.environment_id == env.id and sess.agent.id == agent.id
    assert c.beta.sessions.update(sess.id, title="t2", metadata={"k": None}).metadata == {}
    assert sess.id in {s.id for s in c.beta.sessions.list(agent_id=agent.id, limit=10)}

    sent = c.beta.sessions.events.send(sess.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}])
    assert sent.data[0].type == "user.message" and sent.data[0].id.startswith("evt_")
    assert c.beta.sessions.retrieve(sess.id).status == "running"
    assert sess.id in {s.id for s in c.beta.sessions.list(agent_id=agent.id, statuses=["running"])}

    events = list(c.beta.sessions.events.list(sess.id, limit=1000))  # the SDK worker asks for 1000
    assert [e.type for e in events][:2] == ["user.message", "session.status_running"]
    # `types[]=…` filters, and the pager follows next_page through the filtered pages
    picked = list(c.beta.sessions.events.list(sess.id, types=["session.status_running", "user.message"], limit=1))
    assert [e.type for e in picked] == ["user.message", "session.status_running"]

    # no Last-Event-ID from this SDK: the stream starts with events written after it opened.
    # The SDK drops SSE frames that have no `event:` line, so this also checks the framing.
    with c.beta.sessions.events.stream(sess.id) as stream:
        c.beta.sessions.events.send(
            sess.id, events=[{"type": "agent.message", "content": [{"type": "text", "text": "hello"}]}]
        )
        for ev in stream:
            assert ev.type != "user.message", "stream replayed history without Last-Event-ID"
            if ev.type == "agent.message":
                assert ev.content[0].text == "hello" and ev.id.startswith("evt_")
                break

    c.beta.sessions.events.send(sess.id, events=[{"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}])
    assert c.beta.sessions.retrieve(sess.id).status == "idle"

    assert c.beta.sessions.archive(sess.id).archived_at is not None
    wait_until(
        lambda: [x.state for x in work_items(ant, env.id) if x.data.id == sess.id] == ["stopped"],
        timeout=5,
        what="archive force-stops the item",
    )
    deleted = c.beta.sessions.delete(sess.id)
    assert (deleted.id, deleted.type) == (sess.id, "session_deleted")


def test_a_turn_cut_short_reads_as_exhausted_retries(ant, ant_lenient, env, agent):
    """A turn whose item stops under it (here a force stop) leaves the session idle with a
    `session.error` (`unknown_error`, `retry_status: exhausted`) and `session.status_idle`
    (`retries_exhausted`): shapes the SDK's event models know, parsed strictly."""
    sess = ant_lenient.beta.sessions.create(
        agent=agent.id,
        environment_id=env.id,
        initial_events=[{"type": "user.message", "content": [{"type": "text", "text": "go"}]}],
    )
    assert ant_lenient.beta.sessions.retrieve(sess.id).status == "running"
    w = ant.beta.environments.work
    item = w.poll(env.id, anthropic_worker_id="ant-dies")
    w.ack(item.id, environment_id=env.id)
    w.stop(item.id, environment_id=env.id, force=True)
    with make_client(strict=True) as strict:
        events = list(strict.beta.sessions.events.list(sess.id, limit=1000))
        assert strict.beta.sessions.retrieve(sess.id).status == "idle"
    [error] = [e for e in events if e.type == "session.error"]
    assert error.error.type == "unknown_error" and error.error.retry_status.type == "exhausted"
    assert events[-1].type == "session.status_idle" and events[-1].stop_reason.type == "retries_exhausted"


def test_session_token_serves_its_own_session(ant_lenient, env, agent):
    """What EnvironmentWorker does with an item's `sessions_token` (WIRE_NOTES §5.4): read the session
    and its agent, list and stream the events, answer a tool call, heartbeat, force-stop — and nothing
    else. The token dies with its item, which the SDK reads as final (401)."""
    sess = ant_lenient.beta.sessions.create(
        agent=agent.id,
        environment_id=env.id,
        initial_events=[{"type": "user.message", "content": [{"type": "text", "text": "add 2 and 3"}]}],
    )
    with make_client(strict=True, token=mint_environment_key(env.id)) as envc:
        item = envc.beta.environments.work.poll(env.id, anthropic_worker_id="ant-tok")
        envc.beta.environments.work.ack(item.id, environment_id=env.id)
    call = ant_lenient.beta.sessions.events.send(
        sess.id, events=[{"type": "agent.custom_tool_use", "name": "add", "input": {"a": 2, "b": 3}}]
    ).data[0]
    token = decode_secret(item.secret)["sessions_token"]
    with make_client(strict=False, token=token) as tok:
        assert tok.beta.sessions.retrieve(sess.id).agent.id == agent.id
        assert tok.beta.agents.retrieve(agent.id).id == agent.id
        assert call.id in [e.id for e in tok.beta.sessions.events.list(sess.id, limit=1000)]
        with tok.beta.sessions.events.stream(sess.id) as stream:
            tok.beta.sessions.events.send(
                sess.id,
                events=[
                    {
                        "type": "user.custom_tool_result",
                        "custom_tool_use_id": call.id,
                        "is_error": False,
                        "content": [{"type": "text", "text": "5"}],
                    }
                ],
            )
            for ev in stream:
                if ev.type == "user.custom_tool_result":
                    assert ev.custom_tool_use_id == call.id
                    break
        # user-side input is the user's, and the queue is the environment's
        with pytest.raises(PermissionDeniedError):
            tok.beta.sessions.events.send(sess.id, events=[{"type": "user.interrupt"}])
        with pytest.raises(PermissionDeniedError):
            tok.beta.environments.work.poll(env.id)
        hb = tok.beta.environments.work.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat="NO_HEARTBEAT")
        assert hb.state == "active"
        assert tok.beta.environments.work.stop(item.id, environment_id=env.id, force=True).state == "stopped"
        with pytest.raises(AuthenticationError):
            tok.beta.sessions.retrieve(sess.id)


# --------------------------------------------------------------------------- SDK helpers (async)


async def _until(fn, *, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await fn()
        if last:
            return last
        await anyio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


async def _setup_async(admin: AsyncAnthropic, **session_kw):
    env = await admin.beta.environments.create(name=uniq("ant-async-env"), config={"type": "self_hosted"})
    agent = await admin.beta.agents.create(name=uniq("ant-async-agent"), model=MODEL, tools=[CUSTOM_TOOL])
    sess = await admin.beta.sessions.create(agent=agent.id, environment_id=env.id, **session_kw)
    key = await anyio.to_thread.run_sync(mint_environment_key, env.id)
    return env, agent, sess, key


async def _first_from_poller(admin: AsyncAnthropic, worker_id: str):
    """A fresh session's item as the SDK's poller hands it out: polled with the environment key and
    `Anthropic-Worker-ID: worker_id`, and already acked. Returns the environment, the session, the
    poller and the item."""
    env, _agent, sess, key = await _setup_async(admin)
    poller = admin.beta.environments.work.poller(environment_id=env.id, environment_key=key, worker_id=worker_id)
    with anyio.fail_after(15):
        item = await poller.__anext__()
    return env, sess, poller, item


def _lease_client(sessions_token: str) -> AsyncAnthropic:
    """A Bearer client on the item's sessions token, like EnvironmentWorker's per-item client.

    `desired_ttl_seconds=10` (clamped minimum) via default_query makes the
    helper's heartbeat interval max(1, ttl/2) = 5 s instead of 30 s.
    """
    return AsyncAnthropic(
        auth_token=sessions_token,
        base_url=TETHER_URL,
        timeout=HTTP_TIMEOUT,
        default_query={"desired_ttl_seconds": 10},
    )


@pytest.mark.anyio
async def test_poller_and_heartbeat_loop_follow_a_graceful_stop():
    admin = make_async_client()
    env, sess, poller, item = await _first_from_poller(admin, "ant-poller-1")
    w = admin.beta.environments.work
    assert item.data.id == sess.id and item.secret
    assert (await w.retrieve(item.id, environment_id=env.id)).state == "starting"

    token = decode_secret(item.secret)["sessions_token"]
    lease = _Lease()
    async with _lease_client(token) as lc, anyio.create_task_group() as tg:
        tg.start_soon(partial(_heartbeat_loop, lc.beta.environments.work, work_id=item.id, environment_id=env.id, lease=lease))

        async def active():
            return (await w.retrieve(item.id, environment_id=env.id)).state == "active"

        await _until(active, timeout=10, what="first heartbeat -> active")
        stopped = await w.stop(item.id, environment_id=env.id)  # operator's graceful stop
        assert stopped.state == "stopping"
        with anyio.fail_after(20):  # next beat (<= 5 s) reports `stopping`
            await lease.wait_ended()
    assert lease._end_reason is _LeaseEndReason.HEARTBEAT_STOP and not lease.lost

    # leaving the poller's loop body: auto_stop sends a plain stop, which confirms stopping -> stopped
    with anyio.fail_after(15):
        await poller.aclose()
    final = await w.retrieve(item.id, environment_id=env.id)
    assert final.state == "stopped" and final.stopped_at is not None
    stats = await w.stats(env.id)
    assert stats.workers_polling == 1
    await admin.close()


@pytest.mark.anyio
async def test_heartbeat_loop_stop_requested_before_first_beat():
    admin = make_async_client()
    env, _sess, poller, item = await _first_from_poller(admin, "ant-poller-2")
    w = admin.beta.environments.work
    assert (await w.stop(item.id, environment_id=env.id)).state == "stopping"

    lease = _Lease()
    async with _lease_client(decode_secret(item.secret)["sessions_token"]) as lc:
        with anyio.fail_after(10):  # NO_HEARTBEAT on a never-beaten stopping item -> 200 state=stopping
            await _heartbeat_loop(lc.beta.environments.work, work_id=item.id, environment_id=env.id, lease=lease)
    assert lease._end_reason is _LeaseEndReason.HEARTBEAT_STOP

    with anyio.fail_after(15):
        await poller.aclose()
    assert (await w.retrieve(item.id, environment_id=env.id)).state == "stopped"
    await admin.close()


@pytest.mark.anyio
async def test_heartbeat_loop_loses_the_lease_to_a_takeover():
    """Two workers hold deliveries of one item (the second poll came after the reclaim window) and both
    ack — the SDK sends no worker id on ack, so both succeed. The other worker's first heartbeat takes
    the lease. This worker's heartbeat loop then ends without stopping the item: on its own sessions
    token, which died at the re-delivery, the beat is rejected (401, final); on the environment key
    (EnvironmentWorker's fallback credential) it meets 412 and reports the lease lost."""
    admin = make_async_client()
    env, _agent, _sess, key = await _setup_async(admin)
    w = admin.beta.environments.work
    async with AsyncAnthropic(auth_token=key, base_url=TETHER_URL, timeout=HTTP_TIMEOUT, max_retries=0) as envc:
        ew = envc.beta.environments.work
        mine = await ew.poll(env.id, anthropic_worker_id="ant-slow")
        await anyio.sleep(0.05)
        theirs = await ew.poll(env.id, anthropic_worker_id="ant-fast", reclaim_older_than_ms=1)
        assert theirs is not None and theirs.id == mine.id
        assert (await ew.ack(mine.id, environment_id=env.id)).state == "starting"
        assert (await ew.ack(theirs.id, environment_id=env.id)).state == "starting"

        their_lease = _Lease()
        async with _lease_client(decode_secret(theirs.secret)["sessions_token"]) as tc, anyio.create_task_group() as tg:
            tg.start_soon(partial(_heartbeat_loop, tc.beta.environments.work, work_id=theirs.id, environment_id=env.id, lease=their_lease))

            async def active():
                return (await w.retrieve(mine.id, environment_id=env.id)).state == "active"

            await _until(active, timeout=10, what="the other worker's first heartbeat")

            lease = _Lease()
            async with _lease_client(decode_secret(mine.secret)["sessions_token"]) as lc:
                with anyio.fail_after(10):
                    await _heartbeat_loop(lc.beta.environments.work, work_id=mine.id, environment_id=env.id, lease=lease)
            assert lease._end_reason is _LeaseEndReason.HEARTBEAT_REJECTED

            lease = _Lease()
            with anyio.fail_after(10):
                await _heartbeat_loop(ew, work_id=mine.id, environment_id=env.id, lease=lease)
            assert lease._end_reason is _LeaseEndReason.LEASE_LOST and lease.lost

            # the item is still the other worker's, and its loop still follows it
            assert (await w.retrieve(mine.id, environment_id=env.id)).state == "active"
            assert not their_lease.ended
            await w.stop(mine.id, environment_id=env.id)
            with anyio.fail_after(20):
                await their_lease.wait_ended()
        assert their_lease._end_reason is _LeaseEndReason.HEARTBEAT_STOP
    await admin.close()


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_environment_worker_answers_a_custom_tool_call(tmp_path):
    admin = make_async_client()
    env, _agent, sess, key = await _setup_async(
        admin, initial_events=[{"type": "user.message", "content": [{"type": "text", "text": "add 2 and 3"}]}]
    )
    w = admin.beta.environments.work

    calls = []

    @beta_async_tool
    async def add(a: int, b: int) -> str:
        """Add two integers."""
        calls.append((a, b))
        return str(a + b)

    # The worker's parent client: production defaults (600 s timeout, 2 retries);
    # its own credential is replaced by the env key / sessions token in scoped copies.
    parent = AsyncAnthropic(api_key=ADMIN_TOKEN, base_url=TETHER_URL)
    worker = EnvironmentWorker(
        parent,
        environment_id=env.id,
        environment_key=key,
        tools=[add],
        workdir=str(tmp_path),
        max_idle=2.0,
        worker_id="ant-env-worker",
    )

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)

        async def item_in(state):
            items = [x async for x in w.list(env.id)]
            return items[0] if len(items) == 1 and items[0].state == state else None

        item = await _until(partial(item_in, "active"), timeout=20, what="worker polled, acked and heartbeated")
        assert item.data.id == sess.id

        # play the platform runtime: the agent calls the custom tool
        sent = await admin.beta.sessions.events.send(
            sess.id, events=[{"type": "agent.custom_tool_use", "name": "add", "input": {"a": 2, "b": 3}}]
        )
        tool_use_id = sent.data[0].id
        assert tool_use_id.startswith("evt_")

        async def answered():
            async for ev in admin.beta.sessions.events.list(sess.id, limit=100):
                if ev.type == "user.custom_tool_result" and ev.custom_tool_use_id == tool_use_id:
                    return ev
            return None

        result = await _until(answered, timeout=20, what="user.custom_tool_result from the worker")
        assert calls == [(2, 3)]
        assert result.is_error is False
        assert [(b.type, b.text) for b in result.content] == [("text", "5")]

        # end the turn; after max_idle the worker force-stops its item
        await admin.beta.sessions.events.send(
            sess.id, events=[{"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}]
        )
        final = await _until(partial(item_in, "stopped"), timeout=30, what="worker force-stopped the item")
        assert final.stopped_at is not None
        tg.cancel_scope.cancel()

    s = await admin.beta.sessions.retrieve(sess.id)
    assert s.status == "idle"
    assert calls == [(2, 3)]  # executed exactly once (reconcile + stream de-duplicated)
    await parent.close()
    await admin.close()
