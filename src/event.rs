//! The JSON events clients receive, and the close codes that end a connection.
//!
//! In: what the router, the hub and the transports want to say. Out: one JSON text per
//! event, encoded once. These names are the public contract (SPEC.md); change none of them.

use serde::Serialize;
use serde_json::Value;

use crate::change::Op;

/// Server → client events.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerEvent<'a> {
    /// First event on every connection.
    Ready {
        user: &'a str,
        /// Id of the newest event the user could have had.
        position: &'a str,
        /// Whether everything after the requested `since` was replayed.
        resumed: bool,
        /// With `?last=N` (and no `since`): how many of the user's newest events follow.
        #[serde(skip_serializing_if = "Option::is_none")]
        last: Option<usize>,
    },
    Change {
        id: &'a str,
        route: &'a str,
        op: Op,
        collection: &'a str,
        key: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        at: Option<&'a str>,
        doc: &'a Value,
    },
    Alert {
        id: &'a str,
        alert: &'a str,
        collection: &'a str,
        key: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        at: Option<&'a str>,
        message: &'a str,
        doc: &'a Value,
    },
    /// Published through `POST /v1/publish`.
    Message {
        id: &'a str,
        event: &'a Value,
    },
    /// History did not reach back to `since`: the client must refetch its state.
    Gap {
        since: &'a str,
        position: &'a str,
    },
    Pong,
    /// The connection's token expires in `expires_in` seconds: send `refresh` with a new
    /// one, or the connection closes with 4001.
    Expiring {
        expires_in: u64,
    },
}

impl ServerEvent<'_> {
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: every map key is a string.
        serde_json::to_string(self).expect("server events serialise")
    }
}

/// How and why a connection is closed; the codes are part of the public contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 1008: missing or invalid credentials. Terminal.
    BadCredentials,
    /// 4001: the token expired and was not refreshed. Refresh, reconnect with `since`.
    TokenExpired,
    /// 4003: unknown user, or client id not allowed. Terminal.
    Forbidden,
    /// 4008: the connection's send queue overflowed. Reconnect with `since`.
    TooSlow,
    /// 1012: the server is restarting. Reconnect with `since`.
    Restarting,
    /// 1011: internal error. Reconnect with backoff.
    Internal,
    /// 1013: too many connections (in all, or of this user). Reconnect later.
    TryAgainLater,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::BadCredentials => 1008,
            CloseReason::TokenExpired => 4001,
            CloseReason::Forbidden => 4003,
            CloseReason::TooSlow => 4008,
            CloseReason::Restarting => 1012,
            CloseReason::Internal => 1011,
            CloseReason::TryAgainLater => 1013,
        }
    }

    /// A short default reason text.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::BadCredentials => "missing or invalid credentials",
            CloseReason::TokenExpired => "token expired",
            CloseReason::Forbidden => "forbidden",
            CloseReason::TooSlow => "too slow: send queue overflowed",
            CloseReason::Restarting => "server restarting",
            CloseReason::Internal => "internal error",
            CloseReason::TryAgainLater => "too many connections",
        }
    }

    /// Label value for metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::BadCredentials => "bad_credentials",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Forbidden => "forbidden",
            CloseReason::TooSlow => "too_slow",
            CloseReason::Restarting => "restarting",
            CloseReason::Internal => "internal",
            CloseReason::TryAgainLater => "too_many_connections",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_have_the_documented_shape() {
        let doc = json!({"_id": "o19"});
        let change = ServerEvent::Change {
            id: "e7-1043",
            route: "orders",
            op: Op::Delete,
            collection: "orders",
            key: "o19",
            at: Some("2026-11-25T10:00:00.123Z"),
            doc: &doc,
        };
        let v: Value = serde_json::from_str(&change.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"type": "change", "id": "e7-1043", "route": "orders", "op": "delete",
                   "collection": "orders", "key": "o19", "at": "2026-11-25T10:00:00.123Z",
                   "doc": {"_id": "o19"}})
        );
        let ready = ServerEvent::Ready {
            user: "u1",
            position: "e7-1042",
            resumed: true,
            last: None,
        };
        assert_eq!(
            ready.to_json(),
            r#"{"type":"ready","user":"u1","position":"e7-1042","resumed":true}"#
        );
        let gap = ServerEvent::Gap {
            since: "e7-12",
            position: "e7-1042",
        };
        assert_eq!(
            gap.to_json(),
            r#"{"type":"gap","since":"e7-12","position":"e7-1042"}"#
        );
        assert_eq!(ServerEvent::Pong.to_json(), r#"{"type":"pong"}"#);
    }

    #[test]
    fn close_codes_match_the_contract() {
        let codes: Vec<u16> = [
            CloseReason::BadCredentials,
            CloseReason::TokenExpired,
            CloseReason::Forbidden,
            CloseReason::TooSlow,
            CloseReason::Restarting,
            CloseReason::Internal,
        ]
        .iter()
        .map(|r| r.code())
        .collect();
        assert_eq!(codes, vec![1008, 4001, 4003, 4008, 1012, 1011]);
    }
}
