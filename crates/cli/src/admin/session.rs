//! `tether session …`.

use anyhow::Result;
use clap::{Args, Subcommand};
use tether_client::{AgentRef, CreateSession, ListSessions, NewEvent, Session, UpdateSession};

use super::output::{self, Table};
use super::{key_value, metadata_patch, Ctx, PageArgs};

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Create a session (on a self-hosted environment this queues work for a worker).
    Create(CreateArgs),
    /// List sessions.
    List(ListArgs),
    /// Show one session.
    Get { id: String },
    /// Change a session's title or metadata.
    Update(UpdateArgs),
    /// Archive a session (its running work is stopped).
    Archive { id: String },
    /// Delete a session and its events (its running work is stopped).
    Delete { id: String },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The agent (agent_…).
    #[arg(long)]
    agent: String,
    /// Pin this version of the agent instead of its current one.
    #[arg(long)]
    agent_version: Option<u32>,
    /// The environment (env_…).
    #[arg(long = "env", visible_alias = "environment")]
    environment: String,
    /// Title.
    #[arg(long)]
    title: Option<String>,
    /// Metadata entry KEY=VALUE (repeatable; copied into the session's work items).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Environment variable KEY=VALUE for the worker's program (repeatable).
    #[arg(long = "env-var", value_name = "KEY=VALUE", value_parser = key_value)]
    env_vars: Vec<(String, String)>,
    /// A first user message, so that the first turn starts at once.
    #[arg(long)]
    message: Option<String>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only sessions on this environment.
    #[arg(long = "env", visible_alias = "environment")]
    environment: Option<String>,
    /// Only sessions of this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only sessions in this status: idle, running, rescheduling, terminated (repeatable).
    #[arg(long = "status")]
    statuses: Vec<String>,
    /// Include archived sessions.
    #[arg(long)]
    include_archived: bool,
    #[command(flatten)]
    page: PageArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    id: String,
    /// New title.
    #[arg(long)]
    title: Option<String>,
    /// Set a metadata entry KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Remove a metadata key (repeatable).
    #[arg(long = "unset-metadata", value_name = "KEY")]
    unset_metadata: Vec<String>,
}

pub async fn run(cx: Ctx, command: SessionCommand) -> Result<()> {
    let client = &cx.client;
    match command {
        SessionCommand::Create(args) => {
            let agent = match args.agent_version {
                Some(version) => AgentRef::Version {
                    id: args.agent,
                    version,
                },
                None => AgentRef::Id(args.agent),
            };
            let mut body = CreateSession::new(agent, args.environment);
            body.title = args.title;
            body.metadata = args.metadata.into_iter().collect();
            body.environment_variables = args.env_vars.into_iter().collect();
            body.initial_events = args
                .message
                .map(NewEvent::user_message)
                .into_iter()
                .collect();
            let session = client.create_session(&body).await?;
            cx.emit(&session, || show(&session));
        }
        SessionCommand::List(args) => {
            let page = args
                .page
                .fetch(|list| {
                    let client = client.clone();
                    let params = ListSessions {
                        list,
                        agent_id: args.agent.clone(),
                        environment_id: args.environment.clone(),
                        statuses: args.statuses.iter().map(|s| s.as_str().into()).collect(),
                        include_archived: args.include_archived,
                        ..Default::default()
                    };
                    async move { client.list_sessions(&params).await }
                })
                .await?;
            cx.emit_list(&page, "No sessions.", table);
        }
        SessionCommand::Get { id } => {
            let session = client.get_session(&id).await?;
            cx.emit(&session, || show(&session));
        }
        SessionCommand::Update(args) => {
            let body = UpdateSession {
                title: args.title,
                metadata: metadata_patch(&args.metadata, &args.unset_metadata),
                ..Default::default()
            };
            let session = client.update_session(&args.id, &body).await?;
            cx.emit(&session, || show(&session));
        }
        SessionCommand::Archive { id } => {
            let session = client.archive_session(&id).await?;
            cx.emit(&session, || format!("Archived session {}.\n", session.id));
        }
        SessionCommand::Delete { id } => {
            let deleted = client.delete_session(&id).await?;
            cx.emit(&deleted, || format!("Deleted session {}.\n", deleted.id));
        }
    }
    Ok(())
}

fn show(session: &Session) -> String {
    output::fields(&[
        ("id", session.id.clone()),
        ("status", session.status.to_string()),
        ("title", output::or_dash(session.title.as_deref())),
        (
            "agent",
            format!("{} (version {})", session.agent_id, session.agent.version),
        ),
        ("environment", session.environment_id.clone()),
        ("metadata", output::map(&session.metadata)),
        ("env vars", output::map(&session.environment_variables)),
        ("created", output::time(Some(&session.created_at))),
        ("updated", output::time(Some(&session.updated_at))),
        ("archived", output::time(session.archived_at.as_deref())),
    ])
}

fn table(sessions: &[Session]) -> String {
    let mut t = Table::new(&["ID", "STATUS", "AGENT", "ENVIRONMENT", "TITLE", "CREATED"]);
    for s in sessions {
        t.row(vec![
            s.id.clone(),
            s.status.to_string(),
            s.agent_id.clone(),
            s.environment_id.clone(),
            output::or_dash(s.title.as_deref()),
            output::time(Some(&s.created_at)),
        ]);
    }
    t.render()
}
