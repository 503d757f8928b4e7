//! The pure core of Tether.
//!
//! Everything here is plain data and functions: no I/O, no async, no global state. Time comes in as a
//! [`time::Timestamp`] argument read from an injected [`time::Clock`]; identifiers come in as arguments
//! too. Storage, HTTP and the dispatcher call into this crate and never re-implement its rules.

pub mod events;
pub mod ids;
pub mod lease;
pub mod metadata;
pub mod resources;
pub mod session;
pub mod time;
pub mod work;

pub use lease::LeasePolicy;
pub use metadata::Metadata;
pub use time::{Clock, ManualClock, OffsetClock, SystemClock, Timestamp};
pub use work::{Cause, Step, Transition, WorkError, WorkItem, WorkState};
