//! Paged lists: `limit` and `cursor` in the query, the next page's cursor in
//! the `X-Next-Cursor` and `Link` headers, and the body the bare JSON array
//! it always was (docs/API.md, "Paging").

use super::ApiError;
use crate::store::{ListPos, Listed, Page};
use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// The most rows one page may hold.
pub const MAX_LIMIT: u32 = 1000;
/// A page's length when a cursor comes without a `limit`.
pub const DEFAULT_LIMIT: u32 = 100;
/// Longer than any cursor we hand out; anything longer is refused unread.
const MAX_CURSOR_LEN: usize = 256;
/// The first field of every cursor: its format, so a later one can differ.
const CURSOR_VERSION: &str = "1";

/// The lists that page, each with its own cursors: one list's cursor is
/// refused by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Vms,
    Images,
    Templates,
    Snapshots,
}

impl List {
    fn name(self) -> &'static str {
        match self {
            List::Vms => "vms",
            List::Images => "images",
            List::Templates => "templates",
            List::Snapshots => "snapshots",
        }
    }

    fn path(self) -> &'static str {
        match self {
            List::Vms => "/vms",
            List::Images => "/images",
            List::Templates => "/templates",
            List::Snapshots => "/snapshots",
        }
    }
}

/// What a list request asked for: a page (with `limit` or `cursor`), or
/// the whole list as before paging existed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: u32,
    pub after: Option<ListPos>,
}

impl PageRequest {
    /// What to read from the store: one row more than the page, which tells
    /// whether another page follows.
    pub fn store_page(req: Option<&PageRequest>) -> Page {
        match req {
            None => Page::all(),
            Some(r) => Page {
                after: r.after.clone(),
                limit: Some(r.limit + 1),
            },
        }
    }
}

/// Takes `limit` and `cursor` out of a list's (decoded) query and returns
/// the other parameters, for the list's own filters.
pub fn split_query(list: List, pairs: Pairs) -> Result<(Option<PageRequest>, Pairs), ApiError> {
    let (mut limit, mut cursor, mut rest) = (None, None, vec![]);
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "limit" => &mut limit,
            "cursor" => &mut cursor,
            _ => {
                rest.push((k, v));
                continue;
            }
        };
        if slot.is_some() {
            return Err(ApiError::BadRequest(format!(
                "{k} was given more than once"
            )));
        }
        *slot = Some(v);
    }
    if limit.is_none() && cursor.is_none() {
        return Ok((None, rest));
    }
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(v) => parse_limit(&v)?,
    };
    let after = cursor.map(|c| decode_cursor(list, &c)).transpose()?;
    Ok((Some(PageRequest { limit, after }), rest))
}

/// A query's parameters, decoded, in their order.
pub type Pairs = Vec<(String, String)>;

/// The query of a list: the axum extractor's pairs, a 400 when the query
/// does not decode.
pub type ListQuery = Result<Query<Pairs>, QueryRejection>;

/// `split_query` for a list that has no filters: any other parameter is a 400.
pub fn page_only(list: List, query: ListQuery) -> Result<Option<PageRequest>, ApiError> {
    let (req, rest) = split_query(list, pairs_of(query)?)?;
    match rest.first() {
        Some((k, _)) => Err(ApiError::BadRequest(format!(
            "unknown query parameter {:?} (GET {} takes limit and cursor)",
            truncated(k),
            list.path()
        ))),
        None => Ok(req),
    }
}

pub fn pairs_of(query: ListQuery) -> Result<Pairs, ApiError> {
    let Query(pairs) = query.map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    Ok(pairs)
}

fn parse_limit(v: &str) -> Result<u32, ApiError> {
    v.parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "limit must be a whole number from 1 to {MAX_LIMIT}, got {:?}",
                truncated(v)
            ))
        })
}

/// The client's text, cut short for an error message.
fn truncated(v: &str) -> String {
    v.chars().take(32).collect()
}

/// A cursor: `1|{list}|{created_at}|{seq}` in hex. Opaque to clients, and
/// never trusted: it only says where in the caller's own list to start (the
/// query is scoped to the caller whatever it holds), and anything we could
/// not have made is a 400.
pub fn encode_cursor(list: List, pos: &ListPos) -> String {
    hex::encode(format!(
        "{CURSOR_VERSION}|{}|{}|{}",
        list.name(),
        pos.created_at,
        pos.seq
    ))
}

pub fn decode_cursor(list: List, cursor: &str) -> Result<ListPos, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "cursor is not one that GET {} handed out (pass the X-Next-Cursor value back as it came)",
            list.path()
        ))
    };
    if cursor.len() > MAX_CURSOR_LEN {
        return Err(bad());
    }
    let bytes = hex::decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let fields: Vec<&str> = text.split('|').collect();
    let [version, name, created_at, seq] = fields[..] else {
        return Err(bad());
    };
    if version != CURSOR_VERSION || name != list.name() {
        return Err(bad());
    }
    // Our timestamps exactly (RFC 3339, whole seconds, `Z`), and a rowid.
    let at = chrono::DateTime::parse_from_rfc3339(created_at).map_err(|_| bad())?;
    let canonical = at
        .with_timezone(&chrono::Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if canonical != created_at {
        return Err(bad());
    }
    // A rowid in its one spelling (no sign, no leading zeros).
    let n: i64 = seq.parse().map_err(|_| bad())?;
    if n < 1 || n.to_string() != seq {
        return Err(bad());
    }
    Ok(ListPos {
        created_at: created_at.to_string(),
        seq: n,
    })
}

/// Percent-encodes a query key or value (everything but RFC 3986's unreserved characters).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The answer to a list request: the rows as a JSON array, and when a page
/// was asked for and more rows follow, the next page's cursor in
/// `X-Next-Cursor` and a `Link: <...>; rel="next"` to it that keeps the
/// request's other parameters (its filters).
pub fn respond<R, V: Serialize>(
    list: List,
    req: Option<&PageRequest>,
    filters: &[(String, String)],
    mut rows: Vec<Listed<R>>,
    view: impl Fn(R) -> V,
) -> Response {
    let next = match req {
        Some(r) if rows.len() > r.limit as usize => {
            rows.truncate(r.limit as usize);
            rows.last().map(|l| (r.limit, encode_cursor(list, &l.pos)))
        }
        _ => None,
    };
    let body: Vec<V> = rows.into_iter().map(|l| view(l.row)).collect();
    let mut resp = Json(body).into_response();
    if let Some((limit, cursor)) = next {
        let mut query: Vec<String> = filters
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect();
        query.push(format!("limit={limit}"));
        query.push(format!("cursor={cursor}"));
        let link = format!("<{}?{}>; rel=\"next\"", list.path(), query.join("&"));
        // Hex and percent-encoded ASCII: always a valid header value.
        let headers = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&cursor) {
            headers.insert("x-next-cursor", v);
        }
        if let Ok(v) = HeaderValue::from_str(&link) {
            headers.insert(header::LINK, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(at: &str, seq: i64) -> ListPos {
        ListPos {
            created_at: at.into(),
            seq,
        }
    }

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn cursors_round_trip_and_belong_to_their_list() {
        let p = pos("2026-12-01T21:00:05Z", 42);
        let c = encode_cursor(List::Vms, &p);
        assert_eq!(decode_cursor(List::Vms, &c).unwrap(), p);
        assert!(decode_cursor(List::Images, &c).is_err());
        assert!(decode_cursor(List::Templates, &c).is_err());
    }

    #[test]
    fn crafted_cursors_are_refused() {
        let raw = |s: &str| hex::encode(s);
        for c in [
            "".to_string(),
            "zz".into(),
            "abc".into(),
            "x".repeat(10_000),
            raw("1|vms|2026-12-01T21:00:05Z"),
            raw("1|vms|2026-12-01T21:00:05Z|42|7"),
            raw("2|vms|2026-12-01T21:00:05Z|42"),
            raw("1|vms|2026-12-01T21:00:05Z|0"),
            raw("1|vms|2026-12-01T21:00:05Z|-1"),
            raw("1|vms|2026-12-01T21:00:05Z|+42"),
            raw("1|vms|2026-12-01T21:00:05Z|042"),
            raw("1|vms|2026-12-01T21:00:05Z|99999999999999999999"),
            raw("1|vms|2026-12-01T21:00:05.5Z|42"),
            raw("1|vms|2026-12-01T22:00:05+01:00|42"),
            raw("1|vms|' OR 1=1 --|42"),
            raw("1|vms|~|42"),
            hex::encode([0xff, 0xfe, b'|']),
        ] {
            let e = decode_cursor(List::Vms, &c).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{c}: {e}");
        }
    }

    #[test]
    fn limit_and_cursor_come_out_of_the_query() {
        assert_eq!(split_query(List::Vms, vec![]).unwrap(), (None, vec![]));
        let (req, rest) = split_query(
            List::Snapshots,
            pairs(&[("kind", "Standby"), ("limit", "5")]),
        )
        .unwrap();
        assert_eq!(
            req,
            Some(PageRequest {
                limit: 5,
                after: None
            })
        );
        assert_eq!(rest, pairs(&[("kind", "Standby")]));
        let c = encode_cursor(List::Vms, &pos("2026-12-01T21:00:05Z", 3));
        let (req, _) = split_query(List::Vms, pairs(&[("cursor", &c)])).unwrap();
        assert_eq!(req.unwrap().limit, DEFAULT_LIMIT);
        for bad in ["0", "1001", "-1", "abc", "", "1.5", " 5", "99999999999"] {
            assert!(
                split_query(List::Vms, pairs(&[("limit", bad)])).is_err(),
                "{bad:?}"
            );
        }
        assert!(split_query(List::Vms, pairs(&[("limit", "1000")])).is_ok());
        assert!(split_query(List::Vms, pairs(&[("limit", "1"), ("limit", "2")])).is_err());
    }

    #[test]
    fn the_next_link_keeps_the_filters_escaped() {
        let rows: Vec<Listed<u32>> = (1..=3)
            .map(|i| Listed {
                pos: pos("2026-12-01T21:00:05Z", 10 - i),
                row: i as u32,
            })
            .collect();
        let req = PageRequest {
            limit: 2,
            after: None,
        };
        let filters = pairs(&[("tags[a b]", "x&y")]);
        let resp = respond(List::Snapshots, Some(&req), &filters, rows.clone(), |r| r);
        let cursor = encode_cursor(List::Snapshots, &pos("2026-12-01T21:00:05Z", 8));
        assert_eq!(resp.headers()["x-next-cursor"], cursor.as_str());
        assert_eq!(
            resp.headers()[header::LINK],
            format!("</snapshots?tags%5Ba%20b%5D=x%26y&limit=2&cursor={cursor}>; rel=\"next\"")
                .as_str()
        );
        // The last page, and the unpaged list: no next.
        let last = PageRequest {
            limit: 3,
            after: None,
        };
        let resp = respond(List::Snapshots, Some(&last), &[], rows.clone(), |r| r);
        assert!(resp.headers().get("x-next-cursor").is_none());
        let resp = respond(List::Snapshots, None, &[], rows, |r| r);
        assert!(resp.headers().get(header::LINK).is_none());
    }
}
