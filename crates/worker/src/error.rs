//! Why the worker could not start or had to end. Each message says what the operator should fix.

/// The worker's errors; the CLI prints them as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something in the configuration cannot work (found before the first claim).
    #[error("{0}")]
    Config(String),
    /// The server refused to hand out work in a way another try cannot fix.
    #[error("{0}")]
    Refused(String),
    /// An answer that is not Tether's (no request id) refused the poll as another try would not
    /// change: a proxy's 404 while the server behind it is redeployed, or another program at
    /// --server. Said as [`Error::Refused`] is, but a later start may find the server.
    #[error("{0}")]
    NotTethers(String),
    /// A second signal ended the worker: programs were killed, and their items force-stopped where
    /// the server answered (the log says of each item that could not be).
    #[error(
        "forced shutdown: programs were killed, and their items force-stopped where the server \
         answered (see the log for any that could not be)"
    )]
    Forced,
    /// `--max-idle` passed without the server answering a single poll: the worker cannot tell an
    /// idle queue from a server it does not reach.
    #[error("{0}")]
    Unreached(String),
    /// `run-one`: the item ended without its program running to its end.
    #[error("the item ended without PROGRAM running to its end (see the log)")]
    NotRun,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The exit status of a worker that ended on an error only its operator can fix: `EX_CONFIG` of
/// `sysexits.h`. A service manager that restarts a failed worker should not restart this one (as
/// systemd's `RestartPreventExitStatus=78`): it would only be refused again, as often as the
/// manager allows.
pub const EXIT_NEEDS_THE_OPERATOR: u8 = 78;

impl Error {
    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error::Config(message.into())
    }

    /// Whether only the operator can fix what ended the worker (its configuration, or a refusal
    /// such as a revoked key): trying again as it is cannot help. A forced shutdown, a server not
    /// reached and an item not run can go otherwise on the next start.
    pub fn needs_the_operator(&self) -> bool {
        match self {
            Error::Config(_) | Error::Refused(_) => true,
            Error::NotTethers(_) | Error::Forced | Error::Unreached(_) | Error::NotRun => false,
        }
    }
}

/// A failed call in words for the log: the client's message and, when the message does not already
/// end with it, the innermost error of its source chain (the operating system's words for a refused
/// connection or an unknown host, which the client's message leaves out).
///
/// An answer without a request id is not Tether's (Tether answers every error with its envelope
/// and an id): a proxy's page while the server is away, or something else listening at --server.
/// It is said so, as the admin CLI does.
pub(crate) fn described(error: &tether_client::Error) -> String {
    let message = error.to_string();
    let cause = error.root_cause();
    let message = if message.ends_with(&cause) {
        message
    } else {
        format!("{message} (cause: {cause})")
    };
    match error.api() {
        Some(api) if api.request_id.is_none() => format!(
            "{message} (not a Tether server's answer: a proxy's while the server is away, or \
             --server / TETHER_SERVER names something else)"
        ),
        _ => message,
    }
}

/// Whether a call's result is the server's answer rather than a failure on the way (a timeout, a
/// connection refused or lost): only then is the connection it went on known to work.
pub(crate) fn answered<T>(result: &tether_client::Result<T>) -> bool {
    result
        .as_ref()
        .map_or_else(|e| e.status().is_some(), |_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_error_is_logged_with_its_cause() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client =
            tether_client::Client::new(format!("http://127.0.0.1:{port}"), "tth_env_x").unwrap();
        let error = client
            .poll_work("env_1", &Default::default())
            .await
            .unwrap_err();
        assert!(error.is_connect(), "{error:?}");
        let text = described(&error);
        assert!(text.starts_with(&error.to_string()), "{text}");
        assert!(text.contains("Connection refused"), "{text}");
        // An answer of the server's is its own words already.
        let refused = crate::heartbeat::tests::refusal(409);
        assert_eq!(described(&refused), refused.to_string());
    }

    #[test]
    fn an_answer_without_a_request_id_is_said_not_to_be_tethers() {
        let page: tether_client::Error = tether_client::ApiError {
            status: 502,
            kind: "api_error".into(),
            message: "HTTP 502: <html>Bad Gateway</html>".into(),
            param: None,
            code: None,
            details: None,
            request_id: None,
        }
        .into();
        let text = described(&page);
        assert!(text.starts_with(&page.to_string()), "{text}");
        assert!(text.contains("not a Tether server's answer"), "{text}");
        let tethers = crate::heartbeat::tests::refusal(503);
        assert!(!described(&tethers).contains("not a Tether"));
    }
}
