//! `tether agent …`.

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
use tether_client::{Agent, CreateAgent, UpdateAgent};

use super::output::{self, Table};
use super::{key_value, Ctx, MetadataPatchArgs, PageArgs};

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Create an agent.
    Create(CreateArgs),
    /// List agents.
    List(ListArgs),
    /// Show one agent (its current version).
    Get {
        /// The agent (agent_…).
        id: String,
    },
    /// Change an agent; every change makes a new version (sessions keep theirs).
    Update(UpdateArgs),
    /// Archive an agent: no new sessions may use it.
    Archive {
        /// The agent (agent_…).
        id: String,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Display name (1–64 characters).
    #[arg(long)]
    name: String,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Free-text description.
    #[arg(long)]
    description: Option<String>,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Tool definitions as a JSON array.
    #[arg(long, value_name = "JSON")]
    tools: Option<String>,
    /// Metadata entry KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    metadata: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Include archived agents.
    #[arg(long)]
    include_archived: bool,
    #[command(flatten)]
    page: PageArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The agent (agent_…).
    id: String,
    /// New name.
    #[arg(long)]
    name: Option<String>,
    /// New model name.
    #[arg(long)]
    model: Option<String>,
    /// New description.
    #[arg(long)]
    description: Option<String>,
    /// New system prompt.
    #[arg(long)]
    system: Option<String>,
    /// Replace the tools with this JSON array.
    #[arg(long, value_name = "JSON")]
    tools: Option<String>,
    #[command(flatten)]
    metadata: MetadataPatchArgs,
}

impl UpdateArgs {
    /// Every update makes a new version of the agent, even one that changes nothing: an update
    /// without a change flag is refused before it is sent.
    pub fn nothing_to_update(&self) -> Option<String> {
        let changes = self.name.is_some()
            || self.model.is_some()
            || self.description.is_some()
            || self.system.is_some()
            || self.tools.is_some()
            || self.metadata.patch().is_some();
        super::nothing_to_update(
            changes,
            "--name, --model, --description, --system, --tools, --metadata or --unset-metadata",
        )
    }
}

fn tools(raw: Option<String>) -> Result<Option<Vec<Value>>> {
    // Read as any JSON first, so that a typo is said as one rather than as the wrong shape.
    raw.map(|text| {
        let value: Value = serde_json::from_str(&text).context("--tools is not JSON")?;
        serde_json::from_value(value).context("--tools must be a JSON array of objects")
    })
    .transpose()
}

pub async fn run(cx: Ctx, command: AgentCommand) -> Result<()> {
    let client = &cx.client;
    match command {
        AgentCommand::Create(args) => {
            let mut body = CreateAgent::new(args.name, args.model);
            body.description = args.description;
            body.system = args.system;
            body.tools = tools(args.tools)?;
            body.metadata = args.metadata.into_iter().collect();
            let agent = client.create_agent(&body).await?;
            cx.emit(&agent, || show(&agent));
        }
        AgentCommand::List(args) => {
            let page = args
                .page
                .fetch_resources(client, args.include_archived, |client, params| async move {
                    client.list_agents(&params).await
                })
                .await?;
            cx.emit_list(&page, "No agents.", table);
        }
        AgentCommand::Get { id } => {
            let agent = client.get_agent(&id).await?;
            cx.emit(&agent, || show(&agent));
        }
        AgentCommand::Update(args) => {
            let body = UpdateAgent {
                name: args.name,
                model: args.model.map(Value::String),
                description: args.description,
                system: args.system,
                tools: tools(args.tools)?,
                metadata: args.metadata.patch(),
                ..Default::default()
            };
            let agent = client.update_agent(&args.id, &body).await?;
            cx.emit(&agent, || show(&agent));
        }
        AgentCommand::Archive { id } => {
            let agent = client.archive_agent(&id).await?;
            cx.emit(&agent, || format!("Archived agent {}.\n", agent.id));
        }
    }
    Ok(())
}

fn show(agent: &Agent) -> String {
    output::fields(&[
        ("id", agent.id.clone()),
        ("name", agent.name.clone()),
        ("model", output::or_dash(agent.model_name())),
        ("version", agent.version.to_string()),
        ("description", output::or_dash(agent.description.as_deref())),
        ("system", output::or_dash(agent.system.as_deref())),
        ("tools", agent.tools.len().to_string()),
        ("metadata", output::map(&agent.metadata)),
        ("created", output::time(Some(&agent.created_at))),
        ("updated", output::time(Some(&agent.updated_at))),
        ("archived", output::time(agent.archived_at.as_deref())),
    ])
}

fn table(agents: &[Agent]) -> String {
    let mut t = Table::new(&["ID", "NAME", "MODEL", "VERSION", "ARCHIVED", "CREATED"]);
    for agent in agents {
        t.row(vec![
            agent.id.clone(),
            agent.name.clone(),
            output::or_dash(agent.model_name()),
            agent.version.to_string(),
            if agent.archived_at.is_some() {
                "yes"
            } else {
                "no"
            }
            .to_owned(),
            output::time(Some(&agent.created_at)),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tools_that_are_not_json_are_told_apart_from_the_wrong_shape() {
        let said = |raw: &str| format!("{:#}", super::tools(Some(raw.into())).unwrap_err());
        let typo = said("{bad");
        assert!(
            typo.starts_with("--tools is not JSON: key must be a string"),
            "{typo}"
        );
        let shape = said(r#"{"name": "x"}"#);
        assert!(
            shape.starts_with("--tools must be a JSON array of objects: invalid type: map"),
            "{shape}"
        );
        let tools = super::tools(Some(r#"[{"type": "bash"}]"#.into())).unwrap();
        assert_eq!(tools.map(|t| t.len()), Some(1));
    }
}
