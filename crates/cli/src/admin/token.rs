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
        /// Revoke it even when it is the last admin token not revoked: nothing can then use the
        /// API with an admin token until the server is restarted.
        #[arg(long)]
        even_if_last: bool,
    },
}

/// Said when no admin token is left: the API then takes none until the server mints one.
const LAST_TOKEN_REVOKED: &str = "warning: that was the last admin token not revoked. Nothing can \
     use the API with an admin token until the server is restarted: a start that finds no admin \
     token mints one (or takes TETHER_ADMIN_TOKEN, unless that is a revoked one) and saves it in its data directory.";

/// Said instead of revoking the last admin token, unless `--even-if-last`.
fn last_token_kept(id: &str) -> String {
    format!(
        "{id} is the last admin token not revoked: without it nothing can use the API with an \
         admin token until the server is restarted. Mint another first (`tether token create`), \
         or give --even-if-last"
    )
}

/// How many admin tokens other than `id` are not revoked, or `None` when they cannot be listed
/// (the check is a courtesy: a failed look never stops the revoke).
async fn others_not_revoked(client: &tether_client::Client, id: &str) -> Option<usize> {
    let first = ListParams {
        limit: Some(100),
        ..Default::default()
    };
    let tokens = tether_client::collect_all(|cursor| {
        let page = first.at(cursor);
        async move { client.list_tokens(&page).await }
    })
    .await
    .ok()?;
    Some(
        tokens
            .iter()
            .filter(|t| t.id != id && t.revoked_at.is_none())
            .count(),
    )
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
        TokenCommand::Revoke { id, even_if_last } => {
            // Counted before the revoke: once it is gone, this may have been the CLI's own token,
            // and nothing can be listed any more.
            let others_left = others_not_revoked(client, &id).await;
            if others_left == Some(0) && !even_if_last {
                anyhow::bail!(last_token_kept(&id));
            }
            let token = client.revoke_token(&id).await?;
            cx.emit(&token, || format!("Revoked token {}.\n", token.id));
            if others_left == Some(0) {
                eprintln!("{LAST_TOKEN_REVOKED}");
            }
        }
    }
    Ok(())
}
