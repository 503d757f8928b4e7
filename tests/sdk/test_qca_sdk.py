"""Tether's Qoder dialect (/api/v1/cloud) driven by the official `qca-sdk`.

Draft: written before the server exists (see WIRE_NOTES.md for the wire facts
each assertion relies on). Uses only the SDK's typed methods; the client runs
with `_strict_response_validation=True` so every response must also validate
against the SDK's pydantic models (Literal `type` tags, timestamps, …).
"""

from __future__ import annotations

import time

import pytest
from qca import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    Managed,
    NotFoundError,
    PermissionDeniedError,
)

from conftest import (
    ADMIN_TOKEN,
    CUSTOM_TOOL,
    HTTP_TIMEOUT,
    MODEL,
    QODER_PREFIX,
    TETHER_URL,
    decode_secret,
    parse_ts,
    uniq,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def make_client(*, strict: bool = True, token: str = ADMIN_TOKEN) -> Managed:
    return Managed(
        access_token=token,
        base_url=f"{TETHER_URL}{QODER_PREFIX}",
        timeout=HTTP_TIMEOUT,
        max_retries=0,  # assert on single responses; the SDK never retries 409 anyway
        _strict_response_validation=strict,
    )


@pytest.fixture(scope="module")
def qca():
    with make_client() as c:
        yield c


@pytest.fixture(scope="module")
def qca_lenient():
    with make_client(strict=False) as c:
        yield c


@pytest.fixture
def env(qca):
    e = qca.environments.create(
        name=uniq("qca-env"),
        description="sdk conformance",
        config={"type": "self_hosted"},
        metadata={"suite": "qca"},
    )
    yield e
    # best-effort cleanup: sessions first (delete refuses while any reference it)
    try:
        for s in qca.sessions.list(extra_query={"environment_id": e.id}, include_archived=True, limit=100):
            if s.environment_id == e.id:
                qca.sessions.delete(s.id)
        qca.environments.delete(e.id)
    except Exception:
        pass


@pytest.fixture
def agent(qca):
    return qca.agents.create(name=uniq("qca-agent"), model=MODEL, system="You add numbers.", tools=[CUSTOM_TOOL])


def new_session(qca, env, agent, **kw):
    return qca.sessions.create(agent=agent.id, environment_id=env.id, **kw)


def only_item(qca, env_id):
    items = list(qca.environments.work.list(env_id))
    assert len(items) == 1, [w.id for w in items]
    return items[0]


# --------------------------------------------------------------------------- environments / agents


def test_environment_crud_and_list(qca):
    e = qca.environments.create(
        name=uniq("qca-env"), description="d", config={"type": "self_hosted"}, metadata={"team": "a", "tmp": "x"}
    )
    assert e.type == "environment"
    assert e.id.startswith("env_") and len(e.id) == 4 + 32
    assert e.config.type == "self_hosted"
    assert e.metadata == {"team": "a", "tmp": "x"}
    assert e.archived_at is None
    assert parse_ts(e.created_at) <= parse_ts(e.updated_at)

    got = qca.environments.retrieve(e.id)
    assert got.id == e.id and got.name == e.name

    upd = qca.environments.update(e.id, name=e.name + "-2", metadata={"tmp": None, "new": "y"})
    assert upd.name == e.name + "-2"
    assert upd.metadata == {"team": "a", "new": "y"}

    assert e.id in {x.id for x in qca.environments.list(limit=100)}

    arch = qca.environments.archive(e.id)
    assert arch.archived_at is not None
    assert e.id not in {x.id for x in qca.environments.list(limit=100)}
    assert e.id in {x.id for x in qca.environments.list(limit=100, include_archived=True)}

    gone = qca.environments.delete(e.id)
    assert gone.id == e.id and gone.type == "environment_deleted"
    with pytest.raises(NotFoundError):
        qca.environments.retrieve(e.id)


def test_agent_crud(qca):
    a = qca.agents.create(name=uniq("qca-agent"), model=MODEL, description="v1", tools=[CUSTOM_TOOL], metadata={"k": "v"})
    assert a.type == "agent" and a.id.startswith("agent_")
    assert a.version == 1
    assert a.metadata == {"k": "v"}
    assert [(t.type, t.name) for t in a.tools] == [("custom", "add")]
    assert a.tools[0].input_schema.type == "object"

    assert qca.agents.retrieve(a.id).id == a.id
    # qca sends `version` in the update body: the version the caller saw
    a2 = qca.agents.update(a.id, description="v2", version=a.version)
    assert a2.version == 2 and a2.description == "v2"
    assert a.id in {x.id for x in qca.agents.list(limit=100)}
    # the model is shown as it was given on this prefix (a name stays a name)
    assert a2.model == MODEL

    # `version` is a precondition: a stale one is refused and changes nothing
    with pytest.raises(ConflictError) as ei:
        qca.agents.update(a.id, description="stale", version=1)
    assert ei.value.status_code == 409
    assert qca.agents.retrieve(a.id).description == "v2"
    v1 = qca.agents.retrieve(a.id, version=1)
    assert v1.version == 1 and v1.description == "v1"

    arch = qca.agents.archive(a.id)
    assert arch.archived_at is not None


# --------------------------------------------------------------------------- the work queue


def test_work_lifecycle_graceful_stop(qca, env, agent):
    w = qca.environments.work
    sess = new_session(qca, env, agent, title="graceful", metadata={"job": "daily-report"})
    assert sess.status == "idle" and sess.environment_id == env.id

    # session creation on a self_hosted environment enqueues exactly one item
    queued = only_item(qca, env.id)
    assert queued.type == "work" and queued.id.startswith("work_")
    assert queued.state == "queued"
    assert queued.data.type == "session" and queued.data.id == sess.id
    assert queued.metadata == {"job": "daily-report"}
    assert queued.secret is None  # only poll responses carry it
    assert queued.acknowledged_at is None and queued.started_at is None and queued.latest_heartbeat_at is None

    stats = w.stats(env.id)
    assert stats.type == "work_queue_stats"
    assert (stats.depth, stats.pending, stats.workers_polling) == (1, 0, 0)
    assert stats.oldest_queued_at is not None

    # poll with a worker id (Worker-ID header)
    item = w.poll(env.id, block_ms=999, worker_id="qca-worker-1")
    assert item is not None and item.id == queued.id
    assert item.state == "queued"  # a delivery does not change the state
    assert item.secret, "poll must hand out the per-item secret"
    secret = decode_secret(item.secret)
    assert secret["sessions_token"].startswith("tth_ses_")
    assert "api_base_url" in secret

    stats = w.stats(env.id)
    assert (stats.depth, stats.pending, stats.workers_polling) == (0, 1, 1)
    assert getattr(stats, "states", None) == {"queued": 1, "starting": 0, "active": 0, "stopping": 0}

    # nothing else is claimable: non-blocking poll answers the JSON literal null
    assert w.poll(env.id, worker_id="qca-worker-1") is None

    # ack (qca's ack() sends no Worker-ID; pass it explicitly to exercise the identity check)
    acked = w.ack(item.id, environment_id=env.id, extra_headers={"Worker-ID": "qca-worker-1"})
    assert acked.state == "starting" and acked.acknowledged_at is not None
    assert acked.secret is None
    again = w.ack(item.id, environment_id=env.id)  # safe retry
    assert again.state == "starting" and again.acknowledged_at == acked.acknowledged_at
    stats = w.stats(env.id)
    assert (stats.depth, stats.pending) == (0, 0) and stats.oldest_queued_at is None

    # first heartbeat claims the lease
    hb1 = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat="NO_HEARTBEAT")
    assert hb1.type == "work_heartbeat"
    assert hb1.state == "active" and hb1.lease_extended is True
    assert isinstance(hb1.ttl_seconds, int) and hb1.ttl_seconds > 0
    t1 = parse_ts(hb1.last_heartbeat)
    got = w.retrieve(item.id, environment_id=env.id)
    assert got.state == "active" and got.started_at is not None
    assert parse_ts(got.latest_heartbeat_at) == t1

    # echo the previous value verbatim
    hb2 = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb1.last_heartbeat)
    assert hb2.state == "active" and hb2.lease_extended is True
    assert parse_ts(hb2.last_heartbeat) > t1

    # stale expectations lose: NO_HEARTBEAT after a beat, and an old timestamp
    for stale in ("NO_HEARTBEAT", hb1.last_heartbeat):
        with pytest.raises(APIStatusError) as ei:
            w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=stale)
        assert ei.value.status_code == 412
        assert ei.value.type == "precondition_failed_error"

    # desired TTL is clamped into [10, 600]
    hb3 = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb2.last_heartbeat, desired_ttl_seconds=5)
    assert hb3.ttl_seconds == 10

    # metadata merge-patch: upsert + delete
    upd = w.update(item.id, environment_id=env.id, metadata={"worker": "qca-worker-1", "job": None})
    assert upd.metadata == {"worker": "qca-worker-1"}
    assert upd.state == "active"

    # graceful stop -> stopping; the worker learns it on its next heartbeat
    stopping = w.stop(item.id, environment_id=env.id)
    assert stopping.state == "stopping" and stopping.stop_requested_at is not None and stopping.stopped_at is None
    hb4 = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb3.last_heartbeat)
    assert hb4.state == "stopping"

    # the worker confirms with a second plain stop
    stopped = w.stop(item.id, environment_id=env.id)
    assert stopped.state == "stopped" and stopped.stopped_at is not None

    # a stopped item is terminal
    with pytest.raises(ConflictError):
        w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb4.last_heartbeat)
    with pytest.raises(ConflictError):
        w.stop(item.id, environment_id=env.id)
    with pytest.raises(ConflictError):
        w.ack(item.id, environment_id=env.id)
    assert only_item(qca, env.id).state == "stopped"
    # metadata stays editable on stopped items (D-10)
    assert w.update(item.id, environment_id=env.id, metadata={"after": "stop"}).metadata["after"] == "stop"


def test_force_stop(qca, env, agent):
    w = qca.environments.work
    new_session(qca, env, agent)
    item = w.poll(env.id, block_ms=999, worker_id="qca-worker-2")
    assert item is not None
    w.ack(item.id, environment_id=env.id)
    hb = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat="NO_HEARTBEAT")
    assert hb.state == "active"

    forced = w.stop(item.id, environment_id=env.id, force=True)
    assert forced.state == "stopped"
    assert forced.stop_requested_at is not None and forced.stopped_at is not None

    with pytest.raises(ConflictError):  # 409 = "not yours any more": end the work, do not stop it
        w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat=hb.last_heartbeat)
    with pytest.raises(ConflictError):
        w.stop(item.id, environment_id=env.id, force=True)


def test_graceful_stop_of_queued_item_and_before_first_heartbeat(qca, env, agent):
    w = qca.environments.work
    # queued -> stopped at once (D-7)
    new_session(qca, env, agent)
    q = only_item(qca, env.id)
    s = w.stop(q.id, environment_id=env.id)
    assert s.state == "stopped" and s.stop_requested_at is not None and s.stopped_at is not None

    # starting -> stopping; the first NO_HEARTBEAT is still accepted and reports stopping
    sess2 = new_session(qca, env, agent)
    item = w.poll(env.id, block_ms=999, worker_id="qca-worker-3")
    assert item is not None and item.data.id == sess2.id
    w.ack(item.id, environment_id=env.id)
    assert w.stop(item.id, environment_id=env.id).state == "stopping"
    hb = w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat="NO_HEARTBEAT")
    assert hb.state == "stopping"
    assert w.stop(item.id, environment_id=env.id).state == "stopped"


def test_poll_blocking_reclaim_and_worker_identity(qca, env, agent):
    w = qca.environments.work
    # a blocking poll on an empty queue waits out block_ms and answers null (no upper bound asserted:
    # a loaded machine may be slow to answer)
    t0 = time.monotonic()
    assert w.poll(env.id, block_ms=400, worker_id="qca-a") is None
    assert time.monotonic() - t0 >= 0.3

    new_session(qca, env, agent)
    first = w.poll(env.id, block_ms=999, worker_id="qca-a")
    assert first is not None
    # un-acked delivery is not re-delivered inside the reclaim window (default 5000 ms) ...
    assert w.poll(env.id, worker_id="qca-b") is None
    # ... but is with reclaim_older_than_ms=0 (Qoder allows 0)
    second = w.poll(env.id, worker_id="qca-b", reclaim_older_than_ms=0)
    assert second is not None and second.id == first.id
    assert decode_secret(second.secret)["sessions_token"] != decode_secret(first.secret)["sessions_token"]

    # the re-delivery belongs to qca-b now: an ack claiming to be qca-a conflicts
    with pytest.raises(ConflictError):
        w.ack(first.id, environment_id=env.id, extra_headers={"Worker-ID": "qca-a"})
    acked = w.ack(first.id, environment_id=env.id, extra_headers={"Worker-ID": "qca-b"})
    assert acked.state == "starting"
    assert w.stats(env.id).workers_polling == 2


def test_parameter_validation(qca, env, agent):
    w = qca.environments.work
    for bad in (0, 1000, -1):
        with pytest.raises(BadRequestError):
            w.poll(env.id, block_ms=bad)
    with pytest.raises(BadRequestError):
        w.poll(env.id, reclaim_older_than_ms=-5)

    new_session(qca, env, agent)
    item = w.poll(env.id, worker_id="qca-v")
    w.ack(item.id, environment_id=env.id)
    with pytest.raises(BadRequestError):
        w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat="not-a-timestamp")
    with pytest.raises(BadRequestError):
        w.heartbeat(item.id, environment_id=env.id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=0)
    with pytest.raises(BadRequestError) as ei:
        w.update(item.id, environment_id=env.id, metadata={f"k{i}": "v" for i in range(17)})
    assert ei.value.type == "invalid_request_error"

    with pytest.raises(NotFoundError):
        w.retrieve("work_" + "0" * 32, environment_id=env.id)
    with pytest.raises(NotFoundError):
        w.stats("env_" + "0" * 32)
    # lists stop at 100 on this prefix (1000 on /v1); the work list clamps instead (D-4)
    with pytest.raises(BadRequestError):
        qca.environments.list(limit=1000)
    assert len(w.list(env.id, limit=1000).data) == 1


def test_work_list_pagination_in_queue_order(qca, env, agent):
    sessions = [new_session(qca, env, agent, title=f"s{i}") for i in range(3)]
    page1 = qca.environments.work.list(env.id, limit=2)
    assert len(page1.data) == 2
    assert page1.has_more is True and page1.next_page == page1.last_id
    assert page1.first_id == page1.data[0].id
    every = list(qca.environments.work.list(env.id, limit=2))  # follows next_page
    assert [x.data.id for x in every] == [s.id for s in sessions]
    assert [x.id for x in every] == sorted(x.id for x in every)
    tail = qca.environments.work.list(env.id, after_id=every[0].id)
    assert [x.id for x in tail.data] == [x.id for x in every[1:]]
    assert tail.has_more is False and tail.next_page is None


# --------------------------------------------------------------------------- sessions and events


def test_sessions_events_and_stream(qca, qca_lenient, env, agent):
    sess = new_session(qca, env, agent, title="chat", metadata={"job": "x"}, environment_variables={"A": "1"})
    assert sess.type == "session" and sess.id.startswith("sess_")
    assert sess.status == "idle"
    assert sess.agent.id == agent.id and sess.agent.version == 1
    assert [t.name for t in sess.agent.tools] == ["add"]
    assert sess.metadata == {"job": "x"} and sess.environment_variables == {"A": "1"}
    assert sess.resources == [] and sess.archived_at is None

    assert qca.sessions.retrieve(sess.id).title == "chat"
    upd = qca.sessions.update(sess.id, title="chat-2", metadata={"job": None, "k": "v"})
    assert upd.title == "chat-2" and upd.metadata == {"k": "v"}
    assert sess.id in {s.id for s in qca.sessions.list(agent_id=agent.id, limit=10)}

    # a user message starts a turn; the live (queued) item serves it, nothing new is enqueued
    sent = qca.sessions.events.send(sess.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}])
    assert len(sent.data) == 1
    msg = sent.data[0]
    assert msg.type == "user.message" and msg.id.startswith("evt_") and msg.processed_at is not None
    assert qca.sessions.retrieve(sess.id).status == "running"
    assert sess.id in {s.id for s in qca.sessions.list(agent_id=agent.id, statuses=["running"])}
    assert len(list(qca.environments.work.list(env.id))) == 1
    with pytest.raises(ConflictError):  # user.message while running
        qca.sessions.events.send(sess.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "x"}]}])

    log = list(qca.sessions.events.list(sess.id, limit=100, order="asc"))
    types = [e.type for e in log]
    assert types[:2] == ["user.message", "session.status_running"], types
    assert [e.id for e in log] == sorted(e.id for e in log)
    newest_first = list(qca.sessions.events.list(sess.id, types=["user.message", "session.status_running"], order="desc", limit=1))
    assert [e.type for e in newest_first] == ["session.status_running", "user.message"]

    # the stream replays what follows Last-Event-ID, then follows live
    with qca.sessions.events.stream(sess.id, last_event_id=msg.id) as stream:
        first = next(iter(stream))
        assert first.type == "session.status_running"
        # the test plays the platform runtime (admin may post agent-side events)
        qca_lenient.sessions.events.send(
            sess.id, events=[{"type": "agent.message", "content": [{"type": "text", "text": "hello"}]}]
        )
        for ev in stream:
            if ev.type == "agent.message":
                assert ev.content[0].text == "hello"
                break
        assert stream.last_event_id and stream.last_event_id.startswith("evt_")

    qca_lenient.sessions.events.send(sess.id, events=[{"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}])
    assert qca.sessions.retrieve(sess.id).status == "idle"

    # cancel while idle is a 200 no-op
    raw = qca_lenient.sessions.with_raw_response.cancel(sess.id)
    assert raw.status_code == 200

    # archive force-stops the live item and keeps the session readable
    arch = qca.sessions.archive(sess.id)
    assert arch.archived_at is not None
    wait_until(lambda: only_item(qca, env.id).state == "stopped", timeout=5, what="item stopped by archive")
    with pytest.raises(ConflictError):
        qca.sessions.events.send(sess.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "x"}]}])

    gone = qca.sessions.delete(sess.id)
    assert gone.id == sess.id and gone.type == "session_deleted"
    with pytest.raises(NotFoundError):
        qca.sessions.retrieve(sess.id)


def test_message_to_dormant_session_enqueues_new_item(qca, qca_lenient, env, agent):
    w = qca.environments.work
    sess = new_session(qca, env, agent)
    first = only_item(qca, env.id)
    w.stop(first.id, environment_id=env.id, force=True)
    qca.sessions.events.send(sess.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "wake"}]}])
    items = list(w.list(env.id))
    assert [x.state for x in items] == ["stopped", "queued"]
    assert items[1].data.id == sess.id and items[1].id != first.id


def test_session_token_is_scoped_to_its_item(qca, env, agent):
    """The sessions_token from `secret` drives that one item with the same typed SDK."""
    new_session(qca, env, agent)
    item = qca.environments.work.poll(env.id, worker_id="qca-tok")
    token = decode_secret(item.secret)["sessions_token"]
    qca.environments.work.ack(item.id, environment_id=env.id)
    call = qca.sessions.events.send(
        item.data.id, events=[{"type": "agent.custom_tool_use", "name": "add", "input": {"a": 1, "b": 2}}]
    ).data[0]
    with make_client(token=token) as scoped:
        assert scoped.environments.work.retrieve(item.id, environment_id=env.id).id == item.id
        assert scoped.sessions.retrieve(item.data.id).id == item.data.id
        # it reads its session's events and answers tool calls
        assert call.id in [e.id for e in scoped.sessions.events.list(item.data.id, limit=100)]
        result = scoped.sessions.events.send(
            item.data.id,
            events=[{"type": "user.custom_tool_result", "custom_tool_use_id": call.id, "content": [{"type": "text", "text": "3"}]}],
        )
        assert result.data[0].type == "user.custom_tool_result"
        # the session token may not poll the queue (environment key / admin only), nor send user input
        with pytest.raises(APIStatusError) as ei:
            scoped.environments.work.poll(env.id)
        assert ei.value.status_code == 403
        with pytest.raises(PermissionDeniedError):
            scoped.sessions.events.send(item.data.id, events=[{"type": "user.message", "content": [{"type": "text", "text": "x"}]}])
        assert scoped.environments.work.heartbeat(item.id, environment_id=env.id).state == "active"
        assert scoped.environments.work.stop(item.id, environment_id=env.id, force=True).state == "stopped"
        # the token died with its item
        with pytest.raises(AuthenticationError):
            scoped.sessions.retrieve(item.data.id)
