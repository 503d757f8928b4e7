//! Credentials (§11.1): admin tokens, environment keys, and resolving a presented secret.

use std::sync::Arc;

use tether_core::ids::{self, IdKind};
use tether_core::resources::{Credential, CredentialKind};
use tether_core::work::{Stopper, WorkError};
use tether_store::{ChangeSet, Page, PageRequest, Write};

use super::{App, Error, Missing, Result};
use crate::credentials::{self, ADMIN_PREFIX, ENVIRONMENT_PREFIX, SESSION_PREFIX};
use crate::dialect::Dialect;

/// The longest name an admin token or environment key may carry.
pub const MAX_CREDENTIAL_NAME_CHARS: usize = 256;

/// A new admin token or environment key: its optional name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewCredential {
    pub name: Option<String>,
}

impl NewCredential {
    /// The name, when given, is 1 to [`MAX_CREDENTIAL_NAME_CHARS`] characters, not all blank.
    fn checked_name(self) -> Result<Option<String>> {
        self.name
            .map(|name| super::bounded_name(name, "name", MAX_CREDENTIAL_NAME_CHARS))
            .transpose()
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Admin {
        credential_id: String,
    },
    EnvironmentKey {
        credential_id: String,
        environment_id: String,
    },
    /// The session token of one live work item.
    SessionToken {
        work_id: String,
        environment_id: String,
        session_id: String,
        /// The SHA-256 of the token: the item carries only its latest delivery's (D-27), so a token
        /// is asked after again by this, not by the item's id.
        token_hash: String,
    },
}

impl Principal {
    /// What kind of credential authenticated the request (for logs).
    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Admin { .. } => "admin",
            Principal::EnvironmentKey { .. } => "environment_key",
            Principal::SessionToken { .. } => "session_token",
        }
    }

    /// The caller as a work item's history names who asked for a change.
    pub fn asker(&self) -> String {
        match self {
            Principal::Admin { credential_id } => format!("admin token {credential_id}"),
            Principal::EnvironmentKey { credential_id, .. } => {
                format!("environment key {credential_id}")
            }
            Principal::SessionToken { .. } => "the item's session token".to_owned(),
        }
    }

    /// Whether a stop that does not say (`hold_next_item`) holds the session's next item: an admin
    /// token's on `/v1`. There a worker holds an environment key and its items' session tokens (the
    /// Anthropic SDK's worker strips the API key), so an admin token is an operator's. On
    /// `/api/v1/cloud` a worker holds only an org token (Qoder documents only PATs), the one its
    /// operator holds too, and ends its items with it once their program ended (SPEC §8, step 5):
    /// holding then would delay every next turn of its sessions by up to a lease.
    pub fn holds_by_default(&self, dialect: Dialect) -> bool {
        matches!(
            (self, dialect),
            (Principal::Admin { .. }, Dialect::Anthropic)
        )
    }

    /// Who this caller is to `item`'s lease, for a stop that holds the session's next item or not
    /// (`work::stop_by`). The item's session token is its holder's, whatever the stop asks.
    pub fn stopper_of(&self, item: &tether_core::WorkItem, hold_next_item: bool) -> Stopper {
        let holders_token = match self {
            Principal::SessionToken { token_hash, .. } => {
                tether_core::work::held_by(item, token_hash).is_ok()
            }
            Principal::Admin { .. } | Principal::EnvironmentKey { .. } => false,
        };
        if hold_next_item && !holders_token {
            Stopper::Operator
        } else {
            Stopper::Holder
        }
    }

    /// The one environment this caller acts for: a key's, or its session token's item's; `None`
    /// for an admin token, which acts for every one.
    pub fn environment_id(&self) -> Option<&str> {
        match self {
            Principal::EnvironmentKey { environment_id, .. }
            | Principal::SessionToken { environment_id, .. } => Some(environment_id),
            Principal::Admin { .. } => None,
        }
    }

    /// Whether this caller may still act on `item`, as it is once any lapsed lease is settled: a
    /// session token only while it holds the item (`work::held_by`), any other credential always.
    pub fn may_act_on(&self, item: &tether_core::WorkItem) -> Result<(), WorkError> {
        match self {
            Principal::SessionToken { token_hash, .. } => {
                tether_core::work::held_by(item, token_hash)
            }
            Principal::Admin { .. } | Principal::EnvironmentKey { .. } => Ok(()),
        }
    }

    /// The stored credential behind this caller; `None` for a session token, which is not one.
    pub fn credential_id(&self) -> Option<&str> {
        match self {
            Principal::Admin { credential_id }
            | Principal::EnvironmentKey { credential_id, .. } => Some(credential_id),
            Principal::SessionToken { .. } => None,
        }
    }
}

/// How [`App::credential_read`] looks a credential up.
#[derive(Clone, Copy)]
enum CredentialKey {
    Id,
    SecretHash,
}

/// How often an answer that outlives its request (an event stream) asks whether its caller still
/// holds: the revocation bound the credential cache gives every request.
pub const CALLER_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A new admin token's secret: for a start that saves it where its operator finds it before the
/// store has it (`tether serve`), so that no moment leaves the store holding a token nobody has.
pub fn new_admin_secret() -> String {
    credentials::mint(ADMIN_PREFIX)
}

/// Whether `given` may be adopted as the first admin token (`TETHER_ADMIN_TOKEN`): the prefix, at least
/// 16 more characters, and only visible ASCII. A token with a space, a control character (the trailing
/// newline of a secret read from a file) or a non-ASCII one could be stored but never sent back intact
/// in an `Authorization` header, and once stored no other first token is ever minted: the operator
/// would be locked out for good.
pub fn adoptable(given: &str) -> std::result::Result<(), String> {
    if !given.starts_with(ADMIN_PREFIX) || given.len() < ADMIN_PREFIX.len() + 16 {
        return Err(format!(
            "TETHER_ADMIN_TOKEN must start with {ADMIN_PREFIX} and carry at least 16 more characters"
        ));
    }
    sendable("TETHER_ADMIN_TOKEN", given)
}

/// Whether `given` may serve as the metrics token (`--metrics-token`): one a scraper can send back,
/// and too long to guess.
pub fn usable_as_metrics_token(given: &str) -> std::result::Result<(), String> {
    if given.len() < 16 {
        return Err("--metrics-token must be at least 16 characters long".into());
    }
    sendable("--metrics-token", given)
}

/// A token a client can send back in an `Authorization` header as it was given: visible ASCII only.
fn sendable(what: &str, given: &str) -> std::result::Result<(), String> {
    if let Some(c) = given.chars().find(|c| !c.is_ascii_graphic()) {
        // A line break or a blank at the end is most likely what a file or a secret store added.
        let hint = if given.trim_end() != given
            && given.trim_end().chars().all(|c| c.is_ascii_graphic())
        {
            " (a trailing newline or blank from a file or a secret?)"
        } else {
            ""
        };
        return Err(format!(
            "{what} may hold only visible ASCII characters, not {c:?}{hint}"
        ));
    }
    Ok(())
}

impl App {
    /// Resolves a presented secret; 401 for anything unknown, revoked or dead. A 503 because the
    /// database is away carries the promise of lease amnesty ([`App::with_amnesty_promise`]): a worker's
    /// heartbeat fails here first, when the database is down.
    pub async fn authenticate(&self, secret: &str) -> Result<Principal> {
        self.resolve(secret)
            .await
            .map_err(|e| self.with_amnesty_promise(e))
    }

    async fn resolve(&self, secret: &str) -> Result<Principal> {
        let invalid = || Error::Unauthenticated;
        let hash = credentials::hash(secret);
        if secret.starts_with(SESSION_PREFIX) {
            let item = match self.token_item(&hash).await? {
                TokenItem::Live(item) => *item,
                TokenItem::Lapsed => return Err(Error::LeaseLapsed),
                TokenItem::Dead => return Err(invalid()),
            };
            return Ok(Principal::SessionToken {
                work_id: item.id,
                environment_id: item.environment_id,
                session_id: item.data.id,
                token_hash: hash,
            });
        }
        let expected_kind = if secret.starts_with(ADMIN_PREFIX) {
            CredentialKind::Admin
        } else if secret.starts_with(ENVIRONMENT_PREFIX) {
            CredentialKind::Environment
        } else {
            return Err(invalid());
        };
        let credential = self
            .credential_read(&hash, CredentialKey::SecretHash)
            .await?
            .ok_or_else(invalid)?;
        if credential.revoked_at.is_some() || credential.kind != expected_kind {
            return Err(invalid());
        }
        Ok(match credential.kind {
            CredentialKind::Admin => Principal::Admin {
                credential_id: credential.id.clone(),
            },
            CredentialKind::Environment => Principal::EnvironmentKey {
                credential_id: credential.id.clone(),
                environment_id: credential.environment_id.clone().unwrap_or_default(),
            },
        })
    }

    /// The live item whose current session token hashes to `token_hash`, when the credential the
    /// token was minted under is not revoked either; `None` for a token that is dead. A session token
    /// lives no longer than that credential: revoking a worker's key cuts it off from its items at
    /// once, and their leases then run out as usual. The item carries only its latest delivery's
    /// token (D-27), so an earlier one finds nothing.
    ///
    /// A token also dies with its item's lease (`work::lease_lapsed`), before any pass has settled
    /// it: otherwise a worker that lost its lease could still stop the item after it went back to
    /// the queue, in the request that settles the lease (the `anthropic` SDK's worker force-stops
    /// its item on any refused heartbeat but a 412), and end the session's retry. A request let in
    /// just before the deadline and decided after it is refused by the operation itself
    /// (`work::held_by`). After an outage, the lease is judged after the amnesty the reconnection
    /// calls for, as any expiry is; and a lapsed lease that another server's promise holds
    /// (`App::held_lease`) is live to its token as it is to every operation.
    async fn item_of_token(&self, token_hash: &str) -> Result<Option<tether_core::WorkItem>> {
        Ok(match self.token_item(token_hash).await? {
            TokenItem::Live(item) => Some(*item),
            TokenItem::Lapsed | TokenItem::Dead => None,
        })
    }

    /// [`Self::item_of_token`], saying why a token is dead when it is its lease that ran out.
    async fn token_item(&self, token_hash: &str) -> Result<TokenItem> {
        // What an earlier run of this server may have promised moves deadlines: before the read.
        self.keep_earlier_runs_promise().await?;
        let Some(mut item) = self.store.work_by_token_hash(token_hash).await? else {
            return Ok(TokenItem::Dead);
        };
        // The amnesty an outage calls for comes before any read of the marks (`App::lease_lapsed`).
        if tether_core::work::lease_lapsed(&item.value, self.now())
            && self.amnesty_after_outage().await?
        {
            // Deadlines may have moved.
            let Some(again) = self.store.work_by_token_hash(token_hash).await? else {
                return Ok(TokenItem::Dead);
            };
            item = again;
        }
        let item = item.value;
        let issuer_alive = match &item.session_token_issuer {
            Some(issuer) => self.credential_alive(issuer).await?,
            None => true,
        };
        Ok(if !item.state.is_live() || !issuer_alive {
            TokenItem::Dead
        } else if self.lease_lapsed(&item, self.now()).await? {
            TokenItem::Lapsed
        } else {
            TokenItem::Live(Box::new(item))
        })
    }

    /// Whether the stored credential `id` exists and is not revoked (from the one-second cache).
    pub(crate) async fn credential_alive(&self, id: &str) -> Result<bool> {
        Ok(self
            .credential_read(id, CredentialKey::Id)
            .await?
            .is_some_and(|credential| credential.revoked_at.is_none()))
    }

    /// Whether an authenticated caller still holds: its credential is not revoked, its session token
    /// not dead. Asked again by answers that outlive their request (event streams). A key or admin
    /// token is looked up in the same one-second cache as [`App::authenticate`], so a revocation
    /// reaches them within the same bound; a session token is read again, as a request's would be.
    pub async fn still_holds(&self, principal: &Principal) -> Result<bool> {
        match principal {
            Principal::Admin { credential_id }
            | Principal::EnvironmentKey { credential_id, .. } => {
                self.credential_alive(credential_id).await
            }
            Principal::SessionToken {
                work_id,
                token_hash,
                ..
            } => Ok(self
                .item_of_token(token_hash)
                .await?
                .is_some_and(|item| item.id == *work_id)),
        }
    }

    /// Resolves once `principal` no longer holds ([`App::still_holds`], asked every
    /// [`CALLER_RECHECK`]). A store that does not answer ends nothing: the caller keeps its stream
    /// through an outage, as it keeps its lease.
    pub async fn lapsed(self, principal: Principal) {
        loop {
            tokio::time::sleep(CALLER_RECHECK).await;
            if let Ok(false) = self.still_holds(&principal).await {
                return;
            }
        }
    }

    /// A credential by id or by secret hash, from the one-second cache (`crate::cache`) when this
    /// process read it lately: a revocation through another process takes effect within that bound,
    /// one through this process at once (the commit clears the cache). Unknown secrets are not cached.
    async fn credential_read(
        &self,
        key: &str,
        kind: CredentialKey,
    ) -> Result<Option<Arc<Credential>>> {
        // One cache per key, looked up by `&str` and holding shared records: a request authenticated
        // from the cache allocates nothing here.
        let cache = match kind {
            CredentialKey::Id => &self.credentials_by_id,
            CredentialKey::SecretHash => &self.credentials_by_hash,
        };
        if let Some(credential) = cache.get(key) {
            return Ok(Some(credential));
        }
        let read_at = std::time::Instant::now();
        let credential = match kind {
            CredentialKey::Id => self.store.get_credential(key).await?,
            CredentialKey::SecretHash => self.store.credential_by_hash(key).await?,
        }
        .map(Arc::new);
        if let Some(credential) = &credential {
            cache.put(key.to_owned(), Arc::clone(credential), read_at);
        }
        Ok(credential)
    }

    /// Mints and stores a credential; returns it with its secret (shown once).
    async fn mint_credential(
        &self,
        kind: CredentialKind,
        environment_id: Option<String>,
        name: Option<String>,
        secret: Option<String>,
    ) -> Result<(Credential, String)> {
        let id_kind = match kind {
            CredentialKind::Admin => IdKind::Token,
            CredentialKind::Environment => IdKind::EnvironmentKey,
        };
        self.mint_credential_as(ids::new_id(id_kind), kind, environment_id, name, secret)
            .await
    }

    async fn mint_credential_as(
        &self,
        id: String,
        kind: CredentialKind,
        environment_id: Option<String>,
        name: Option<String>,
        secret: Option<String>,
    ) -> Result<(Credential, String)> {
        let prefix = match kind {
            CredentialKind::Admin => ADMIN_PREFIX,
            CredentialKind::Environment => ENVIRONMENT_PREFIX,
        };
        let secret = secret.unwrap_or_else(|| credentials::mint(prefix));
        let credential = Credential {
            id,
            kind,
            environment_id,
            name,
            secret_hash: credentials::hash(&secret),
            hint: credentials::hint(&secret),
            created_at: self.now(),
            revoked_at: None,
        };
        self.commit(ChangeSet::one(Write::InsertCredential(credential.clone())))
            .await?;
        Ok((credential, secret))
    }

    /// Whether `secret` is an admin token of the store that is not revoked: what a server given
    /// `TETHER_ADMIN_TOKEN` checks when it did not adopt it (the store had a live admin token), so
    /// that a token made anew on each server of a cluster is not silently of no use.
    pub async fn is_live_admin_token(&self, secret: &str) -> Result<bool> {
        match self.authenticate(secret).await {
            Ok(principal) => Ok(matches!(principal, Principal::Admin { .. })),
            Err(Error::Unauthenticated) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the store has no live admin token: a start would make one ([`Self::bootstrap_admin_token`]).
    pub async fn lacks_admin_token(&self) -> Result<bool> {
        Ok(self
            .store
            .count_credentials(CredentialKind::Admin, false)
            .await?
            == 0)
    }

    /// On a store without a live admin token, mints one (or adopts `given`) and returns its secret;
    /// `None` when there is one, or another server starting at the same time made it.
    ///
    /// Servers starting together on one database all give the token they would make the same id,
    /// the n-th admin token ever made, so the store takes only one of their inserts: exactly one of
    /// them mints, and only that one writes the secret to its data directory.
    pub async fn bootstrap_admin_token(&self, given: Option<String>) -> Result<Option<String>> {
        // Counted before the live ones: a server that made its token between the two reads is
        // then seen as live, and one that makes it later took the same id.
        let made = self
            .store
            .count_credentials(CredentialKind::Admin, true)
            .await?;
        if self
            .store
            .count_credentials(CredentialKind::Admin, false)
            .await?
            > 0
        {
            return Ok(None);
        }
        if let Some(given) = &given {
            adoptable(given).map_err(Error::malformed)?;
            let known = self
                .store
                .credential_by_hash(&credentials::hash(given))
                .await?;
            if known.is_some_and(|c| c.revoked_at.is_some()) {
                // Starting anyway would leave no way in: the one token it knows is refused.
                return Err(Error::invalid_state(
                    "TETHER_ADMIN_TOKEN is an admin token that was revoked, and no admin token is \
                     live: set it to a new token to adopt that one, or unset it to have one minted",
                ));
            }
        }
        let id = ids::format_id(IdKind::Token, uuid::Uuid::from_u128(u128::from(made)));
        let minted = self
            .mint_credential_as(
                id,
                CredentialKind::Admin,
                None,
                Some("bootstrap".into()),
                given,
            )
            .await;
        match minted {
            Ok((_, secret)) => Ok(Some(secret)),
            // Lost the race: the token is the one another server made (or adopted).
            Err(_)
                if self
                    .store
                    .count_credentials(CredentialKind::Admin, false)
                    .await?
                    > 0 =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn create_admin_token(&self, command: NewCredential) -> Result<(Credential, String)> {
        let name = command.checked_name()?;
        self.mint_credential(CredentialKind::Admin, None, name, None)
            .await
    }

    pub async fn create_environment_key(
        &self,
        environment_id: &str,
        command: NewCredential,
    ) -> Result<(Credential, String)> {
        let env = self.environment(environment_id).await?;
        let name = command.checked_name()?;
        self.mint_credential(CredentialKind::Environment, Some(env.id), name, None)
            .await
    }

    pub async fn list_credentials(
        &self,
        kind: CredentialKind,
        environment_id: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<Credential>> {
        if let Some(env) = environment_id {
            self.environment(env).await?;
        }
        super::in_list_order(
            page,
            |c: &Credential| &c.id,
            |page| async move {
                Ok(self
                    .store
                    .list_credentials(kind, environment_id, &page)
                    .await?)
            },
        )
        .await
    }

    /// Revokes a credential of `kind` (and, for keys, of that environment). Revoking twice is a no-op.
    pub async fn revoke_credential(
        &self,
        kind: CredentialKind,
        environment_id: Option<&str>,
        id: &str,
    ) -> Result<Credential> {
        let not_found = || Error::not_found(Missing::Credential(kind), id);
        let id_kind = match kind {
            CredentialKind::Admin => IdKind::Token,
            CredentialKind::Environment => IdKind::EnvironmentKey,
        };
        // Answered without asking the store, which could not even be asked about some strings
        // (PostgreSQL text holds no NUL).
        if !ids::is_well_formed(id_kind, id) {
            return Err(not_found());
        }
        let credential = self.store.get_credential(id).await?.ok_or_else(not_found)?;
        if credential.kind != kind || credential.environment_id.as_deref() != environment_id {
            return Err(not_found());
        }
        if credential.revoked_at.is_some() {
            return Ok(credential);
        }
        let at = self.now();
        match self
            .commit(ChangeSet::one(Write::RevokeCredential {
                id: id.to_owned(),
                at,
            }))
            .await
        {
            Ok(()) | Err(tether_store::StoreError::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
        self.store.get_credential(id).await?.ok_or_else(not_found)
    }
}

/// What a session token's item says of the token.
enum TokenItem {
    Live(Box<tether_core::WorkItem>),
    /// The item's lease ran out (the item goes back to the queue, or stops if it was stopping).
    Lapsed,
    /// Unknown, re-delivered since, stopped, or minted under a revoked key.
    Dead,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_token_is_long_and_sendable() {
        assert!(usable_as_metrics_token("0123456789abcdef").is_ok());
        for bad in [
            "0123456789abcde",
            "0123456789abcdef\n",
            "0123456789 abcdef",
            "0123456789abcdé",
        ] {
            assert!(usable_as_metrics_token(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn only_a_token_that_can_be_sent_back_intact_is_adopted() {
        let good = "tth_adm_0123456789abcdef";
        assert_eq!(adoptable(good), Ok(()));
        assert_eq!(adoptable(&format!("{good}-_.~+/=")), Ok(()));
        for bad in [
            "tth_adm_short",
            "0123456789abcdef0123456789",
            "tth_adm_0123456789abcdef\n",
            "tth_adm_0123456789abcdef ",
            "tth_adm_0123456789abcdef\t",
            "tth_adm_0123456789abcdef\u{7f}",
            "tth_adm_0123456789abcdéé",
        ] {
            assert!(adoptable(bad).is_err(), "{bad:?} was adopted");
        }
        // The hint about a file's trailing newline only where there is one.
        let hinted = |given: &str| adoptable(given).unwrap_err().contains("trailing newline");
        assert!(hinted("tth_adm_0123456789abcdef\n"));
        assert!(hinted("tth_adm_0123456789abcdef \r\n"));
        assert!(!hinted("tth_adm_0123456789 abcdef"));
        assert!(!hinted("tth_adm_0123456789abcdéé"));
    }
}
