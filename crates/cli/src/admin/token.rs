//! `tether token …`: admin tokens.

use anyhow::Result;
use clap::Subcommand;
use tether_client::ListParams;

use super::env::credentials_table;
use super::{Ctx, PageArgs};

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Mint an admin token (the secret is shown once).
    Create {
        /// A label for the token.
        #[arg(long)]
        name: Option<String>,
    },
    /// List admin tokens (never their secrets).
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Revoke an admin token.
    Revoke {
        /// The token's id (tok_…).
        id: String,
    },
}

pub async fn run(cx: Ctx, command: TokenCommand) -> Result<()> {
    let client = &cx.client;
    match command {
        TokenCommand::Create { name } => {
            let token = client.create_token(name.as_deref()).await?;
            cx.emit(&token, || {
                format!(
                    "Created admin token {}.\nSecret (shown once; use it as --token or \
                     TETHER_TOKEN):\n\n    {}\n",
                    token.id,
                    token.token.as_deref().unwrap_or("-")
                )
            });
        }
        TokenCommand::List { page } => {
            let page = page
                .fetch(|list: ListParams| {
                    let client = client.clone();
                    async move { client.list_tokens(&list).await }
                })
                .await?;
            cx.emit_list(&page, "No tokens.", credentials_table);
        }
        TokenCommand::Revoke { id } => {
            let token = client.revoke_token(&id).await?;
            cx.emit(&token, || format!("Revoked token {}.\n", token.id));
        }
    }
    Ok(())
}
