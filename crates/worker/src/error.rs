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
    /// A second signal ended the worker: programs were killed and their items force-stopped.
    #[error("forced shutdown: programs were killed and their items force-stopped")]
    Forced,
    /// `run-one`: the item ended without its program running to its end.
    #[error("the item ended without PROGRAM running to its end (see the log)")]
    NotRun,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error::Config(message.into())
    }
}
