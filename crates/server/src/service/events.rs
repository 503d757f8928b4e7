//! Session events (§12.3, §12.4): building them (ids that only grow within a session, the bodies the server
//! writes itself), accepting batches from clients and workers, listing them, and following them live.

use std::collections::VecDeque;

use serde_json::{json, Map, Value};
use tether_core::events::{self as rules, EventType, Sender, TurnState, MAX_EVENTS_PER_BATCH};
use tether_core::ids::{self, IdKind};
use tether_core::resources::{Session, SessionEvent};
use tether_core::session::{self, ServerEvent, SessionStatus};
use tether_core::Timestamp;
use tether_store::{ChangeSet, Cursor, EventDoc, Page, PageRequest, Write};
use tokio::sync::watch;

use super::tokens::Principal;
use super::{App, Error, Result, Retry};
use crate::memory::Share;

/// Appends an event of `kind` with `fields` to `session` (which remembers the newest id). The id is a
/// fresh UUIDv7 unless that would not sort after the session's newest event (clock skew between
/// servers), in which case it is the newest id's successor.
pub fn new_event(
    session: &mut Session,
    kind: &str,
    fields: Map<String, Value>,
    now: Timestamp,
) -> SessionEvent {
    let mut id = ids::new_id(IdKind::Event);
    if let Some(last) = &session.last_event_id {
        if id.as_str() <= last.as_str() {
            id = ids::successor(IdKind::Event, last).expect("event ids are well formed");
        }
    }
    session.last_event_id = Some(id.clone());
    let mut body = Map::new();
    body.insert("id".into(), json!(id));
    body.insert("type".into(), json!(kind));
    body.insert("processed_at".into(), json!(now.to_rfc3339()));
    for (k, v) in fields {
        if !matches!(k.as_str(), "id" | "type" | "processed_at") {
            body.insert(k, v);
        }
    }
    SessionEvent {
        id,
        session_id: session.id.clone(),
        body: Value::Object(body),
    }
}

/// The event the server writes for a coupling decision (its type and fields are the core's).
pub fn server_event(session: &mut Session, event: &ServerEvent, now: Timestamp) -> SessionEvent {
    new_event(session, event.kind().as_str(), event.fields(), now)
}

/// Applies a session coupling (`session::couple` and kin) to `session`: its status and input flag,
/// and the server events it writes, in order, numbered on the session.
pub fn apply_coupling(
    session: &mut Session,
    coupling: &tether_core::session::Coupling,
    now: Timestamp,
) -> Vec<SessionEvent> {
    session.status = coupling.status;
    session.pending_input = coupling.pending_input;
    coupling
        .events
        .iter()
        .map(|event| server_event(session, event, now))
        .collect()
}

/// The events of one `POST /sessions/{id}/events`, in order, as sent: event types are open-ended (a
/// user event may carry fields of its own), so each is judged against its type's rules
/// ([`App::incoming_events`]) rather than by its shape in the request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewEvents {
    pub events: Vec<Value>,
}

/// One incoming event that passed the shape and permission checks.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub kind: EventType,
    /// The event as sent; `id`, `type` and `processed_at` are the server's to set.
    pub fields: Map<String, Value>,
}

/// What appending a batch produced.
#[derive(Debug, Default)]
pub struct Appended {
    /// The caller's events as stored, in the order sent (the answer of `POST …/events`).
    pub posted: Vec<SessionEvent>,
    /// Every event to insert: the caller's and those the server writes after them.
    pub all: Vec<SessionEvent>,
    /// A new work item is due (the session had no live item, D-12b).
    pub enqueue: bool,
}

/// Appends `batch` to `session`, whose turn-relevant state `turn` mirrors (§12.4). All or nothing: the
/// first refused event refuses the batch (409) and `session` must then be thrown away.
pub fn append_batch(
    session: &mut Session,
    turn: &mut TurnState,
    batch: &[Incoming],
    now: Timestamp,
) -> Result<Appended> {
    let mut out = Appended::default();
    for event in batch {
        let applied = rules::apply(turn, event.kind)?;
        let stored = new_event(session, event.kind.as_str(), event.fields.clone(), now);
        out.posted.push(stored.clone());
        out.all.push(stored);
        for server in &applied.server_events {
            if *server == ServerEvent::StatusRunning {
                session.turns_started += 1;
            }
            out.all.push(server_event(session, server, now));
        }
        out.enqueue |= applied.enqueue;
    }
    session.status = turn.status;
    session.pending_input = turn.pending_input;
    Ok(out)
}

/// The largest page a live stream reads at once.
const TAIL_PAGE: u32 = 100;

/// How many events a filtered listing reads from the store at a time.
const SCAN_PAGE: u32 = 500;

/// The most event bytes one read of the store brings into memory for a listing, a filtered scan or a
/// live stream's replay (plus at most one event more: a read always makes progress). Together with the
/// event limit this bounds what any one of them holds at a time (ARCHITECTURE.md, "Bounded everything").
pub const READ_BYTES: usize = 1 << 20;

/// Which events a listing keeps: the SDKs' `types[]` and `created_at[gt|gte|lt|lte]` (an event's
/// creation time is its `processed_at`). Type names the server does not know simply match nothing.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub types: Vec<String>,
    pub created_gt: Option<Timestamp>,
    pub created_gte: Option<Timestamp>,
    pub created_lt: Option<Timestamp>,
    pub created_lte: Option<Timestamp>,
}

impl EventFilter {
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
            && self.created_gt.is_none()
            && self.created_gte.is_none()
            && self.created_lt.is_none()
            && self.created_lte.is_none()
    }

    pub fn keeps(&self, event: &EventDoc) -> bool {
        if self.is_empty() {
            return true;
        }
        let head = event.head();
        let kind = head.kind.as_str();
        if !self.types.is_empty() && !self.types.iter().any(|t| t == kind) {
            return false;
        }
        let bounds = [
            self.created_gt,
            self.created_gte,
            self.created_lt,
            self.created_lte,
        ];
        if bounds.iter().all(Option::is_none) {
            return true;
        }
        let Some(at) = head
            .processed_at
            .as_deref()
            .and_then(Timestamp::parse_rfc3339)
        else {
            return false;
        };
        let within = |bound: Option<Timestamp>, ok: fn(Timestamp, Timestamp) -> bool| {
            bound.is_none_or(|t| ok(at, t))
        };
        within(self.created_gt, |at, t| at > t)
            && within(self.created_gte, |at, t| at >= t)
            && within(self.created_lt, |at, t| at < t)
            && within(self.created_lte, |at, t| at <= t)
    }
}

impl App {
    /// Checks the events a request carries under `field` (`events`, or `initial_events` on session
    /// create): `least` to [`MAX_EVENTS_PER_BATCH`] of them (400), every type is known and postable
    /// (400), the sender may send each (403), every shape is right (400), and every tool result names a
    /// tool call of the right kind in the session (400). Refusals name the field at fault, e.g.
    /// `events[1].content`.
    pub async fn incoming_events(
        &self,
        session_id: &str,
        field: &str,
        list: Vec<Value>,
        sender: Sender,
        least: usize,
    ) -> Result<Vec<Incoming>> {
        if list.len() < least || list.len() > MAX_EVENTS_PER_BATCH {
            return Err(Error::invalid(
                field,
                format!("{field} must hold {least} to {MAX_EVENTS_PER_BATCH} events"),
            ));
        }
        let at = |i: usize| format!("{field}[{i}]");
        let kinds = list
            .iter()
            .enumerate()
            .map(|(i, event)| rules::event_type(&at(i), event))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::invalid(&e.param, e.message))?;
        if let Some((i, kind)) = kinds
            .iter()
            .enumerate()
            .find(|(_, kind)| !rules::may_send(sender, **kind))
        {
            return Err(Error::Forbidden {
                param: Some(format!("{}.type", at(i))),
                message: format!("a worker credential may not send {} events", kind.as_str()),
            });
        }
        let mut batch = Vec::with_capacity(list.len());
        for (i, (event, kind)) in list.into_iter().zip(kinds).enumerate() {
            rules::validate(&at(i), kind, &event)
                .map_err(|e| Error::invalid(&e.param, e.message))?;
            self.check_event_size(&at(i), &event)?;
            let Value::Object(fields) = event else {
                unreachable!("an event that passed validation is an object");
            };
            if let Some((name, call_kind)) = kind.tool_reference() {
                let call = fields.get(name).and_then(Value::as_str).unwrap_or_default();
                if !self.is_event_of(session_id, call, call_kind).await? {
                    return Err(Error::invalid(
                        &format!("{}.{name}", at(i)),
                        format!(
                            "{name} {call:?} names no {} event of this session",
                            call_kind.as_str()
                        ),
                    ));
                }
            }
            batch.push(Incoming { kind, fields });
        }
        Ok(batch)
    }

    /// An event as sent may take at most the event limit in bytes of JSON (the server adds its `id`,
    /// `type` and `processed_at`, a fixed ~100 bytes, to what is stored).
    fn check_event_size(&self, param: &str, event: &Value) -> Result<()> {
        let limit = self.config.max_event_bytes;
        let size = json_size(event);
        if size > limit {
            return Err(Error::EventTooLarge {
                param: param.to_owned(),
                size,
                limit,
            });
        }
        Ok(())
    }

    /// Whether `id` is an event of type `kind` in the session's log.
    async fn is_event_of(&self, session_id: &str, id: &str, kind: EventType) -> Result<bool> {
        if !rules::is_event_id(id) {
            return Ok(false);
        }
        let Some(next) = ids::successor(IdKind::Event, id) else {
            return Ok(false);
        };
        // The one event at or before `id`: the log has no lookup by id, and needs none elsewhere.
        let page = self
            .store
            .list_events(
                session_id,
                &PageRequest {
                    cursor: Cursor::Before(next),
                    limit: 1,
                    descending: false,
                },
                READ_BYTES,
            )
            .await?;
        Ok(page
            .items
            .first()
            .is_some_and(|e| e.id == id && e.head().kind == kind.as_str()))
    }

    /// `POST /sessions/{id}/events` (§12.3): the batch is one atomic conditional write of the session row,
    /// its events and any work item, decided again from a fresh read whenever it loses a race.
    pub async fn post_events(
        &self,
        session: &Session,
        sender: Sender,
        events: NewEvents,
    ) -> Result<Vec<SessionEvent>> {
        let session_id = session.id.as_str();
        let batch = self
            .incoming_events(session_id, "events", events.events, sender, 1)
            .await?;
        let cost = disk_cost(&batch);
        match turn_control(&batch, session.status) {
            Some(TurnControl::Ends) => {}
            Some(TurnControl::KeepsInHand) => self.disk.room_in_reserve(cost)?,
            None => self.disk.room_to_add(cost)?,
        }
        // The kind of an environment never changes (D-20), so it is read once.
        let self_hosted = self
            .environment(&session.environment_id)
            .await?
            .is_self_hosted();
        let runnable = batch.iter().any(|e| e.kind.is_runnable_input());
        self.with_session_retries(session_id, || async {
            let current = self.session_versioned(session_id).await?;
            let live = if runnable && self_hosted {
                self.store.live_work_for_session(session_id).await?
            } else {
                None
            };
            let now = self.now();
            let mut next = current.value.clone();
            let mut turn = TurnState {
                status: next.status,
                archived: next.archived_at.is_some(),
                self_hosted,
                live_item: live.as_ref().map(|l| l.value.state),
                pending_input: next.pending_input,
            };
            let appended = append_batch(&mut next, &mut turn, &batch, now)?;
            next.updated_at = now;
            let mut changes = ChangeSet::new();
            if let Some(live) = &live {
                // The queue decision rested on this item's state: write it back unchanged under its version,
                // so that the batch fails and is decided again if the item moved meanwhile (say, it stopped
                // without anyone left to serve the turn that this batch starts).
                changes.push(Write::UpdateWork {
                    item: live.value.clone(),
                    expected_version: live.version,
                    transitions: Vec::new(),
                    session_version: None,
                });
            }
            let mut claimable = Vec::new();
            if appended.enqueue {
                let (item, write) = self.enqueue_for_session(&next, now);
                changes.push(write);
                claimable.push(item.environment_id);
            }
            changes.push(Write::UpdateSession {
                session: next.clone(),
                expected_version: current.version,
            });
            changes
                .writes
                .extend(appended.all.into_iter().map(Write::InsertEvent));
            self.commit(changes).await?;
            self.announce_claimable(&claimable).await;
            self.announce_session(session_id).await;
            Ok::<_, Retry>(appended.posted)
        })
        .await
    }

    /// `GET /sessions/{id}/events`: one page of the log, of the events `filter` keeps.
    pub async fn list_events(
        &self,
        session_id: &str,
        page: &PageRequest,
        filter: &EventFilter,
    ) -> Result<Page<EventDoc>> {
        super::in_list_order(
            page,
            |e: &EventDoc| &e.id,
            |page| async move { self.events_page(session_id, &page, filter).await },
        )
        .await
    }

    /// A page of the events `filter` keeps, read in the page's direction (`has_more`: one more
    /// match lies beyond it in that direction).
    async fn events_page(
        &self,
        session_id: &str,
        page: &PageRequest,
        filter: &EventFilter,
    ) -> Result<Page<EventDoc>> {
        if filter.is_empty() {
            return Ok(self.store.list_events(session_id, page, READ_BYTES).await?);
        }
        // The store pages by id only, so a filtered page is gathered by scanning on from the cursor
        // until one more match than the page holds has been seen (that one only says `has_more`).
        let backward = matches!(page.cursor, Cursor::Before(_));
        let want = page.limit as usize;
        let mut found: Vec<EventDoc> = Vec::new();
        let mut found_bytes = 0usize;
        let mut scan = PageRequest {
            cursor: page.cursor.clone(),
            limit: SCAN_PAGE,
            descending: page.descending,
        };
        loop {
            // What the page holds so far counts against the read's bytes too.
            let room = READ_BYTES.saturating_sub(found_bytes).max(1);
            let chunk = self.store.list_events(session_id, &scan, room).await?;
            let (Some(first), Some(last)) = (chunk.items.first(), chunk.items.last()) else {
                break;
            };
            let next = if backward {
                Cursor::Before(first.id.clone())
            } else {
                Cursor::After(last.id.clone())
            };
            let more = chunk.has_more;
            let kept: Vec<EventDoc> = chunk
                .items
                .into_iter()
                .filter(|e| filter.keeps(e))
                .collect();
            found_bytes += kept.iter().map(|e| e.body.get().len()).sum::<usize>();
            if backward {
                found.splice(0..0, kept);
            } else {
                found.extend(kept);
            }
            if found.len() > want || !more {
                break;
            }
            if found_bytes > READ_BYTES && !found.is_empty() {
                // A page is bounded by bytes as well as by count: stop here and say there is more.
                let has_more = true;
                return Ok(Page {
                    items: found,
                    has_more,
                });
            }
            scan.cursor = next;
        }
        let has_more = found.len() > want;
        if backward {
            found.drain(..found.len().saturating_sub(want));
        } else {
            found.truncate(want);
        }
        Ok(Page {
            items: found,
            has_more,
        })
    }

    /// `POST /sessions/{id}/cancel` (§7.2, §12.2): while a turn runs, appends `user.interrupt` for the
    /// worker to act on and answers `true` ("canceling"); the turn ends when the worker (or an admin
    /// runtime) posts `session.status_idle`. Without a running turn nothing happens.
    pub async fn cancel_session(&self, session_id: &str) -> Result<(bool, Session)> {
        self.with_session_retries(session_id, || async {
            let current = self.session_versioned(session_id).await?;
            let interrupt =
                rules::interrupt(current.value.status, current.value.archived_at.is_some())?;
            if !interrupt {
                return Ok((false, current.value));
            }
            let now = self.now();
            let mut next = current.value.clone();
            let interrupt = new_event(
                &mut next,
                EventType::UserInterrupt.as_str(),
                Map::new(),
                now,
            );
            let mut changes = ChangeSet::one(Write::InsertEvent(interrupt));
            // A turn no worker has started would stay `running` until one took it: it ends now.
            let had_item = self
                .end_live_item(&mut next, now, &mut changes, |item| {
                    tether_core::work::interrupt_unstarted(item, now)
                })
                .await?;
            // One that no item serves at all (a `cloud` environment's) would never end: it ends too.
            if !had_item {
                let coupling = tether_core::session::on_interrupt_without_item(
                    next.status,
                    next.pending_input,
                );
                for event in apply_coupling(&mut next, &coupling, now) {
                    changes.push(Write::InsertEvent(event));
                }
            }
            next.updated_at = now;
            changes.push(Write::UpdateSession {
                session: next.clone(),
                expected_version: current.version,
            });
            self.commit(changes).await?;
            self.announce_session(session_id).await;
            Ok((true, next))
        })
        .await
    }

    /// Opens a live tail of a session's log. It subscribes to the session's wake-ups before it reads the
    /// session, so that nothing committed in between is missed. With `after`, the tail starts after that
    /// event (a resume); without, after the newest event at this moment.
    ///
    /// `share` pays for each page the tail reads until its events are handed out. `reader` is the
    /// credential the tail was opened with: a page read after it was revoked, or after its session
    /// token died, is not handed out, and the tail ends.
    pub async fn tail_events(
        &self,
        session_id: &str,
        after: Option<String>,
        share: Share,
        reader: Principal,
    ) -> Result<(Session, EventTail)> {
        let wake = self.hub.subscribe(session_id);
        let closed = self.hub.closed();
        let session = self.session(session_id).await?;
        let cursor = after.or_else(|| session.last_event_id.clone());
        let tail = EventTail {
            app: self.clone(),
            session_id: session.id.clone(),
            cursor,
            wake,
            closed,
            pending: VecDeque::new(),
            pending_bytes: 0,
            share,
            reader,
            caught_up: false,
            finished: false,
        };
        Ok((session, tail))
    }

    /// What reading one page of events may take in memory: the rows as the store hands them over
    /// and the documents cut from them, each a page's byte bound and one event more. A reader takes
    /// this much of the memory budget first (no more than its caller may hold), then keeps what the
    /// page turned out to hold ([`page_bytes`]) until it is handed out.
    pub fn page_reservation(&self) -> usize {
        (2 * (READ_BYTES + self.config.max_event_bytes)).min(self.page_memory.caller_part())
    }
}

/// What a page of events holds in memory, near enough: its documents and their ids.
pub fn page_bytes<'a>(events: impl IntoIterator<Item = &'a EventDoc>) -> usize {
    events.into_iter().map(event_bytes).sum()
}

fn event_bytes(event: &EventDoc) -> usize {
    event.body.get().len() + event.id.len()
}

/// A live tail of one session's log. It reads the store only when the hub says the session changed
/// (a write here, or a notice from another server process), so idle tails cost no queries.
pub struct EventTail {
    app: App,
    session_id: String,
    /// The newest event handed out (or the starting point).
    cursor: Option<String>,
    wake: watch::Receiver<u64>,
    closed: watch::Receiver<bool>,
    pending: VecDeque<EventDoc>,
    /// What `pending` holds ([`page_bytes`]), paid for by `share`.
    pending_bytes: usize,
    share: Share,
    /// The credential the tail was opened with; see [`App::tail_events`].
    reader: Principal,
    /// Everything up to the last wake-up has been read.
    caught_up: bool,
    /// The last event has been queued: `session.status_terminated`, or the deletion notice.
    finished: bool,
}

impl EventTail {
    /// The next event, waiting for it if need be. `None` ends the stream: after
    /// `session.status_terminated`, after the session was deleted (the last event is then a
    /// `session.deleted` the server makes up, since the log went with the session), at shutdown, or when
    /// the store fails (the client resumes with `Last-Event-ID`).
    ///
    /// The event comes with its part of the tail's share of the page budget: whoever writes it out
    /// holds that until the text made of it is let go (a client that takes nothing leaves it in
    /// hyper's buffers; those pay for it too).
    pub async fn next(&mut self) -> Option<(EventDoc, Share)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                let size = event_bytes(&event);
                self.pending_bytes = self.pending_bytes.saturating_sub(size);
                let held = self.share.split_off(size);
                self.share.shrink_to(self.pending_bytes);
                if event.head().kind == EventType::SessionStatusTerminated.as_str() {
                    self.finished = true;
                    self.pending.clear();
                    self.share.shrink_to(0);
                }
                return Some((event, held));
            }
            if self.finished || *self.closed.borrow() {
                return None;
            }
            if !self.caught_up {
                if let Err(e) = self.read().await {
                    tracing::debug!(session = %self.session_id, error = %e, "event stream ends on a store error");
                    return None;
                }
                continue;
            }
            let (wake, closed) = (&mut self.wake, &mut self.closed);
            tokio::select! {
                changed = wake.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    self.caught_up = false;
                }
                _ = closed.wait_for(|closed| *closed) => return None,
            }
        }
    }

    /// Reads the next page, once the memory budget has room for it; without reading when it had
    /// none for a while (the caller of `next` asks again, unless the stream is closing meanwhile).
    async fn read(&mut self) -> Result<()> {
        if let Err(refusal) = self.share.take(self.app.page_reservation()).await {
            tracing::debug!(session = %self.session_id, ?refusal, "event stream waits for memory");
            return Ok(());
        }
        let request = PageRequest {
            cursor: self.cursor.clone().map_or(Cursor::Start, Cursor::After),
            limit: TAIL_PAGE,
            descending: false,
        };
        // The store's part runs as a task of its own. A stream's body is read only while hyper asks
        // for more, and a client that stops taking (an HTTP/2 window kept shut) can leave a body
        // asked once and never again; a read caught there would keep one of the store's few pooled
        // connections for as long as the client liked. As a task, it ends and gives the connection
        // back whatever the body does; its page waits here, paid for by the share.
        let store = self.app.store.clone();
        let session_id = self.session_id.clone();
        let read = tokio::spawn(async move {
            let page = store.list_events(&session_id, &request, READ_BYTES).await?;
            // Nothing new: the wake-up may have been a deletion, or the session may be over already.
            let session = if page.items.is_empty() {
                Some(store.get_session(&session_id).await?)
            } else {
                None
            };
            Ok::<_, tether_store::StoreError>((page, session))
        });
        let (page, session) = read.await.map_err(|e| {
            tracing::error!(session = %self.session_id, error = %e, "an event stream's read failed");
            Error::Internal
        })??;
        // Asked after the read: every event of the page was committed before this answer, so a
        // revocation (or a token's death) that came before any of them is seen here. Through this
        // process it clears the credential cache at once; through another, within its 1 s. A store
        // that does not answer ends nothing, as in `App::lapsed`.
        if !page.items.is_empty() {
            if let Ok(false) = self.app.still_holds(&self.reader).await {
                tracing::debug!(session = %self.session_id, "event stream ends: its credential no longer holds");
                self.finished = true;
                return Ok(());
            }
        }
        self.caught_up = !page.has_more;
        if let Some(last) = page.items.last() {
            self.cursor = Some(last.id.clone());
        }
        // Read when the page was empty: `Some(None)`, the session is gone.
        match session {
            Some(None) => {
                let id = ids::new_id(IdKind::Event);
                let body = json!({
                    "id": id,
                    "type": EventType::SessionDeleted.as_str(),
                    "processed_at": self.app.now().to_rfc3339(),
                });
                self.pending.push_back(EventDoc {
                    id,
                    body: serde_json::value::to_raw_value(&body).expect("a JSON value serializes"),
                });
                self.finished = true;
            }
            Some(Some(s)) if s.value.status == SessionStatus::Terminated => self.finished = true,
            _ => {}
        }
        self.pending_bytes += page_bytes(&page.items);
        self.pending.extend(page.items);
        self.share.shrink_to(self.pending_bytes);
        Ok(())
    }
}

/// The largest event [`turn_control`] lets past the disk floor.
pub const TURN_CONTROL_MAX_BYTES: usize = 4 * 1024;

/// What a batch that [`turn_control`] lets past the disk floor does to the turn under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TurnControl {
    /// `session.status_idle`: the turn ends, so another such event needs another turn, which
    /// starts only with input the floor refuses. Bounded by the turns under way.
    Ends,
    /// `session.error`, `user.interrupt`: the turn stays open, so the event could be sent again
    /// and again; let through only down to half the floor (`DiskRoom::room_in_reserve`).
    KeepsInHand,
}

/// Whether `batch`, posted to a session at `status`, may be while the store's disk is under its
/// floor (`crate::disk`): one event that ends the turn under way (`session.status_idle`), reports
/// its failure (`session.error`) or interrupts it (`user.interrupt`), of at most
/// [`TURN_CONTROL_MAX_BYTES`], and only while a turn is open. Without it every turn running when
/// the floor was crossed would end in an error with its item, and a runaway one could not be
/// cancelled. (Such events may carry fields of their own, and are stored as sent.)
fn turn_control(batch: &[Incoming], status: SessionStatus) -> Option<TurnControl> {
    let [event] = batch else { return None };
    let control = match event.kind {
        EventType::SessionStatusIdle => TurnControl::Ends,
        EventType::SessionError | EventType::UserInterrupt => TurnControl::KeepsInHand,
        _ => return None,
    };
    (session::turn_is_open(status)
        && json_size_up_to(&event.fields, TURN_CONTROL_MAX_BYTES) <= TURN_CONTROL_MAX_BYTES)
        .then_some(control)
}

/// The length of `value` as compact JSON, counted without building the text.
pub fn json_size(value: &impl serde::Serialize) -> usize {
    json_size_up_to(value, usize::MAX - 1)
}

/// What `batch` is taken to cost the store's disk until the free space is read again
/// (`crate::disk::disk_cost_of_events`).
pub(super) fn disk_cost(batch: &[Incoming]) -> u64 {
    let bytes = batch.iter().map(|e| json_size(&e.fields)).sum();
    crate::disk::disk_cost_of_events(batch.len(), bytes)
}

/// [`json_size`] of any serializable value, or `most + 1` as soon as it is longer than `most`: the
/// count stops there (a work item or session weighed for `crate::cache::WrittenRecords` need not be
/// written out whole to be known too heavy to keep).
pub fn json_size_up_to(value: &impl serde::Serialize, most: usize) -> usize {
    struct Counter {
        bytes: usize,
        most: usize,
    }
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes += buf.len();
            if self.bytes > self.most {
                // Stops the serializer: the value is too long whatever the rest is.
                return Err(std::io::ErrorKind::FileTooLarge.into());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter { bytes: 0, most };
    // A value that cannot be written as JSON could not be stored either: it counts as too long.
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.bytes,
        Err(_) => most.saturating_add(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_sizes_stop_at_the_most_asked_for() {
        assert_eq!(json_size_up_to(&"doc", 100), 5);
        assert_eq!(json_size_up_to(&"x".repeat(1_000), 100), 101);
        assert_eq!(
            json_size(&serde_json::json!({"a": [1, "b"]})),
            r#"{"a":[1,"b"]}"#.len()
        );
    }
}
