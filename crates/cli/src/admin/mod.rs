//! The admin commands (`tether env|agent|session|work|token …`): they talk to a running server over
//! HTTP through `tether-client`, print tables for people and the server's JSON with `--json`, and turn
//! failures into messages that say what to do.

mod agent;
mod env;
mod events;
pub(crate) mod output;
mod session;
mod token;
mod work;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use tether_client::{Client, ListParams, ListResources, MetadataPatch, Page};

/// Where the server is, who we are, and how to print.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Connection")]
pub struct Connection {
    /// URL of the Tether server.
    #[arg(
        long,
        global = true,
        env = "TETHER_SERVER",
        hide_env_values = true,
        default_value = "http://127.0.0.1:4780"
    )]
    pub server: String,
    /// Admin token [default: the admin-token file in --data-dir].
    #[arg(long, global = true, env = "TETHER_TOKEN", hide_env_values = true,
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub token: Option<String>,
    /// Data directory of the server, whose admin-token file is read when no token is given.
    #[arg(
        long,
        global = true,
        env = "TETHER_DATA_DIR",
        hide_env_values = true,
        default_value = "./tether-data"
    )]
    pub data_dir: PathBuf,
    /// Also trust the certificate authorities in this PEM file (a server with a private CA).
    #[arg(
        long,
        global = true,
        env = "TETHER_CA_CERT",
        hide_env_values = true,
        value_name = "PEM"
    )]
    pub ca_cert: Option<PathBuf>,
    /// Print the server's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// One group of admin commands with the connection options (accepted anywhere after the group name).
#[derive(Args, Debug)]
pub struct Group<C: Subcommand> {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: C,
}

/// The admin command groups, flattened into the top-level command list.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Manage environments and their worker keys.
    Env(Group<env::EnvCommand>),
    /// Manage agents.
    Agent(Group<agent::AgentCommand>),
    /// Manage sessions.
    Session(Group<session::SessionCommand>),
    /// Inspect and stop work items.
    Work(Group<work::WorkCommand>),
    /// Manage admin tokens.
    Token(Group<token::TokenCommand>),
}

/// The refusal of an update given no change flag (`flags`: the flags it takes): one that changes
/// nothing would still move `updated_at`, and an agent's a new version.
pub fn nothing_to_update(changes: bool, flags: &str) -> Option<String> {
    (!changes).then(|| format!("nothing to update: give at least one of {flags}"))
}

/// A usage error clap cannot see (it judges flags one by one): the subcommand's path and the
/// message, for clap to print with that subcommand's usage.
pub fn usage_error(command: &AdminCommand) -> Option<(&'static [&'static str], String)> {
    match command {
        AdminCommand::Agent(Group {
            command: agent::AgentCommand::Update(args),
            ..
        }) => args
            .nothing_to_update()
            .map(|message| (&["agent", "update"][..], message)),
        AdminCommand::Env(Group {
            command: env::EnvCommand::Update(args),
            ..
        }) => args
            .nothing_to_update()
            .map(|message| (&["env", "update"][..], message)),
        AdminCommand::Session(Group {
            command: session::SessionCommand::Update(args),
            ..
        }) => args
            .nothing_to_update()
            .map(|message| (&["session", "update"][..], message)),
        _ => None,
    }
}

/// Runs one admin command.
pub async fn run(command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Env(g) => with_context(g.connection, |cx| env::run(cx, g.command)).await,
        AdminCommand::Agent(g) => with_context(g.connection, |cx| agent::run(cx, g.command)).await,
        AdminCommand::Session(g) => {
            with_context(g.connection, |cx| session::run(cx, g.command)).await
        }
        AdminCommand::Work(g) => with_context(g.connection, |cx| work::run(cx, g.command)).await,
        AdminCommand::Token(g) => with_context(g.connection, |cx| token::run(cx, g.command)).await,
    }
}

async fn with_context<F, Fut>(connection: Connection, body: F) -> Result<()>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let cx = Ctx::new(connection)?;
    let explainer = cx.explainer();
    body(cx).await.map_err(|e| explainer.explain(e))
}

/// Where the token came from, to name it in error messages.
#[derive(Clone, Debug)]
enum TokenSource {
    Given,
    File(PathBuf),
}

/// What a command needs: the client and the output mode.
pub struct Ctx {
    pub client: Client,
    pub json: bool,
    server: String,
    source: TokenSource,
}

impl Ctx {
    fn new(connection: Connection) -> Result<Ctx> {
        let (token, source) = match connection.token {
            // Given blank, it is a mistake (an unset variable in a script), not a wish for the file.
            Some(token) if token.trim().is_empty() => {
                bail!("--token (TETHER_TOKEN) is blank: give the admin token, or leave it out to read the admin-token file")
            }
            Some(token) => (token.trim().to_owned(), TokenSource::Given),
            None => {
                let path = connection.data_dir.join("admin-token");
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    anyhow!(
                        "no admin token: pass --token or set TETHER_TOKEN, or point --data-dir \
                         (TETHER_DATA_DIR) at the server's data directory, which holds the \
                         admin-token file written by the first `tether serve` (cannot read {}: {e})",
                        path.display()
                    )
                })?;
                let token = text.trim().to_owned();
                if token.is_empty() {
                    bail!(
                        "{} is empty; pass --token or set TETHER_TOKEN",
                        path.display()
                    );
                }
                (token, TokenSource::File(path))
            }
        };
        let mut builder = Client::builder(connection.server.clone()).token(token);
        if let Some(path) = &connection.ca_cert {
            builder = builder.ca_cert_file(path);
        }
        let client = builder.build().map_err(|e| {
            // The builder reads the URL first, then the CA file: the URL alone says which was wrong.
            let url_alone = Client::builder(connection.server.clone()).build();
            let flag = match (&connection.ca_cert, url_alone) {
                (Some(_), Ok(_)) => "--ca-cert / TETHER_CA_CERT",
                _ => "--server / TETHER_SERVER",
            };
            anyhow::Error::new(e).context(format!("invalid {flag}"))
        })?;
        Ok(Ctx {
            client,
            json: connection.json,
            server: connection.server,
            source,
        })
    }

    fn explainer(&self) -> Explainer {
        Explainer {
            server: self.server.clone(),
            source: self.source.clone(),
        }
    }

    /// Prints `value` as JSON with `--json`, else what `human` renders.
    pub fn emit<T: Serialize + ?Sized>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            print!("{}", output::json(value));
        } else {
            print!("{}", human());
        }
    }

    /// Prints a list: JSON, or the table, or `empty` when there is nothing; and says when more pages exist.
    pub fn emit_list<T: Serialize>(
        &self,
        page: &Page<T>,
        empty: &str,
        table: impl FnOnce(&[T]) -> String,
    ) {
        if self.json {
            print!("{}", output::json(page));
            return;
        }
        if page.data.is_empty() {
            println!("{empty}");
        } else {
            print!("{}", table(&page.data));
        }
        if let Some(next) = page.next_page.as_deref().filter(|_| page.has_more) {
            eprintln!("(more results: add --all, or --page {next} for the next page)");
        }
    }
}

/// Turns client errors into messages that say what to do.
struct Explainer {
    server: String,
    source: TokenSource,
}

impl Explainer {
    fn explain(&self, error: anyhow::Error) -> anyhow::Error {
        let error = match error.downcast::<tether_client::Error>() {
            Ok(e) => e,
            Err(other) => return other,
        };
        let server = &self.server;
        match &error {
            tether_client::Error::Connect { .. } => anyhow!(
                "cannot reach the Tether server at {server}: is `tether serve` running at {server}? \
                 (point elsewhere with --server or TETHER_SERVER)\n  cause: {}",
                error.root_cause()
            ),
            tether_client::Error::Timeout { .. } => anyhow!(
                "the Tether server at {server} did not answer in time; is it overloaded or \
                 stuck?\n  cause: {}",
                error.root_cause()
            ),
            // Tether answers every error with its envelope and a request id (in the body and in
            // `x-request-id`): without one, another server, or a proxy's own page, answered.
            tether_client::Error::Api(api) if api.request_id.is_none() => anyhow!(
                "{server} did not answer as a Tether server does ({} {}): is --server / \
                 TETHER_SERVER the Tether server's URL, and is the server up behind any proxy?",
                api.status,
                api.message
            ),
            tether_client::Error::Api(api) => match api.status {
                401 => {
                    let from = match &self.source {
                        TokenSource::Given => "came from --token or TETHER_TOKEN".to_owned(),
                        TokenSource::File(path) => format!("was read from {}", path.display()),
                    };
                    anyhow!(
                        "the server at {server} rejected the admin token ({}). The token {from}; \
                         use the admin token printed by the first `tether serve` (saved in \
                         <data-dir>/admin-token) or one made with `tether token create`, via \
                         --token, TETHER_TOKEN or --data-dir",
                        api.message
                    )
                }
                403 => anyhow!(
                    "the token may not do this ({}); admin commands need an admin token \
                     (tth_adm_…), not an environment key",
                    api.message
                ),
                404 => anyhow!("not found: {}", api.message),
                _ => {
                    let mut text = format!(
                        "the server refused the request: {} ({} {}",
                        api.message, api.status, api.kind
                    );
                    if let Some(param) = &api.param {
                        text.push_str(&format!(", parameter {param}"));
                    }
                    if let Some(id) = &api.request_id {
                        text.push_str(&format!(", request id {id}"));
                    }
                    text.push(')');
                    anyhow!(text)
                }
            },
            _ => anyhow::Error::new(error),
        }
    }
}

/// `--limit`, `--page` and `--all` of list commands.
#[derive(Args, Clone, Debug, Default)]
pub struct PageArgs {
    /// Items per page (1–100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub limit: Option<u32>,
    /// Start at this cursor (the `next_page` of an earlier listing).
    #[arg(long, conflicts_with = "all")]
    pub page: Option<String>,
    /// Fetch every page.
    #[arg(long)]
    pub all: bool,
}

impl PageArgs {
    /// One page, or with `--all` every page joined into one.
    pub async fn fetch<T, F, Fut>(&self, mut fetch: F) -> tether_client::Result<Page<T>>
    where
        F: FnMut(ListParams) -> Fut,
        Fut: Future<Output = tether_client::Result<Page<T>>>,
    {
        let params = ListParams {
            limit: self.limit,
            page: self.page.clone(),
            ..Default::default()
        };
        if !self.all {
            return fetch(params).await;
        }
        let data = tether_client::collect_all(|cursor| fetch(params.at(cursor))).await?;
        Ok(Page {
            first_id: None,
            last_id: None,
            has_more: false,
            next_page: None,
            data,
        })
    }

    /// [`fetch`](Self::fetch) for the archivable resources (agents, environments), whose listings
    /// take the same filters.
    pub async fn fetch_resources<T, F, Fut>(
        &self,
        client: &Client,
        include_archived: bool,
        list: F,
    ) -> tether_client::Result<Page<T>>
    where
        F: Fn(Client, ListResources) -> Fut,
        Fut: Future<Output = tether_client::Result<Page<T>>>,
    {
        self.fetch(|list_params| {
            let params = ListResources {
                list: list_params,
                include_archived,
                ..Default::default()
            };
            list(client.clone(), params)
        })
        .await
    }
}

/// Parses `KEY=VALUE`.
pub fn key_value(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {raw:?}")),
    }
}

/// A `KEY=VALUE` flag whose key names an environment variable a shell can read: letters, digits
/// and `_`, not starting with a digit. The API stores any string as a key; a name a program's
/// shell cannot expand is almost always a typo, so the CLI refuses it before sending anything.
pub fn env_var(raw: &str) -> Result<(String, String), String> {
    let (name, value) = key_value(raw)?;
    let mut chars = name.chars();
    let starts_well = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !starts_well || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{name:?} is not an environment variable name: letters, digits and `_`, not starting \
             with a digit"
        ));
    }
    Ok((name, value))
}

/// `--metadata k=v` (set) and `--unset-metadata k` (delete) of the update commands.
#[derive(Args, Debug)]
pub struct MetadataPatchArgs {
    /// Set a metadata entry KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Remove a metadata key (repeatable).
    #[arg(long = "unset-metadata", value_name = "KEY")]
    unset_metadata: Vec<String>,
}

impl MetadataPatchArgs {
    /// The merge patch these flags ask for; `None` when both are empty.
    pub fn patch(&self) -> Option<MetadataPatch> {
        if self.metadata.is_empty() && self.unset_metadata.is_empty() {
            return None;
        }
        let mut patch: MetadataPatch = BTreeMap::new();
        for key in &self.unset_metadata {
            patch.insert(key.clone(), None);
        }
        for (k, v) in &self.metadata {
            patch.insert(k.clone(), Some(v.clone()));
        }
        Some(patch)
    }
}
