//! pgoutput messages and PostgreSQL values, decoded.
//!
//! In: the payload of one `XLogData` message of a `pgoutput` stream (protocol version 1;
//! `Begin` and `Commit` are decoded by `pgwire-replication` itself), and column values in
//! PostgreSQL's text format (as pgoutput sends them, and as lookups read them with
//! `::text`). Out: [`Message`]s and JSON values.
//!
//! Values by type (the session pins `DateStyle=ISO`, `TimeZone=UTC`,
//! `bytea_output=hex`, so the text is the same on every server):
//! - text, varchar, char, name, uuid, enums and any type not listed: the text;
//! - int2/int4/int8/oid: numbers; float4/float8: numbers (NaN and infinities: `null`,
//!   as the SQLite source does); numeric: the text (exact, never rounded through f64);
//! - bool: `true`/`false`; json/jsonb: the nested document (the text if it does not parse);
//! - arrays of any of these: JSON arrays (nested for multi-dimensional ones);
//! - timestamptz: ISO 8601 in UTC (`2026-12-02T10:00:00.5Z`), timestamp: ISO 8601 without
//!   a zone (`2026-12-02T10:00:00.5`), date: `2026-12-02`; `infinity` stays its text;
//! - bytea: upper-case hex, as the SQLite source writes BLOBs.
//!
//! Nothing here panics on malformed input: a short or inconsistent message is an `Err`
//! naming what is wrong, and the caller skips it (logged, counted).

use serde_json::{Map, Number, Value};

/// Type OIDs changecast converts (pg_type.dat).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
}

/// The element type of an array type, for the built-in array types changecast converts
/// element by element (others are read as text).
pub fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1028 => oid::OID,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1231 => oid::NUMERIC,
        199 => oid::JSON,
        3807 => oid::JSONB,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        1182 => oid::DATE,
        // text[], varchar[], bpchar[], name[], uuid[]: elements are strings.
        1009 | 1015 | 1014 | 1003 | 2951 => 25,
        _ => return None,
    })
}

/// One column value converted from its text form.
pub fn value(type_oid: u32, text: &str) -> Value {
    if let Some(elem) = array_element(type_oid) {
        return parse_array(text, elem).unwrap_or_else(|| Value::String(text.to_owned()));
    }
    match type_oid {
        oid::BOOL => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => match text.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(text.to_owned()),
        },
        oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>() {
            Ok(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
            Err(_) => Value::Null,
        },
        oid::JSON | oid::JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        oid::BYTEA => Value::String(bytea_hex(text)),
        oid::TIMESTAMPTZ => Value::String(timestamptz_iso(text)),
        oid::TIMESTAMP => Value::String(timestamp_iso(text)),
        _ => Value::String(text.to_owned()),
    }
}

/// `\x0aff` (bytea_output = hex) → `0AFF`.
fn bytea_hex(text: &str) -> String {
    text.strip_prefix("\\x")
        .map(str::to_ascii_uppercase)
        .unwrap_or_else(|| text.to_owned())
}

/// `2026-12-02 10:00:00.5` → `2026-12-02T10:00:00.5`; `infinity` and BC dates unchanged.
fn timestamp_iso(text: &str) -> String {
    if text.len() > 10 && text.as_bytes().get(10) == Some(&b' ') && !text.ends_with(" BC") {
        let mut s = text.to_owned();
        s.replace_range(10..11, "T");
        s
    } else {
        text.to_owned()
    }
}

/// `2026-12-02 10:00:00.5+00` (TimeZone = UTC) → `2026-12-02T10:00:00.5Z`; another
/// offset (a server that ignored the session's zone) → `+hh:mm`.
fn timestamptz_iso(text: &str) -> String {
    let s = timestamp_iso(text);
    if s == text {
        return s;
    }
    // The offset: the last `+` or `-` after the time part.
    let Some(at) = s[11..].rfind(['+', '-']).map(|i| i + 11) else {
        return s;
    };
    let (base, offset) = s.split_at(at);
    match offset {
        "+00" | "-00" | "+00:00" => format!("{base}Z"),
        o if o.len() == 3 => format!("{base}{o}:00"),
        o => format!("{base}{o}"),
    }
}

/// A text-format array (`{1,2,NULL}`, `{{a,"b c"},{d,e}}`) as a JSON array of its
/// elements converted as `elem`; `None` if it is not a well-formed array literal.
/// Arrays with explicit bounds (`[0:1]={…}`) lose the bounds.
pub fn parse_array(text: &str, elem: u32) -> Option<Value> {
    let body = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let mut chars = body.chars().peekable();
    let v = parse_array_level(&mut chars, elem, 0)?;
    chars.next().is_none().then_some(v)
}

/// Arrays nest at most this deep (PostgreSQL's MAXDIM is 6).
const MAX_ARRAY_DEPTH: usize = 8;

fn parse_array_level(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    elem: u32,
    depth: usize,
) -> Option<Value> {
    if depth > MAX_ARRAY_DEPTH || chars.next()? != '{' {
        return None;
    }
    let mut out = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(Value::Array(out));
    }
    loop {
        match chars.peek()? {
            '{' => out.push(parse_array_level(chars, elem, depth + 1)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\\' => s.push(chars.next()?),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                out.push(value(elem, &s));
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                let s = s.trim();
                out.push(if s.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    value(elem, s)
                });
            }
        }
        match chars.next()? {
            ',' => continue,
            '}' => return Some(Value::Array(out)),
            _ => return None,
        }
    }
}

/// One column of a relation, as pgoutput describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// Part of the replica identity key (the primary key, by default).
    pub key: bool,
}

/// A table, as pgoutput describes it before its first change in a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
}

/// One column of a row as sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value (updates only): the value is not in the message.
    Unchanged,
    Text(String),
}

/// Which old row an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: the replica identity key's columns only (others are null).
    Key,
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

/// A decoded pgoutput message (Begin and Commit are decoded by the replication client).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Relation(Relation),
    Insert {
        rel: u32,
        new: Vec<Datum>,
    },
    Update {
        rel: u32,
        old: Option<(OldKind, Vec<Datum>)>,
        new: Vec<Datum>,
    },
    Delete {
        rel: u32,
        old: (OldKind, Vec<Datum>),
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// Type, Origin, and anything else changecast does not use.
    Other(u8),
}

/// Reads fields off a message, failing (never panicking) when it is short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| format!("message ends inside {what}"))?;
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &str) -> Result<i16, String> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self, what: &str) -> Result<String, String> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| format!("{what} is not terminated"))?;
        let s = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Datum>, String> {
        let n = self.i16("a row's column count")?;
        let n = usize::try_from(n).map_err(|_| format!("negative column count {n}"))?;
        let mut out = Vec::with_capacity(n.min(1600));
        for _ in 0..n {
            out.push(match self.u8("a column's kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.u32("a value's length")?;
                    let len = usize::try_from(len).map_err(|_| "value too long".to_string())?;
                    let bytes = self.take(len, "a value")?;
                    Datum::Text(String::from_utf8_lossy(bytes).into_owned())
                }
                b'b' => return Err("binary column values are not requested".into()),
                k => return Err(format!("unknown column kind {:?}", k as char)),
            });
        }
        Ok(out)
    }
}

/// Decodes one pgoutput message.
pub fn parse(data: &[u8]) -> Result<Message, String> {
    let mut r = Reader(data);
    let tag = r.u8("the message tag")?;
    Ok(match tag {
        b'R' => {
            let id = r.u32("the relation id")?;
            let schema = r.cstr("the schema name")?;
            let name = r.cstr("the table name")?;
            let _identity = r.u8("the replica identity")?;
            let n = r.i16("the column count")?;
            let n = usize::try_from(n).map_err(|_| format!("negative column count {n}"))?;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                let flags = r.u8("a column's flags")?;
                let name = r.cstr("a column name")?;
                let type_oid = r.u32("a column type")?;
                let _typmod = r.u32("a column's type modifier")?;
                columns.push(Column {
                    name,
                    type_oid,
                    key: flags & 1 == 1,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                columns,
            })
        }
        b'I' => {
            let rel = r.u32("the relation id")?;
            match r.u8("the tuple kind")? {
                b'N' => Message::Insert {
                    rel,
                    new: r.tuple()?,
                },
                k => return Err(format!("insert: unexpected tuple kind {:?}", k as char)),
            }
        }
        b'U' => {
            let rel = r.u32("the relation id")?;
            let mut old = None;
            let mut kind = r.u8("the tuple kind")?;
            if kind == b'K' || kind == b'O' {
                let k = if kind == b'K' {
                    OldKind::Key
                } else {
                    OldKind::Full
                };
                old = Some((k, r.tuple()?));
                kind = r.u8("the tuple kind")?;
            }
            if kind != b'N' {
                return Err(format!("update: unexpected tuple kind {:?}", kind as char));
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32("the relation id")?;
            let kind = match r.u8("the tuple kind")? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                k => return Err(format!("delete: unexpected tuple kind {:?}", k as char)),
            };
            Message::Delete {
                rel,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.u32("the relation count")?;
            let _options = r.u8("the truncate options")?;
            let mut rels = Vec::new();
            for _ in 0..n {
                rels.push(r.u32("a relation id")?);
            }
            Message::Truncate { rels }
        }
        other => Message::Other(other),
    })
}

/// A row as a document: column name → value. Null columns are `null`; unchanged TOASTed
/// ones are left out (the caller fills them from the old row when it has it). With
/// `only_key`, only the key columns are taken (an old row of kind `K`, whose other columns
/// are sent as null but are not known to be null).
pub fn document(
    rel: &Relation,
    row: &[Datum],
    only_key: bool,
) -> Result<Map<String, Value>, String> {
    if row.len() != rel.columns.len() {
        return Err(format!(
            "a row of `{}` has {} columns, its relation {}",
            rel.name,
            row.len(),
            rel.columns.len()
        ));
    }
    let mut doc = Map::with_capacity(row.len());
    for (col, datum) in rel.columns.iter().zip(row) {
        if only_key && !col.key {
            continue;
        }
        match datum {
            Datum::Null => {
                doc.insert(col.name.clone(), Value::Null);
            }
            Datum::Unchanged => {}
            Datum::Text(t) => {
                doc.insert(col.name.clone(), value(col.type_oid, t));
            }
        }
    }
    Ok(doc)
}

/// The change key of a row: the key column's value as text (strings as they are, other
/// values as their JSON), or, for several key columns, the JSON array of their values
/// (as the SQLite source writes composite keys). `None` when a key column is missing.
pub fn key(key_columns: &[&str], doc: &Map<String, Value>) -> Option<String> {
    match key_columns {
        [one] => Some(key_text(doc.get(*one)?)),
        many => {
            let values: Option<Vec<Value>> = many.iter().map(|c| doc.get(*c).cloned()).collect();
            Some(Value::Array(values?).to_string())
        }
    }
}

/// One key value as text.
pub fn key_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalar_types_convert_as_documented() {
        assert_eq!(value(oid::BOOL, "t"), json!(true));
        assert_eq!(value(oid::BOOL, "f"), json!(false));
        assert_eq!(
            value(oid::INT8, "9007199254740993"),
            json!(9007199254740993i64)
        );
        assert_eq!(value(oid::INT4, "-12"), json!(-12));
        assert_eq!(value(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(value(oid::FLOAT8, "NaN"), Value::Null);
        assert_eq!(value(oid::FLOAT4, "Infinity"), Value::Null);
        assert_eq!(value(oid::NUMERIC, "12.3400"), json!("12.3400"));
        assert_eq!(
            value(oid::JSONB, r#"{"owner": {"_id": "u1"}, "n": [1, 2]}"#),
            json!({"owner": {"_id": "u1"}, "n": [1, 2]})
        );
        assert_eq!(value(oid::JSON, "not json"), json!("not json"));
        assert_eq!(value(oid::BYTEA, "\\x00ffa1"), json!("00FFA1"));
        assert_eq!(
            value(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(value(oid::DATE, "2026-12-02"), json!("2026-12-02"));
        assert_eq!(
            value(oid::TIMESTAMP, "2026-12-02 10:00:00.5"),
            json!("2026-12-02T10:00:00.5")
        );
        assert_eq!(
            value(oid::TIMESTAMPTZ, "2026-12-02 10:00:00.123456+00"),
            json!("2026-12-02T10:00:00.123456Z")
        );
        assert_eq!(
            value(oid::TIMESTAMPTZ, "2026-12-02 10:00:00-05"),
            json!("2026-12-02T10:00:00-05:00")
        );
        assert_eq!(
            value(oid::TIMESTAMPTZ, "2026-12-02 10:00:00+05:30"),
            json!("2026-12-02T10:00:00+05:30")
        );
        assert_eq!(value(oid::TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(value(oid::INT4, "x"), json!("x"));
    }

    #[test]
    fn arrays_convert_element_by_element_and_nest() {
        assert_eq!(value(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(value(1007, "{}"), json!([]));
        assert_eq!(
            value(1009, r#"{a,"b c","d\"e",NULL,"NULL"}"#),
            json!(["a", "b c", "d\"e", null, "NULL"])
        );
        assert_eq!(value(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(value(1000, "{t,f}"), json!([true, false]));
        assert_eq!(value(1007, "[0:1]={5,6}"), json!([5, 6]));
        assert_eq!(
            value(3807, r#"{"{\"a\": 1}","[2]"}"#),
            json!([{"a": 1}, [2]])
        );
        // Malformed: the text, never a panic.
        assert_eq!(value(1007, "{1,2"), json!("{1,2"));
        assert_eq!(
            value(1007, "{{{{{{{{{{{1}}}}}}}}}}}"),
            json!("{{{{{{{{{{{1}}}}}}}}}}}")
        );
        assert_eq!(value(1007, "{1}x"), json!("{1}x"));
    }

    fn rel() -> Relation {
        Relation {
            id: 7,
            schema: "public".into(),
            name: "items".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: oid::INT4,
                    key: true,
                },
                Column {
                    name: "body".into(),
                    type_oid: 25,
                    key: false,
                },
            ],
        }
    }

    fn tuple(cols: &[Option<&str>]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => b.push(b'n'),
                Some("<u>") => b.push(b'u'),
                Some(t) => {
                    b.push(b't');
                    b.extend((t.len() as u32).to_be_bytes());
                    b.extend(t.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn relation_insert_update_delete_truncate_decode() {
        let mut m = vec![b'R'];
        m.extend(7u32.to_be_bytes());
        m.extend(b"public\0items\0");
        m.push(b'd');
        m.extend(2i16.to_be_bytes());
        for (flags, name, ty) in [(1u8, "id", oid::INT4), (0, "body", 25)] {
            m.push(flags);
            m.extend(name.as_bytes());
            m.push(0);
            m.extend(ty.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        assert_eq!(parse(&m).unwrap(), Message::Relation(rel()));

        let mut m = vec![b'I'];
        m.extend(7u32.to_be_bytes());
        m.push(b'N');
        m.extend(tuple(&[Some("1"), None]));
        let Message::Insert { new, .. } = parse(&m).unwrap() else {
            panic!()
        };
        assert_eq!(
            Value::Object(document(&rel(), &new, false).unwrap()),
            json!({"id": 1, "body": null})
        );

        // An update with the full old row and an unchanged TOASTed value.
        let mut m = vec![b'U'];
        m.extend(7u32.to_be_bytes());
        m.push(b'O');
        m.extend(tuple(&[Some("1"), Some("long")]));
        m.push(b'N');
        m.extend(tuple(&[Some("2"), Some("<u>")]));
        let Message::Update { old, new, .. } = parse(&m).unwrap() else {
            panic!()
        };
        assert_eq!(old.as_ref().map(|o| o.0), Some(OldKind::Full));
        assert_eq!(new[1], Datum::Unchanged);
        assert_eq!(
            Value::Object(document(&rel(), &new, false).unwrap()),
            json!({"id": 2}),
            "an unchanged TOASTed value is left out, never null"
        );

        // A delete with the key only: the non-key nulls are not taken as values.
        let mut m = vec![b'D'];
        m.extend(7u32.to_be_bytes());
        m.push(b'K');
        m.extend(tuple(&[Some("1"), None]));
        let Message::Delete { old, .. } = parse(&m).unwrap() else {
            panic!()
        };
        assert_eq!(
            Value::Object(document(&rel(), &old.1, true).unwrap()),
            json!({"id": 1})
        );

        let mut m = vec![b'T'];
        m.extend(2u32.to_be_bytes());
        m.push(0);
        m.extend(7u32.to_be_bytes());
        m.extend(8u32.to_be_bytes());
        assert_eq!(parse(&m).unwrap(), Message::Truncate { rels: vec![7, 8] });
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"I",
            b"I\0\0\0\x07N\0\x02t\0\0\0\x09ab",
            b"U\0\0\0\x07X",
            b"D\0\0\0\x07N\0\0",
            b"R\0\0\0\x07public",
            b"T\0\0\0\x09\0",
            b"I\0\0\0\x07N\xff\xff",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse(b"Y").unwrap(), Message::Other(b'Y'));
        // A row that does not fit its relation.
        assert!(document(&rel(), &[Datum::Null], false).is_err());
    }

    #[test]
    fn keys_are_text_or_a_json_array() {
        let doc = json!({"id": 7, "s": "a", "t": "b"});
        let doc = doc.as_object().unwrap();
        assert_eq!(key(&["id"], doc).as_deref(), Some("7"));
        assert_eq!(key(&["s"], doc).as_deref(), Some("a"));
        assert_eq!(key(&["s", "id"], doc).as_deref(), Some(r#"["a",7]"#));
        assert_eq!(key(&["missing"], doc), None);
    }
}
