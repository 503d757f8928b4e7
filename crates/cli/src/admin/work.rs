//! `tether work …`: look at an environment's queue and stop items.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::Value;
use tether_client::{ListParams, Paginated, QueueStats, WorkHistory, WorkItem, Worker};

use super::output::{self, Table};
use super::{Ctx, PageArgs};

#[derive(Subcommand, Debug)]
pub enum WorkCommand {
    /// List an environment's work items (every state, queue order).
    List {
        /// The environment.
        env: String,
        /// Only the items stopped as poison (too many lease expiries) and not requeued yet.
        #[arg(long)]
        poison: bool,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one work item.
    Get(ItemArgs),
    /// Show queue statistics.
    Stats {
        /// The environment.
        env: String,
    },
    /// Show why an item moved: its state transitions, oldest first.
    History {
        #[command(flatten)]
        item: ItemArgs,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Stop an item: gracefully (the worker drains, then confirms) or at once with --force. Once it
    /// is stopped (--force, or a stop that confirms an item already stopping), the session's next
    /// item waits until the stopped lease's deadline, by which its worker has killed the program.
    Stop {
        #[command(flatten)]
        item: ItemArgs,
        /// Stop at once instead of asking the worker to drain.
        #[arg(long)]
        force: bool,
    },
    /// Give the session of a stopped item (e.g. poison) a fresh queued item (admin only).
    Requeue {
        #[command(flatten)]
        item: ItemArgs,
        /// Why, for the history of both items.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List the workers seen polling an environment in the last five minutes.
    Workers {
        /// The environment.
        env: String,
    },
}

#[derive(Args, Debug)]
pub struct ItemArgs {
    /// The environment.
    env: String,
    /// The work item (work_…).
    work: String,
}

pub async fn run(cx: Ctx, command: WorkCommand) -> Result<()> {
    let client = &cx.client;
    match command {
        WorkCommand::List { env, poison, page } => {
            let page = page
                .fetch(|list: ListParams| {
                    let client = client.clone();
                    let env = env.clone();
                    async move {
                        if poison {
                            client.list_poison_work(&env, &list).await
                        } else {
                            client.list_work(&env, &list).await
                        }
                    }
                })
                .await?;
            cx.emit_list(&page, "No work items.", table);
        }
        WorkCommand::Get(item) => {
            let work = client.get_work(&item.env, &item.work).await?;
            cx.emit(&work, || show(&work));
        }
        WorkCommand::Stats { env } => {
            let stats = client.work_stats(&env).await?;
            cx.emit(&stats, || show_stats(&stats));
        }
        WorkCommand::History { item, page } => {
            let mut params = ListParams {
                limit: page.limit,
                page: page.page.clone(),
                ..Default::default()
            };
            let mut history = client.work_history(&item.env, &item.work, &params).await?;
            if page.all {
                // Joined by hand (not `collect_all`) to keep the envelope's heartbeat count.
                while let (_, Some(next)) = history.clone().into_parts() {
                    params.page = Some(next);
                    let more = client.work_history(&item.env, &item.work, &params).await?;
                    history.data.extend(more.data);
                    history.has_more = more.has_more;
                    history.next_page = more.next_page;
                    history.last_id = more.last_id;
                }
            }
            cx.emit(&history, || show_history(&history));
            if !cx.json && history.has_more {
                if let Some(next) = &history.next_page {
                    eprintln!("(more results: add --all, or --page {next} for the next page)");
                }
            }
        }
        WorkCommand::Stop { item, force } => {
            let work = client
                .stop_work_as_operator(&item.env, &item.work, force)
                .await?;
            cx.emit(&work, || {
                let acknowledged = work.acknowledged_at.is_some();
                let note = stop_note(work.state.as_str(), force, acknowledged);
                format!("Work item {} is {}{note}.\n", work.id, work.state)
            });
        }
        WorkCommand::Requeue { item, reason } => {
            let work = client
                .requeue_work(&item.env, &item.work, reason.as_deref())
                .await?;
            cx.emit(&work, || {
                format!(
                    "Work item {} requeued as {} ({}).\n",
                    item.work, work.id, work.state
                )
            });
        }
        WorkCommand::Workers { env } => {
            let workers = client.list_workers(&env).await?;
            if cx.json {
                cx.emit(&serde_json::json!({ "data": workers }), String::new);
            } else if workers.is_empty() {
                println!("No workers polled in the last five minutes.");
            } else {
                print!("{}", workers_table(&workers));
            }
        }
    }
    Ok(())
}

fn show(w: &WorkItem) -> String {
    output::fields(&[
        ("id", w.id.clone()),
        ("state", w.state.to_string()),
        ("environment", w.environment_id.clone()),
        ("serves", format!("{} {}", w.data.kind, w.data.id)),
        ("metadata", output::map(&w.metadata)),
        ("created", output::time(Some(&w.created_at))),
        ("acknowledged", output::time(w.acknowledged_at.as_deref())),
        ("started", output::time(w.started_at.as_deref())),
        (
            "last heartbeat",
            output::time(w.latest_heartbeat_at.as_deref()),
        ),
        (
            "stop requested",
            output::time(w.stop_requested_at.as_deref()),
        ),
        ("stopped", output::time(w.stopped_at.as_deref())),
        ("deliveries", count(w.delivery_count)),
        ("requeues", count(w.requeue_count)),
    ])
}

fn count(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

fn table(items: &[WorkItem]) -> String {
    let mut t = Table::new(&[
        "ID",
        "STATE",
        "SESSION",
        "DELIVERIES",
        "REQUEUES",
        "CREATED",
        "LAST HEARTBEAT",
    ]);
    for w in items {
        t.row(vec![
            w.id.clone(),
            w.state.to_string(),
            w.session_id().unwrap_or(&w.data.id).to_owned(),
            count(w.delivery_count),
            count(w.requeue_count),
            output::time(Some(&w.created_at)),
            output::time(w.latest_heartbeat_at.as_deref()),
        ]);
    }
    t.render()
}

fn show_stats(s: &QueueStats) -> String {
    let states = if s.states.is_empty() {
        "-".to_owned()
    } else {
        s.states
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    output::fields(&[
        ("depth", s.depth.to_string()),
        ("pending", s.pending.to_string()),
        ("oldest queued", output::time(s.oldest_queued_at.as_deref())),
        ("workers polling", count(s.workers_polling)),
        ("live items", states),
    ])
}

fn show_history(h: &WorkHistory) -> String {
    let mut t = Table::new(&["AT", "FROM", "TO", "CAUSE", "WORKER", "DETAIL"]);
    for tr in &h.data {
        t.row(vec![
            output::time(Some(&tr.at)),
            tr.from
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string),
            tr.to.to_string(),
            tr.cause.clone(),
            output::or_dash(tr.worker_id.as_deref()),
            match &tr.detail {
                None | Some(Value::Null) => "-".to_owned(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            },
        ]);
    }
    let mut out = t.render();
    if let Some(n) = h.heartbeat_count {
        out.push_str(&format!("heartbeats: {n} (counted, not listed)\n"));
    }
    out
}

fn workers_table(workers: &[Worker]) -> String {
    let mut t = Table::new(&["WORKER", "LAST POLL", "ITEMS"]);
    for w in workers {
        let items = if w.items.is_empty() {
            "-".to_owned()
        } else {
            w.items
                .iter()
                .map(|i| format!("{} ({})", i.id, i.state))
                .collect::<Vec<_>>()
                .join(", ")
        };
        t.row(vec![
            w.worker_id.clone(),
            output::time(Some(&w.last_poll_at)),
            items,
        ]);
    }
    t.render()
}

/// What `work stop` adds to the item's new state: when its program ends. A worker hears of a stop at
/// its next heartbeat, every half lease and at most `HEARTBEAT_INTERVAL_MAX` apart (§8); said here,
/// so that a program still running a while later is no surprise.
fn stop_note(state: &str, force: bool, acknowledged: bool) -> String {
    let within = tether_core::lease::HEARTBEAT_INTERVAL_MAX.as_secs();
    let heard = format!("its worker hears of it at its next heartbeat (within {within} s)");
    match state {
        "stopping" => format!(
            ": {heard}, sends its program SIGTERM and confirms once the program has ended; \
             --force stops it at once"
        ),
        // Only an item a worker had acknowledged had a program to end.
        // The server cannot hear when that program ends (the item's token died with the stop).
        "stopped" if force && acknowledged => format!(
            ": {heard} and then kills its program. The session's next turn waits until this \
             item's lease would have run out, so that no two programs serve the session"
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    /// A stop says when the program ends only where there is one: an item a worker acknowledged.
    #[test]
    fn a_stop_says_when_the_program_ends() {
        let sigterm = "within 30 s), sends its program SIGTERM and confirms once";
        let kill = "within 30 s) and then kills its program. The session's next turn waits until \
                    this item's lease would have run out";
        for (state, force, acknowledged, says) in [
            ("stopping", false, true, Some(sigterm)),
            ("stopped", true, true, Some(kill)),
            // Queued or delivered, never acknowledged: no program was started.
            ("stopped", true, false, None),
            ("stopped", false, false, None),
            // Stopped without --force: an acknowledged item would have answered `stopping`.
            ("stopped", false, true, None),
        ] {
            let note = super::stop_note(state, force, acknowledged);
            match says {
                Some(says) => assert!(
                    note.contains(says),
                    "{state} {force} {acknowledged}: {note}"
                ),
                None => assert_eq!(note, "", "{state} {force} {acknowledged}"),
            }
        }
    }

    /// Every time of an item reads alike: to the second, in UTC.
    #[test]
    fn an_item_shows_its_times_alike() {
        let item: super::WorkItem = serde_json::from_value(serde_json::json!({
            "id": "work_1",
            "environment_id": "env_1",
            "data": {"type": "session", "id": "sess_1"},
            "state": "active",
            "created_at": "2026-12-04T14:27:20.000001Z",
            "latest_heartbeat_at": "2026-12-04T14:27:22.557812Z",
        }))
        .unwrap();
        let shown = super::show(&item);
        assert!(
            shown.contains("created:         2026-12-04 14:27:20Z\n"),
            "{shown}"
        );
        assert!(
            shown.contains("last heartbeat:  2026-12-04 14:27:22Z\n"),
            "{shown}"
        );
    }
}
