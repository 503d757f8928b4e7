//! `tether serve`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use tether_core::{Clock, LeasePolicy, SystemClock};
use tether_server::{App, ConnectionLimits, ServeOptions, ServiceConfig, TlsFiles, TlsSettings};
use tether_store::Store;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Also read from the environment:
  TETHER_ADMIN_TOKEN  on a start that finds no live admin token (the first), use this one instead of
                      minting one (tth_adm_ and at least 16 more visible ASCII characters)
  TETHER_LOG          what is logged: a level (trace, debug, info, warn, error, off; default info)
                      or tracing directives (info,tether=debug)

On the first start the admin token is saved to admin-token in --data-dir (mode 0600).")]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:4780",
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub listen: String,
    /// Directory of the embedded store and the bootstrap admin token.
    #[arg(long, env = "TETHER_DATA_DIR", default_value = "./tether-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL URL; without it the embedded SQLite store in --data-dir is used.
    // Its value may hold the database's password: `--help` does not show it.
    #[arg(long = "database", env = "TETHER_DATABASE_URL", hide_env_values = true,
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub database_url: Option<String>,
    /// Base URL workers are told to call back (defaults to http://<listen>).
    #[arg(long, env = "TETHER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Dispatcher tick in milliseconds.
    #[arg(long, env = "TETHER_TICK_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub tick_ms: u64,
    /// How often queue statistics are sampled for the dashboard's chart, in milliseconds.
    #[arg(long, env = "TETHER_SAMPLE_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub sample_ms: u64,
    /// Lease TTL in seconds until a heartbeat asks for another (within --lease-ttl-min and
    /// --lease-ttl-max).
    #[arg(long, env = "TETHER_LEASE_TTL", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=MAX_LEASE_TTL))]
    pub lease_ttl: u32,
    /// Smallest lease TTL a heartbeat may ask for.
    #[arg(long, env = "TETHER_LEASE_TTL_MIN", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=MAX_LEASE_TTL))]
    pub lease_ttl_min: u32,
    /// Largest lease TTL a heartbeat may ask for (at most 600).
    #[arg(long, env = "TETHER_LEASE_TTL_MAX", default_value_t = MAX_LEASE_TTL as u32, value_parser = clap::value_parser!(u32).range(1..=MAX_LEASE_TTL))]
    pub lease_ttl_max: u32,
    /// Lease expiries that requeue an item before it is stopped as poison.
    #[arg(long, env = "TETHER_MAX_REQUEUES", default_value_t = 3)]
    pub max_requeues: u32,
    /// Lease amnesty window at start, in milliseconds; on PostgreSQL, also how long after its last
    /// mark in the database a server cut off from it promises its workers that their leases
    /// outlast the outage (at most 600000: workers take no longer promise of amnesty).
    #[arg(long, env = "TETHER_AMNESTY_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(i64).range(0..=MAX_AMNESTY_MS))]
    pub amnesty_ms: i64,
    /// Largest request body in bytes (at least 1024: below that, common requests would not fit).
    #[arg(long, env = "TETHER_BODY_LIMIT", default_value_t = 32 * 1024 * 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=u32::MAX as u64))]
    pub body_limit: usize,
    /// Largest session event in bytes of JSON.
    #[arg(long, env = "TETHER_EVENT_LIMIT", default_value_t = tether_server::service::DEFAULT_MAX_EVENT_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1024..=(1 << 30)))]
    pub event_limit: u64,
    /// Memory request bodies may take together, in bytes; pages of events being read have a quarter
    /// of it more. One caller may hold three quarters of either (see docs/limits.md).
    #[arg(long, env = "TETHER_REQUEST_MEMORY", default_value_t = tether_server::memory::DEFAULT_REQUEST_MEMORY as u64,
          value_parser = clap::value_parser!(u64).range((1 << 20)..=(1 << 40)))]
    pub request_memory: u64,
    /// Free space in bytes the embedded store keeps on its disk: below it, new sessions,
    /// environments, agents and events are refused (503 disk_low) while work items go on. 0: no
    /// floor. Not used with PostgreSQL.
    #[arg(long, env = "TETHER_MIN_FREE_DISK", default_value_t = tether_server::disk::DEFAULT_MIN_FREE_DISK,
          value_parser = clap::value_parser!(u64).range(0..=(1 << 50)))]
    pub min_free_disk: u64,
    /// Ask scrapers of /metrics for this token (Authorization: Bearer); without it /metrics takes no
    /// credential. At least 16 visible ASCII characters.
    #[arg(long, env = "TETHER_METRICS_TOKEN", hide_env_values = true,
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub metrics_token: Option<String>,
    /// Log format.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key. SIGHUP reloads it.
    #[arg(
        long,
        env = "TETHER_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, RSA or EC); needs --tls-cert.
    #[arg(
        long,
        env = "TETHER_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Most connections open at once. At the cap a new connection takes the place of the one that
    /// has waited longest with no request in flight; when all have one, it is closed as it arrives.
    /// Lowered to fit the process's open-file limit.
    #[arg(long, env = "TETHER_MAX_CONNECTIONS", default_value_t = tether_server::listener::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_connections: usize,
    /// Most event streams the keys and session tokens of one environment may hold open at once
    /// (an admin token's are not counted); one more is answered 429.
    #[arg(long, env = "TETHER_MAX_STREAMS_PER_ENVIRONMENT",
          default_value_t = tether_server::service::DEFAULT_MAX_STREAMS_PER_ENVIRONMENT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_streams_per_environment: usize,
    /// Time a client gets to send a request's headers (from connecting, TLS handshake included, or
    /// from the first byte of a later request on the same connection).
    #[arg(long, env = "TETHER_HEADER_TIMEOUT", default_value = "10s", value_parser = crate::worker::parse_duration)]
    pub header_timeout: Duration,
    /// A connection with no request in flight, or with an answer the client has taken nothing more of
    /// for this long (a full socket on HTTP/1, a shut stream window on HTTP/2), is closed.
    #[arg(long, env = "TETHER_IDLE_TIMEOUT", default_value = "75s", value_parser = crate::worker::parse_duration)]
    pub idle_timeout: Duration,
}

/// The longest lease, in seconds: SPEC §5.2 clamps every TTL into 10‥600, and workers take no
/// longer promise of amnesty either (`tether_core::lease::MAX_AMNESTY`).
const MAX_LEASE_TTL: i64 = tether_core::lease::LeasePolicy::MAX_TTL_SECONDS as i64;

/// The longest amnesty window, in milliseconds: a worker takes a promise of amnesty (the same window,
/// after a database outage) as at most `tether_core::lease::MAX_AMNESTY`, so a longer one would be
/// promised and not kept.
const MAX_AMNESTY_MS: i64 = tether_core::lease::MAX_AMNESTY.as_millis() as i64;

/// The longest `--header-timeout` and `--idle-timeout`.
const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 3_600);

/// What clap cannot judge flag by flag: the flags against each other, and the public URL. Each
/// refusal is one line that names its flags.
fn check_flags(args: &ServeArgs) -> Result<(), String> {
    let (ttl, min, max) = (args.lease_ttl, args.lease_ttl_min, args.lease_ttl_max);
    if min > max {
        return Err(format!(
            "--lease-ttl-min ({min}) must not exceed --lease-ttl-max ({max})"
        ));
    }
    if !(min..=max).contains(&ttl) {
        return Err(format!(
            "--lease-ttl ({ttl}) must lie within --lease-ttl-min ({min}) and --lease-ttl-max ({max})"
        ));
    }
    // A deadline this far off is no bound at all, and one near `Duration::MAX` would overflow the
    // clock arithmetic of every connection.
    for (flag, timeout) in [
        ("--header-timeout", args.header_timeout),
        ("--idle-timeout", args.idle_timeout),
    ] {
        if timeout.is_zero() {
            return Err(format!("{flag} must be above zero"));
        }
        if timeout > MAX_CONNECTION_TIMEOUT {
            return Err(format!("{flag} must be at most a day (1440m)"));
        }
    }
    if let Some(public_url) = &args.public_url {
        check_public_url(public_url)?;
    }
    Ok(())
}

/// `--public-url` reaches every worker as its items' `api_base_url`, to which the dialect's paths
/// are appended: an absolute http(s) URL with a host, no credentials, query or fragment.
fn check_public_url(given: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "--public-url {given:?} {why}; give the base URL workers reach this server at, e.g. \
             https://tether.example.com"
        ))
    };
    let url = match url::Url::parse(given) {
        Ok(url) => url,
        Err(e) => return refuse(&format!("is not an absolute URL ({e})")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return refuse("must start with http:// or https://");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return refuse("has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("must not carry credentials");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return refuse("must not have a query (?…) or a fragment (#…)");
    }
    Ok(())
}

/// File descriptors kept free of connections: the store, its WAL, the PostgreSQL pool, logs.
const RESERVED_FDS: u64 = 256;

/// Raises the soft limit on open files to the hard limit (a server with many clients needs a
/// descriptor per connection) and returns the soft limit now in force.
fn raise_open_file_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return Some(hard),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        }
    }
    Some(soft)
}

/// The connection cap: what was asked for, within what the open-file limit allows.
fn connection_cap(asked: usize, open_files: Option<u64>) -> usize {
    let Some(limit) = open_files else {
        return asked;
    };
    let room = limit.saturating_sub(RESERVED_FDS).max(16) as usize;
    if room < asked {
        tracing::warn!(
            asked,
            allowed = room,
            open_file_limit = limit,
            "--max-connections lowered to fit the open-file limit (raise it with ulimit -n)"
        );
    }
    asked.min(room)
}

pub fn init_logging(format: LogFormat) {
    init_logging_to(format, std::io::stderr);
}

/// The log shape of `serve` and `worker` alike: text or JSON lines from `tracing`, level from
/// `TETHER_LOG` (default `info`), written to `writer`.
pub fn init_logging_to<W>(format: LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    // A TETHER_LOG that does not parse is said in the log it would have shaped, not passed over.
    let (filter, refused) = match std::env::var("TETHER_LOG") {
        Ok(given) if !given.trim().is_empty() => {
            let names = names_read_as_targets(&given);
            // The warning's own target is let through, whatever the directives say.
            let directives = match names.is_empty() {
                true => with_quiet_libraries(&given),
                false => format!(
                    "{},{LOG_SETTINGS_TARGET}=warn",
                    with_quiet_libraries(&given)
                ),
            };
            match tracing_subscriber::EnvFilter::try_new(directives) {
                Ok(filter) => (
                    filter,
                    (!names.is_empty()).then(|| {
                        format!(
                            "TETHER_LOG {given:?}: {names} read as the name of what logs, not as \
                             a level (trace, debug, info, warn, error, off): only the lines of \
                             {names} are logged",
                            names = names.join(", ")
                        )
                    }),
                ),
                Err(e) => (
                    with_quiet_libraries("info").into(),
                    Some(format!(
                        "TETHER_LOG {given:?} ignored ({e}): logging at info"
                    )),
                ),
            }
        }
        _ => (with_quiet_libraries("info").into(), None),
    };
    // Colours only on a terminal: a log redirected to a file gets no escape sequences.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some(refused) = refused {
        tracing::warn!(target: LOG_SETTINGS_TARGET, "{refused}");
    }
}

/// The target of what is said about `TETHER_LOG` itself.
const LOG_SETTINGS_TARGET: &str = "tether::log_settings";

/// The bare words of `directives` that `tracing` reads as the names of targets, when they are
/// all it says: no level for everything, nothing of Tether's named. `inof` for `info` then logs
/// nothing of Tether's at all.
fn names_read_as_targets(directives: &str) -> Vec<&str> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let directives: Vec<&str> = directives.split(',').map(str::trim).collect();
    let is_level = |d: &str| LEVELS.iter().any(|level| d.eq_ignore_ascii_case(level));
    if directives
        .iter()
        .any(|&d| is_level(d) || d.starts_with("tether"))
    {
        return Vec::new();
    }
    directives
        .into_iter()
        .filter(|d| !d.is_empty() && !d.contains(['=', '[', ':']))
        .collect()
}

/// `directives` with the PostgreSQL pool's own warnings left out, unless they name it: each of
/// its connections that a database restart ends is a line of its own ("Connection error: db
/// error", "could not be recycled"), while the store says the loss once, and why, as it begins and
/// as it ends, and tries a cut connection again by itself. `TETHER_LOG=info,deadpool=warn` shows
/// them.
fn with_quiet_libraries(directives: &str) -> String {
    if directives.contains("deadpool") {
        return directives.to_owned();
    }
    // `off`, not `error`: a more specific directive wins, so `error` would turn the pool's error
    // lines back on under `TETHER_LOG=off`.
    format!("{directives},deadpool=off")
}

pub async fn open_store(args: &ServeArgs) -> Result<Arc<dyn Store>> {
    if let Some(url) = &args.database_url {
        let store = tether_store::postgres::connect(url)
            .await
            .with_context(|| {
                "cannot open the PostgreSQL store (check --database / TETHER_DATABASE_URL)"
            })?;
        return Ok(Arc::new(store));
    }
    // The store holds every session's conversation and environment variables: only the server's
    // user may read it. A new directory and everything in it are made so (SQLite gives its journal
    // files the mode of the database file).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    create_private_dir(&args.data_dir)?;
    claim_data_dir(&args.data_dir)?;
    let path = args.data_dir.join("tether.db");
    warn_if_others_may_read(&path);
    let store = tether_store::sqlite::open(&path).with_context(|| {
        // SQLite says only that it could not open the file; the system says why.
        let why = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => format!(" ({e})"),
            _ => String::new(),
        };
        format!("cannot open the store at {}{why}", path.display())
    })?;
    Ok(Arc::new(store))
}

/// A store made before its files were kept private (or copied in with a looser mode) is left as it
/// is, with a word on how to close it.
fn warn_if_others_may_read(store: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(metadata) = std::fs::metadata(store) else {
        return;
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %store.display(),
            mode = format!("{mode:o}"),
            "the store may be read by other users of this machine: chmod 600 it and its -wal and \
             -shm files"
        );
    }
}

/// Holds the embedded store's directory lock for the life of the process.
static DATA_DIR_LOCK: std::sync::OnceLock<nix::fcntl::Flock<std::fs::File>> =
    std::sync::OnceLock::new();

/// The file at `path` to hold a lock on (made, empty and the user's alone, if it is not there).
fn open_lock_file(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// One process owns an embedded store: its long-poll waiters, session streams and claim reservations
/// live in memory, so a second server on the same directory would miss the first one's wake-ups. The
/// kernel drops the lock when the process ends, however it ends.
fn claim_data_dir(dir: &Path) -> Result<()> {
    let path = dir.join("lock");
    let file = open_lock_file(&path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let _ = DATA_DIR_LOCK.set(lock);
            Ok(())
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => anyhow::bail!(
            "another `tether serve` is using {}; stop it, or give this one another --data-dir \
             (several servers share one store through PostgreSQL: --database)",
            dir.display()
        ),
        Err((_, e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// What a start settles before it creates anything. Every refusal a setting can earn is made here,
/// so a start refused for its settings leaves no store (and no data directory) behind.
struct Settled {
    tls: Option<TlsSettings>,
    metrics_token_hash: Option<String>,
    /// TETHER_ADMIN_TOKEN, read once: adoptable, or the start was refused.
    admin_token: Option<String>,
}

fn settle(args: &ServeArgs) -> Result<Settled> {
    check_flags(args).map_err(anyhow::Error::msg)?;
    // A TETHER_ADMIN_TOKEN that could never be adopted is a mistake in the settings, whether or
    // not this start would adopt it.
    let admin_token = std::env::var("TETHER_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if let Some(given) = &admin_token {
        tether_server::service::tokens::adoptable(given).map_err(anyhow::Error::msg)?;
    }
    let metrics_token_hash = args
        .metrics_token
        .as_deref()
        .map(|token| {
            tether_server::service::tokens::usable_as_metrics_token(token)
                .map(|()| tether_server::credentials::hash(token))
                .map_err(anyhow::Error::msg)
        })
        .transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            TlsSettings::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })
            .context("cannot serve HTTPS (check --tls-cert and --tls-key)")?,
        ),
        _ => None,
    };
    Ok(Settled {
        tls,
        metrics_token_hash,
        admin_token,
    })
}

pub async fn run(args: ServeArgs) -> Result<()> {
    init_logging(args.log_format);
    let Settled {
        tls,
        metrics_token_hash,
        admin_token,
    } = settle(&args)?;
    // Before the store opens, so that its writer thread's first commits are counted too.
    tether_server::http::ops::install_metrics();
    // The address before the store: a start that cannot listen leaves no new store behind.
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => " (is another server running? try --listen)",
                // `:4780`, as some servers take it for every interface: Tether wants the host.
                _ if args.listen.starts_with(':') => {
                    " (--listen takes HOST:PORT: 0.0.0.0:PORT for every interface, \
                     127.0.0.1:PORT for this machine alone)"
                }
                // Not an address at all (`4780`, `localhost`). A name that does not resolve fails
                // otherwise, and gets the system's reason alone.
                std::io::ErrorKind::InvalidInput => {
                    " (--listen takes HOST:PORT, e.g. 127.0.0.1:4780, or 0.0.0.0:4780 for every \
                     interface)"
                }
                _ => "",
            };
            anyhow::anyhow!(e).context(format!("cannot listen on {}{hint}", args.listen))
        })?;
    let store = open_store(&args).await?;
    let local = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let open_files = raise_open_file_limit();
    let limits = ConnectionLimits {
        max_connections: connection_cap(args.max_connections, open_files),
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
    };
    let name = server_name(&local);
    let config = ServiceConfig {
        public_url: args
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{local}")),
        lease: LeasePolicy {
            default_ttl_seconds: args.lease_ttl,
            min_ttl_seconds: args.lease_ttl_min,
            max_ttl_seconds: args.lease_ttl_max,
            max_requeues: args.max_requeues,
        },
        amnesty_grace_ms: args.amnesty_ms,
        tick: Duration::from_millis(args.tick_ms),
        sample_interval: Duration::from_millis(args.sample_ms),
        max_event_bytes: args.event_limit as usize,
        request_memory: args.request_memory as usize,
        min_free_disk: args.min_free_disk,
        metrics_token_hash,
        server_name: Some(name.clone()),
        max_streams_per_environment: args.max_streams_per_environment,
        ..ServiceConfig::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let app = App::new(store, clock, config);
    bootstrap_admin(&app, admin_token, &args.data_dir, args.log_format).await?;
    // Watched before the server says it listens: from then on a SIGHUP may come.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    tracing::info!(
        address = %local,
        url = %format!("{scheme}://{local}"),
        store = app.store.backend(),
        tls = tls.is_some(),
        max_connections = limits.max_connections,
        // Its mark in the database's lease_keepers says when it last checked the leases.
        server_name = %name,
        "tether is listening"
    );
    // The line people (and scripts of text logs) look for; a JSON log has it in the event above.
    if matches!(args.log_format, LogFormat::Text) {
        eprintln!(
            "tether listening on {scheme}://{local} ({} store)",
            app.store.backend()
        );
    }
    let reloader = tokio::spawn(reload_on_sighup(hangups, tls.clone()));
    let options = ServeOptions {
        body_limit: args.body_limit,
        tls,
        limits,
    };
    tether_server::serve_with(app, listener, options, shutdown_signal()).await?;
    reloader.abort();
    tracing::info!("tether stopped");
    Ok(())
}

/// This server among those sharing a database, the same from one start to the next: its host, the
/// address it listens on (one host runs one server per address) and the start of the kernel's boot
/// id. The boot id tells apart machines cloned from one image, which share host name and address:
/// two servers under one name would each take the other's lease marks for their own, and each could
/// then promise its workers an amnesty that the other does not keep (`lease::others_keep_leases`).
/// It stays the same across the server's restarts, which must not take their own last mark for
/// another server's; a reboot changes it, and the old mark lapses long before a reboot ends.
fn server_name(listening: &std::net::SocketAddr) -> String {
    let host = hostname::get()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok();
    name_of_server(&host, listening, boot_id.as_deref())
}

/// See [`server_name`]: `host/address`, then `/boot-` and the boot id's first 12 hex digits where
/// the kernel gives one.
fn name_of_server(host: &str, listening: &std::net::SocketAddr, boot_id: Option<&str>) -> String {
    let boot: String = boot_id
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(12)
        .collect();
    if boot.is_empty() {
        format!("{host}/{listening}")
    } else {
        format!("{host}/{listening}/boot-{boot}")
    }
}

/// First start of an empty store: mint the admin token (or adopt TETHER_ADMIN_TOKEN), print it once and
/// write it to `<data-dir>/admin-token` with mode 0600. A JSON log gets an event that says where the
/// token is, never the token.
async fn bootstrap_admin(
    app: &App,
    given: Option<String>,
    data_dir: &Path,
    format: LogFormat,
) -> Result<()> {
    let path = data_dir.join("admin-token");
    let pending = data_dir.join("admin-token.new");
    // Starts sharing a data directory (servers of a cluster on one machine, on PostgreSQL) take
    // turns with its token files: two at once could each save a token in `admin-token.new`, and
    // the one whose token the store took put the other's in place. A directory that does not
    // exist holds no token to finish saving, and gets one only if the store needs one.
    let needs_one = app.lacks_admin_token().await.map_err(anyhow::Error::new)?;
    let _turn = if needs_one || data_dir.exists() {
        create_private_dir(data_dir)?;
        Some(take_turn_with_token_files(data_dir).await?)
    } else {
        None
    };
    finish_saving_token(app, &path, &pending).await?;
    let adopted = given.is_some();
    // The token is saved before the store has it, in a file of its own that takes the usual one's
    // place once the store took it: a start killed at any moment leaves either no token made, or
    // one saved where this function finds it next time. Made first in the store, a kill before the
    // file was written left a store whose only admin token nobody had.
    let needed = app.lacks_admin_token().await.map_err(anyhow::Error::new)?;
    let secret = match (needed, &given) {
        (false, _) => None,
        (true, Some(given)) => Some(given.clone()),
        (true, None) => Some(tether_server::service::tokens::new_admin_secret()),
    };
    if let Some(secret) = &secret {
        create_private_dir(data_dir)?;
        write_private(&pending, secret)
            .with_context(|| format!("cannot write {}", pending.display()))?;
    }
    let minted = match &secret {
        Some(secret) => app.bootstrap_admin_token(Some(secret.clone())).await,
        None => Ok(None),
    };
    // A failed mint keeps the saved token: its write may have been applied with its answer lost
    // (PostgreSQL), and the next start puts it in place if so (`finish_saving_token`).
    let minted = minted.map_err(anyhow::Error::new)?;
    // None: another server starting at the same time made the store's token, or this one's write
    // was applied and its answer lost, so that the store has a live token when asked again.
    let minted = match (minted, &secret) {
        (Some(minted), _) => Some(minted),
        (None, Some(secret)) => match app.is_live_admin_token(secret).await {
            Ok(true) => Some(secret.clone()),
            Ok(false) => {
                let _ = std::fs::remove_file(&pending);
                None
            }
            Err(e) => return Err(anyhow::Error::new(e)),
        },
        (None, None) => None,
    };
    let Some(secret) = minted else {
        if let Some(given) = given {
            // Only a warning hangs on it: a failed look is said, and the server starts.
            match app.is_live_admin_token(&given).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    "TETHER_ADMIN_TOKEN is set but is not a live admin token of this store: it is \
                     adopted only by the first start of a store with no live admin token, and this \
                     one has one (on a cluster, give every server the token the first one adopted)"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot tell whether TETHER_ADMIN_TOKEN is an admin token of this store"
                ),
            }
        }
        return Ok(());
    };
    put_in_place(&pending, &path, &secret)?;
    // The secret goes to a person at a terminal only: a service's stderr is a log (journald, a file),
    // and logs never carry secrets. The file has it either way.
    if matches!(format, LogFormat::Json) {
        let path = path.display().to_string();
        if adopted {
            tracing::info!(%path, "adopted TETHER_ADMIN_TOKEN as the first admin token");
        } else {
            tracing::info!(%path, "created an admin token, as the store had none not revoked; it is in the file (mode 0600)");
        }
    } else if adopted {
        eprintln!(
            "Adopted TETHER_ADMIN_TOKEN as the first admin token (also saved to {}).",
            path.display()
        );
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!(
            "Created an admin token, as the store had none not revoked (shown once; also saved \
             to {}):\n\n    {secret}\n",
            path.display()
        );
    } else {
        eprintln!(
            "Created an admin token, as the store had none not revoked; it is in {} (mode 0600).",
            path.display()
        );
    }
    Ok(())
}

/// The admin token saved by a start that was stopped before it finished (see [`bootstrap_admin`]):
/// put where the operator finds it if the store took it, else thrown away (the store never had it).
async fn finish_saving_token(app: &App, path: &Path, pending: &Path) -> Result<()> {
    let saved = match std::fs::read_to_string(pending) {
        Ok(saved) => saved,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", pending.display())),
    };
    let secret = saved.trim();
    let taken = !secret.is_empty()
        && app
            .is_live_admin_token(secret)
            .await
            .map_err(anyhow::Error::new)?;
    if taken {
        put_in_place(pending, path, secret)?;
        tracing::warn!(
            path = %path.display(),
            "an earlier start made an admin token and was stopped before it saved it in place: \
             it is saved now"
        );
    } else {
        std::fs::remove_file(pending)
            .with_context(|| format!("cannot remove {}", pending.display()))?;
    }
    Ok(())
}

/// Waits for this process's turn with the admin token's files in `dir`, held until the returned
/// lock is dropped (or the process ends, however it ends).
async fn take_turn_with_token_files(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("admin-token.lock");
    let file = open_lock_file(&path)?;
    let locking = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
    });
    match locking.await.context("locking the admin token's files")? {
        Ok(lock) => Ok(lock),
        Err((_, e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// Renames the saved token `pending` (holding `secret`) over `path`, keeping what `path` held
/// before (see [`keep_token_replaced`]), and makes the rename durable.
fn put_in_place(pending: &Path, path: &Path, secret: &str) -> Result<()> {
    let kept = keep_token_replaced(path, secret)?;
    match std::fs::rename(pending, path) {
        Ok(()) => {}
        // The saved file is gone (removed by hand meanwhile, or by the start of an older build
        // that did not take turns with the files): the secret is here still.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_private(path, secret)
            .with_context(|| format!("cannot write {}", path.display()))?,
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot move {} to {}", pending.display(), path.display())
            })
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync the directory {}", dir.display()))?;
    }
    if let Some(kept) = kept {
        tracing::warn!(
            kept = %kept.display(),
            "{} held a token that is no live admin token of this store (revoked, or made for \
             another store: was TETHER_DATABASE_URL meant to be set?); it is kept in {}",
            path.display(),
            kept.display()
        );
    }
    Ok(())
}

/// Moves a token file about to be replaced aside, to `admin-token.old` beside it (or
/// `admin-token.old.1`, `.2`, …: the first name not taken, so that no earlier one is lost), and
/// returns where: the store has no live admin token, so the file's is revoked, or belongs to
/// another store (a cluster member started without its database, say), whose only copy it may be.
/// `None` when there is no such file, or it holds `secret` already.
fn keep_token_replaced(path: &Path, secret: &str) -> Result<Option<PathBuf>> {
    let held = match std::fs::read(path) {
        Ok(held) => held,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if held.trim_ascii().is_empty() || held.trim_ascii() == secret.as_bytes() {
        return Ok(None);
    }
    let kept = (0..)
        .map(|n| match n {
            0 => path.with_file_name("admin-token.old"),
            n => path.with_file_name(format!("admin-token.old.{n}")),
        })
        .find(|candidate| !candidate.exists())
        .expect("some name is free");
    std::fs::rename(path, &kept)
        .with_context(|| format!("cannot move {} to {}", path.display(), kept.display()))?;
    Ok(Some(kept))
}

/// Makes the data directory `dir` (and any parent missing) readable by this user only, on either
/// store: it holds the admin token, and on the embedded store every session's conversation. One
/// that exists is left as it is; a file there is refused, saying so.
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "--data-dir {} is not a directory: give a directory for the store (it is made if it \
             does not exist)",
            dir.display()
        );
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| {
            format!(
                "cannot create the data directory {} (--data-dir / TETHER_DATA_DIR)",
                dir.display()
            )
        })
}

fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{secret}")?;
    file.sync_all()
}

/// SIGHUP: read the certificate and key again. New connections get the new certificate; open ones
/// keep theirs. A certificate that does not load is logged and the current one stays.
///
/// Watched without TLS too, where it reloads nothing: SIGHUP's default action ends the process, and
/// one sent to every `tether` process of a host after a certificate's renewal (or by a terminal that
/// went away) must not take a plain-HTTP server down with it.
async fn reload_on_sighup(
    hangups: std::io::Result<tokio::signal::unix::Signal>,
    tls: Option<TlsSettings>,
) {
    let mut hangups = match hangups {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGHUP: the certificate will not be reloaded");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::info!("SIGHUP: nothing to reload without --tls-cert; still serving");
            continue;
        };
        let cert = tls.files().cert.display().to_string();
        match tls.reload() {
            Ok(()) => tracing::info!(%cert, "SIGHUP: TLS certificate reloaded"),
            Err(e) => tracing::error!(
                error = %e,
                "SIGHUP: cannot reload the TLS certificate; still serving the previous one"
            ),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    /// The lines `directives` (as `TETHER_LOG` gives them) lets through, of a warning by the pool
    /// and one by the store.
    fn logged_under(directives: &str) -> String {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let filter =
            tracing_subscriber::EnvFilter::try_new(super::with_quiet_libraries(directives))
                .expect(directives);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || SharedWriter(writer.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "deadpool.postgres", "Connection error: db error");
            tracing::error!(target: "deadpool.postgres", "Connection error: fatal");
            tracing::warn!(target: "tether_store::postgres::listener", "lost the database");
        });
        let logged = buffer.lock().unwrap().clone();
        String::from_utf8(logged).unwrap()
    }

    struct SharedWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedWriter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_pools_own_warnings_are_left_out_unless_named() {
        for given in [
            "info",
            "warn",
            "tether_store=debug,tower_http=warn",
            "trace",
            "off",
        ] {
            let logged = logged_under(given);
            assert_eq!(
                logged.contains("lost the database"),
                given != "off",
                "{given}: {logged}"
            );
            assert!(!logged.contains("Connection error"), "{given}: {logged}");
        }
        for named in ["info,deadpool=warn", "warn,deadpool.postgres=debug"] {
            let logged = logged_under(named);
            assert!(logged.contains("lost the database"), "{named}: {logged}");
            assert!(logged.contains("Connection error"), "{named}: {logged}");
        }
    }

    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        serve: super::ServeArgs,
    }

    fn refusal(args: &[&str]) -> Option<String> {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        match Command::try_parse_from(argv) {
            Ok(parsed) => super::check_flags(&parsed.serve).err(),
            Err(e) => Some(e.to_string()),
        }
    }

    #[test]
    fn servers_on_machines_cloned_from_one_image_have_different_names() {
        let address: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let first = super::name_of_server(
            "debian",
            &address,
            Some("5c9e0d8f-1b2a-4c3d-9e8f-0a1b2c3d4e5f\n"),
        );
        let clone = super::name_of_server(
            "debian",
            &address,
            Some("77aa3e10-0b1c-4d2e-8f3a-4b5c6d7e8f90\n"),
        );
        assert_eq!(first, "debian/0.0.0.0:8080/boot-5c9e0d8f1b2a");
        assert_ne!(first, clone);
        // Without a boot id (not Linux, or no /proc), host and address as before.
        assert_eq!(
            super::name_of_server("debian", &address, None),
            "debian/0.0.0.0:8080"
        );
        assert_eq!(
            super::name_of_server("debian", &address, Some("")),
            "debian/0.0.0.0:8080"
        );
        // The name this machine gives carries its own boot id, where the kernel has one.
        if let Ok(boot_id) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            let hex: String = boot_id
                .chars()
                .filter(char::is_ascii_hexdigit)
                .take(12)
                .collect();
            let name = super::server_name(&address);
            assert!(
                name.ends_with(&format!("/0.0.0.0:8080/boot-{hex}")),
                "{name}"
            );
        }
    }

    #[test]
    fn a_database_metrics_token_or_listen_address_given_empty_is_refused() {
        for flag in ["--database", "--metrics-token", "--listen"] {
            let error = refusal(&[flag, ""]).unwrap_or_else(|| panic!("{flag} '' taken"));
            assert!(error.contains(flag), "{error}");
        }
    }

    #[test]
    fn lease_flags_are_judged_against_each_other_and_the_documented_bounds() {
        assert_eq!(refusal(&[]), None);
        assert_eq!(
            refusal(&["--lease-ttl", "5"]).as_deref(),
            Some("--lease-ttl (5) must lie within --lease-ttl-min (10) and --lease-ttl-max (600)")
        );
        assert_eq!(
            refusal(&["--lease-ttl-min", "30", "--lease-ttl-max", "20"]).as_deref(),
            Some("--lease-ttl-min (30) must not exceed --lease-ttl-max (20)")
        );
        assert_eq!(refusal(&["--lease-ttl", "2", "--lease-ttl-min", "1"]), None);
        assert_eq!(refusal(&["--lease-ttl-max", "600"]), None);
        let too_long = refusal(&["--lease-ttl-max", "1000"]).unwrap();
        assert!(
            too_long.contains("--lease-ttl-max") && too_long.contains("1..=600"),
            "{too_long}"
        );
    }

    #[test]
    fn connection_timeouts_are_above_zero_and_at_most_a_day() {
        assert_eq!(
            refusal(&["--idle-timeout", "1440m", "--header-timeout", "1s"]),
            None
        );
        for (flag, other) in [
            ("--idle-timeout", "--header-timeout"),
            ("--header-timeout", "--idle-timeout"),
        ] {
            for refused in ["0s", "1441m", "100000000000000s"] {
                let error = refusal(&[flag, refused]);
                // The flag at fault alone.
                assert!(
                    error
                        .as_deref()
                        .is_some_and(|e| e.contains(flag) && !e.contains(other)),
                    "{flag} {refused}: {error:?}"
                );
            }
        }
    }

    #[test]
    fn amnesty_is_at_most_ten_minutes() {
        assert_eq!(refusal(&["--amnesty-ms", "600000"]), None);
        assert_eq!(refusal(&["--amnesty-ms", "0"]), None);
        for refused in ["99999999999", "600001", "-1"] {
            let error = refusal(&[&format!("--amnesty-ms={refused}")]).unwrap();
            assert!(error.contains("--amnesty-ms"), "{refused}: {error}");
        }
    }

    #[test]
    fn the_public_url_is_an_absolute_http_url() {
        for accepted in [
            "http://127.0.0.1:4780",
            "https://tether.example.com/base",
            "https://tether.example.com/",
        ] {
            assert_eq!(refusal(&["--public-url", accepted]), None, "{accepted}");
        }
        for (refused, why) in [
            ("notaurl", "is not an absolute URL"),
            ("/relative", "is not an absolute URL"),
            ("ftp://tether.example.com", "http:// or https://"),
            ("http://user:pw@tether.example.com", "credentials"),
            ("https://tether.example.com/?x=1", "query"),
            ("https://tether.example.com/#top", "fragment"),
        ] {
            let error = refusal(&["--public-url", refused]).unwrap();
            assert!(
                error.starts_with(&format!("--public-url {refused:?}")) && error.contains(why),
                "{refused}: {error}"
            );
        }
    }

    #[test]
    fn a_body_limit_too_small_for_any_request_is_refused() {
        for refused in ["0", "1023"] {
            assert!(Command::try_parse_from(["serve", "--body-limit", refused]).is_err());
        }
        let parsed = Command::try_parse_from(["serve", "--body-limit", "1024"]).unwrap();
        assert_eq!(parsed.serve.body_limit, 1024);
    }
}
