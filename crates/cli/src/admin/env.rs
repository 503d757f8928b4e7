//! `tether env …` and `tether env key …`.

use anyhow::Result;
use clap::{Args, Subcommand};
use tether_client::{CreateEnvironment, Credential, Environment, ListParams, UpdateEnvironment};

use super::output::{self, Table};
use super::{key_value, Ctx, MetadataPatchArgs, PageArgs};

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// Create an environment (self-hosted unless --cloud).
    Create(CreateArgs),
    /// List environments.
    List(ListArgs),
    /// Show one environment.
    Get {
        /// The environment (env_…).
        id: String,
    },
    /// Change an environment's name, description, setup script or metadata.
    Update(UpdateArgs),
    /// Archive an environment: no new sessions, running work continues.
    Archive {
        /// The environment (env_…).
        id: String,
    },
    /// Delete an environment that no session references any more.
    Delete {
        /// The environment (env_…).
        id: String,
    },
    /// Manage the worker keys of an environment.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Display name.
    #[arg(long)]
    name: String,
    /// Served by your own workers through its work queue (the default).
    #[arg(long, conflicts_with = "cloud")]
    self_hosted: bool,
    /// A managed environment (stored only; Tether runs nothing in it).
    #[arg(long)]
    cloud: bool,
    /// Free-text description.
    #[arg(long)]
    description: Option<String>,
    /// Setup script shown to workers (self-hosted) or run in the sandbox (cloud).
    #[arg(long)]
    setup_script: Option<String>,
    /// Metadata entry KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    metadata: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Include archived environments.
    #[arg(long)]
    include_archived: bool,
    #[command(flatten)]
    page: PageArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The environment (env_…).
    id: String,
    /// New name.
    #[arg(long)]
    name: Option<String>,
    /// New description.
    #[arg(long)]
    description: Option<String>,
    /// New setup script ('' removes it). The rest of the config is kept as it is read just
    /// before: the server replaces a config whole.
    #[arg(long)]
    setup_script: Option<String>,
    #[command(flatten)]
    metadata: MetadataPatchArgs,
}

impl UpdateArgs {
    /// See [`super::nothing_to_update`].
    pub fn nothing_to_update(&self) -> Option<String> {
        let changes = self.name.is_some()
            || self.description.is_some()
            || self.setup_script.is_some()
            || self.metadata.patch().is_some();
        super::nothing_to_update(
            changes,
            "--name, --description, --setup-script, --metadata or --unset-metadata",
        )
    }
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Mint a worker key for an environment (the secret is shown once).
    Create {
        /// The environment.
        env: String,
        /// A label for the key.
        #[arg(long)]
        name: Option<String>,
    },
    /// List an environment's keys (never their secrets).
    List {
        /// The environment.
        env: String,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Revoke a key.
    Revoke {
        /// The environment.
        env: String,
        /// The key's id (envkey_…).
        key: String,
    },
}

pub async fn run(cx: Ctx, command: EnvCommand) -> Result<()> {
    let client = &cx.client;
    match command {
        EnvCommand::Create(args) => {
            let mut body = if args.cloud {
                CreateEnvironment::cloud(args.name)
            } else {
                CreateEnvironment::self_hosted(args.name)
            };
            if let Some(script) = args.setup_script {
                body.config["setup_script"] = script.into();
            }
            body.description = args.description;
            body.metadata = args.metadata.into_iter().collect();
            let env = client.create_environment(&body).await?;
            cx.emit(&env, || show(&env));
        }
        EnvCommand::List(args) => {
            let page = args
                .page
                .fetch_resources(client, args.include_archived, |client, params| async move {
                    client.list_environments(&params).await
                })
                .await?;
            cx.emit_list(&page, "No environments.", table);
        }
        EnvCommand::Get { id } => {
            let env = client.get_environment(&id).await?;
            cx.emit(&env, || show(&env));
        }
        EnvCommand::Update(args) => {
            let config = match &args.setup_script {
                None => None,
                Some(script) => {
                    let mut config = client.get_environment(&args.id).await?.config;
                    let Some(fields) = config.as_object_mut() else {
                        anyhow::bail!("environment {} has no config object", args.id);
                    };
                    if script.is_empty() {
                        fields.remove("setup_script");
                    } else {
                        fields.insert("setup_script".into(), script.clone().into());
                    }
                    Some(config)
                }
            };
            let body = UpdateEnvironment {
                name: args.name,
                description: args.description,
                config,
                metadata: args.metadata.patch(),
            };
            let env = client.update_environment(&args.id, &body).await?;
            cx.emit(&env, || show(&env));
        }
        EnvCommand::Archive { id } => {
            let env = client.archive_environment(&id).await?;
            cx.emit(&env, || format!("Archived environment {}.\n", env.id));
        }
        EnvCommand::Delete { id } => {
            let deleted = client.delete_environment(&id).await?;
            cx.emit(&deleted, || {
                format!("Deleted environment {}.\n", deleted.id)
            });
        }
        EnvCommand::Key(KeyCommand::Create { env, name }) => {
            let key = client.create_environment_key(&env, name.as_deref()).await?;
            cx.emit(&key, || {
                format!(
                    "Created worker key {} for {env}.\nSecret (shown once; give it to the worker \
                     of this environment):\n\n    {}\n",
                    key.id,
                    key.token.as_deref().unwrap_or("-")
                )
            });
        }
        EnvCommand::Key(KeyCommand::List { env, page }) => {
            let page = page
                .fetch(|list: ListParams| {
                    let client = client.clone();
                    let env = env.clone();
                    async move { client.list_environment_keys(&env, &list).await }
                })
                .await?;
            cx.emit_list(&page, "No keys.", credentials_table);
        }
        EnvCommand::Key(KeyCommand::Revoke { env, key }) => {
            let key = client.revoke_environment_key(&env, &key).await?;
            cx.emit(&key, || format!("Revoked key {}.\n", key.id));
        }
    }
    Ok(())
}

fn show(env: &Environment) -> String {
    output::fields(&[
        ("id", env.id.clone()),
        ("name", env.name.clone()),
        ("kind", output::or_dash(env.kind())),
        ("status", output::or_dash(env.status.as_deref())),
        ("description", output::or_dash(env.description.as_deref())),
        ("setup script", setup_script(env)),
        ("metadata", output::map(&env.metadata)),
        ("created", output::time(Some(&env.created_at))),
        ("updated", output::time(Some(&env.updated_at))),
        ("archived", output::time(env.archived_at.as_deref())),
    ])
}

/// The setup script's first line, and how many more there are (`--json` shows it whole).
fn setup_script(env: &Environment) -> String {
    let script = env.config.get("setup_script").and_then(|s| s.as_str());
    let Some(script) = script.filter(|s| !s.is_empty()) else {
        return "-".to_owned();
    };
    let mut lines = script.lines();
    let first = lines.next().unwrap_or_default().to_owned();
    match lines.count() {
        0 => first,
        more => format!("{first} … ({more} more lines; --json shows it whole)"),
    }
}

fn table(envs: &[Environment]) -> String {
    let mut t = Table::new(&["ID", "NAME", "KIND", "STATUS", "CREATED"]);
    for env in envs {
        t.row(vec![
            env.id.clone(),
            env.name.clone(),
            output::or_dash(env.kind()),
            output::or_dash(env.status.as_deref()),
            output::time(Some(&env.created_at)),
        ]);
    }
    t.render()
}

/// Keys and tokens share one shape.
pub fn credentials_table(credentials: &[Credential]) -> String {
    let mut t = Table::new(&["ID", "NAME", "HINT", "CREATED", "REVOKED"]);
    for c in credentials {
        t.row(vec![
            c.id.clone(),
            output::or_dash(c.name.as_deref()),
            output::or_dash(c.hint.as_deref()),
            output::time(Some(&c.created_at)),
            output::time(c.revoked_at.as_deref()),
        ]);
    }
    t.render()
}
