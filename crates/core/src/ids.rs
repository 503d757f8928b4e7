//! Resource identifiers: `<prefix>_<32 lowercase hex>` where the hex is a UUIDv7 (D-1), so that
//! lexicographic order is creation order.

use uuid::Uuid;

/// The kinds of identifier Tether mints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Environment,
    Work,
    Session,
    Event,
    Agent,
    Token,
    EnvironmentKey,
}

impl IdKind {
    pub const fn prefix(self) -> &'static str {
        match self {
            IdKind::Environment => "env",
            IdKind::Work => "work",
            IdKind::Session => "sess",
            IdKind::Event => "evt",
            IdKind::Agent => "agent",
            IdKind::Token => "tok",
            IdKind::EnvironmentKey => "envkey",
        }
    }
}

impl IdKind {
    const ALL: [IdKind; 7] = [
        IdKind::Environment,
        IdKind::Work,
        IdKind::Session,
        IdKind::Event,
        IdKind::Agent,
        IdKind::Token,
        IdKind::EnvironmentKey,
    ];

    /// What an id of this kind names, for messages: "an environment".
    pub const fn noun(self) -> &'static str {
        match self {
            IdKind::Environment => "an environment",
            IdKind::Work => "a work item",
            IdKind::Session => "a session",
            IdKind::Event => "an event",
            IdKind::Agent => "an agent",
            IdKind::Token => "an admin token",
            IdKind::EnvironmentKey => "an environment key",
        }
    }

    /// The kind `text` is a well-formed id of, if any.
    pub fn of(text: &str) -> Option<IdKind> {
        IdKind::ALL
            .into_iter()
            .find(|kind| is_well_formed(*kind, text))
    }
}

/// Renders an id from a UUID. The caller supplies the UUID so that this stays free of I/O.
pub fn format_id(kind: IdKind, uuid: Uuid) -> String {
    format!("{}_{}", kind.prefix(), uuid.simple())
}

/// Mints a fresh UUIDv7-based id (reads the wall clock and the OS random source).
pub fn new_id(kind: IdKind) -> String {
    format_id(kind, Uuid::now_v7())
}

/// Whether `text` is shaped like an id of `kind` (prefix, underscore, 32 lowercase hex digits).
pub fn is_well_formed(kind: IdKind, text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix(kind.prefix())
        .and_then(|r| r.strip_prefix('_'))
    else {
        return false;
    };
    rest.len() == 32
        && rest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The smallest well-formed id of `kind` that sorts strictly after `previous`. Used to keep a session's
/// event ids strictly increasing even when two servers' clocks disagree.
pub fn successor(kind: IdKind, previous: &str) -> Option<String> {
    if !is_well_formed(kind, previous) {
        return None;
    }
    let hex = &previous[kind.prefix().len() + 1..];
    let value = u128::from_str_radix(hex, 16).ok()?.checked_add(1)?;
    Some(format!("{}_{:032x}", kind.prefix(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_well_formed_and_ordered() {
        let a = new_id(IdKind::Work);
        let b = new_id(IdKind::Work);
        assert!(is_well_formed(IdKind::Work, &a));
        assert!(a < b, "UUIDv7 ids sort by creation");
        assert!(!is_well_formed(IdKind::Environment, &a));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "work_",
            "work_XYZ",
            "work_019F3BE4FD2475D9A784BF2C739E1194",
            "wrk_019f3be4fd2475d9a784bf2c739e1194",
            "work_019f3be4fd2475d9a784bf2c739e11941",
        ] {
            assert!(!is_well_formed(IdKind::Work, bad), "{bad}");
        }
        assert!(is_well_formed(
            IdKind::Work,
            "work_019f3be4fd2475d9a784bf2c739e1194"
        ));
    }

    #[test]
    fn an_id_says_its_kind() {
        for kind in IdKind::ALL {
            let id = format_id(kind, Uuid::now_v7());
            assert_eq!(IdKind::of(&id), Some(kind), "{id}");
        }
        // `env_` is a prefix of `envkey_`: each is told apart all the same.
        assert_eq!(
            IdKind::of("envkey_019f3be4fd2475d9a784bf2c739e1194"),
            Some(IdKind::EnvironmentKey)
        );
        assert_eq!(
            IdKind::of("env_019f3be4fd2475d9a784bf2c739e1194"),
            Some(IdKind::Environment)
        );
        for other in [
            "",
            "env_",
            "env_x",
            "sess_019F3BE4FD2475D9A784BF2C739E1194",
            "nope",
        ] {
            assert_eq!(IdKind::of(other), None, "{other}");
        }
    }

    #[test]
    fn successor_sorts_after() {
        let a = "evt_019f3be4fd2475d9a784bf2c739e11ff";
        let b = successor(IdKind::Event, a).unwrap();
        assert_eq!(b, "evt_019f3be4fd2475d9a784bf2c739e1200");
        assert!(b.as_str() > a);
    }
}
