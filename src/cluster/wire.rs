//! The stream's message format: what the router writes and every gateway reads.
//!
//! - Subject `<prefix>.event.<kind>`: `change`, `alert`, `message` (the publish API), `gap`
//!   (the source lost changes: clients are told), `mark` (a checkpoint without an event).
//! - Payload (`change`, `alert`, `message`): the audience as a JSON array of user ids on the
//!   first line, then the event's JSON with an empty id (`"id":""`), which each gateway
//!   fills with `<epoch>-<stream sequence>` ([`with_id`]). Empty for `gap` and `mark`.
//! - Headers (routed messages): `Nats-Msg-Id` from the change's source position and the
//!   rule that made the event, so a router that re-reads changes after a failover adds
//!   nothing twice; [`RESUME`], the source position to re-read from to reproduce this
//!   message and everything after it (hex); for alerts, [`ALERT`] and [`KEY`], from which a
//!   new router rebuilds the cooldown clocks.

use bytes::{BufMut, Bytes, BytesMut};

use crate::change::{Position, Recipients, UserId};

/// The source position to resume reading from (hex bytes).
pub const RESUME: &str = "Changecast-Resume";
/// An alert message's alert name.
pub const ALERT: &str = "Changecast-Alert";
/// An alert message's document key.
pub const KEY: &str = "Changecast-Key";

/// What a stream message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Change,
    Alert,
    Message,
    Gap,
    Mark,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Change,
        Kind::Alert,
        Kind::Message,
        Kind::Gap,
        Kind::Mark,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Change => "change",
            Kind::Alert => "alert",
            Kind::Message => "message",
            Kind::Gap => "gap",
            Kind::Mark => "mark",
        }
    }

    /// The kind of a message on `subject` (its last token).
    pub fn of_subject(subject: &str) -> Option<Kind> {
        let last = subject.rsplit('.').next()?;
        Kind::ALL.into_iter().find(|k| k.as_str() == last)
    }

    /// Kinds whose messages carry a [`RESUME`] header (written by the router).
    pub fn routed(self) -> bool {
        self != Kind::Message
    }
}

/// The payload of an event message.
pub fn payload(recipients: &[UserId], template: &str) -> Bytes {
    let ids: Vec<&str> = recipients.iter().map(|u| &**u).collect();
    let mut b = BytesMut::with_capacity(template.len() + ids.len() * 16 + 4);
    // Serialising strings cannot fail.
    let _ = serde_json::to_writer((&mut b).writer(), &ids);
    b.put_u8(b'\n');
    b.extend_from_slice(template.as_bytes());
    b.freeze()
}

/// An event message's audience and JSON template.
pub fn parse(payload: &[u8]) -> Result<(Recipients, &str), String> {
    parse_with(payload, &mut Audiences::default())
}

/// Audiences already parsed, by their JSON text: consecutive events to the same users (a
/// business's every change) share one list instead of parsing and allocating it again.
#[derive(Default)]
pub struct Audiences(std::collections::HashMap<Box<[u8]>, Recipients>);

/// Distinct audiences remembered; past it the memory starts over.
const AUDIENCES: usize = 4096;

/// [`parse`], reusing the audiences in `seen`.
pub fn parse_with<'p>(
    payload: &'p [u8],
    seen: &mut Audiences,
) -> Result<(Recipients, &'p str), String> {
    let nl = payload
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no audience line")?;
    let template = std::str::from_utf8(&payload[nl + 1..]).map_err(|e| e.to_string())?;
    let line = &payload[..nl];
    if let Some(r) = seen.0.get(line) {
        return Ok((Recipients::clone(r), template));
    }
    // Owned: ids with escapes cannot borrow from the payload.
    let ids: Vec<String> = serde_json::from_slice(line)
        .map_err(|e| format!("audience is not a JSON array of strings: {e}"))?;
    let recipients: Recipients = ids.into_iter().map(UserId::from).collect();
    if seen.0.len() >= AUDIENCES {
        seen.0.clear();
    }
    seen.0.insert(line.into(), Recipients::clone(&recipients));
    Ok((recipients, template))
}

/// The empty id every routed event is encoded with until its sequence is known.
const EMPTY_ID: &str = r#","id":"""#;

/// `template` (an event encoded with `id: ""`) with its id filled in. The id is the
/// second key of every event (after `type`), so the first `,"id":""` is it.
pub fn with_id(template: &str, id: &str) -> String {
    match template.find(EMPTY_ID) {
        Some(at) => {
            let mut s = String::with_capacity(template.len() + id.len());
            s.push_str(&template[..at + EMPTY_ID.len() - 1]);
            s.push_str(id);
            s.push_str(&template[at + EMPTY_ID.len() - 1..]);
            s
        }
        None => template.to_owned(),
    }
}

/// A position as header text.
pub fn hex(p: &Position) -> String {
    let mut s = String::with_capacity(p.0.len() * 2);
    for b in &p.0 {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
    }
    s
}

/// A position from header text.
pub fn unhex(s: &str) -> Option<Position> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Position)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ServerEvent;
    use serde_json::json;

    #[test]
    fn an_event_round_trips_with_its_audience_and_gets_its_id_filled_in() {
        let event = json!({"note": "a \"quoted\" \n line", "id": ""});
        let template = ServerEvent::Message {
            id: "",
            event: &event,
        }
        .to_json();
        let to: Vec<UserId> = vec!["u1".into(), "user \"two\"\n".into()];
        let bytes = payload(&to, &template);
        let (got, t) = parse(&bytes).unwrap();
        assert_eq!(&*got, &to[..]);
        let filled: serde_json::Value = serde_json::from_str(&with_id(t, "s1x-42")).unwrap();
        assert_eq!(
            filled,
            json!({"type": "message", "id": "s1x-42", "event": event})
        );
    }

    #[test]
    fn events_to_the_same_audience_share_one_parsed_list() {
        let to: Vec<UserId> = vec!["u1".into(), "u2".into()];
        let mut seen = Audiences::default();
        let a = payload(&to, r#"{"type":"change","id":"","n":1}"#);
        let b = payload(&to, r#"{"type":"change","id":"","n":2}"#);
        let (ra, _) = parse_with(&a, &mut seen).unwrap();
        let (rb, tb) = parse_with(&b, &mut seen).unwrap();
        assert!(std::sync::Arc::ptr_eq(&ra, &rb));
        assert_eq!(tb, r#"{"type":"change","id":"","n":2}"#);
        let other = payload(&["u3".into()], "{}");
        assert_eq!(
            &*parse_with(&other, &mut seen).unwrap().0,
            &["u3".into()] as &[UserId]
        );
    }

    #[test]
    fn positions_survive_the_header_and_bad_text_is_refused() {
        let p = Position(vec![0, 1, 0xab, 0xff]);
        assert_eq!(hex(&p), "0001abff");
        assert_eq!(unhex(&hex(&p)), Some(p));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é1"), None);
        assert!(parse(b"no newline").is_err());
        assert!(parse(b"{\"a\":1}\n{}").is_err());
    }
}
