//! Request paths normalized before routing and authorization, and forwarded normalized, so a
//! policy on `/admin` also sees `/public/../admin` and `/%61dmin`, and the endpoint receives
//! exactly the path that was authorized: percent-encoded unreserved characters are decoded
//! and dot segments removed (RFC 3986 §6.2.2.2 and §5.2.4). Slashes are not merged and
//! encoded reserved characters (`%2F`) stay encoded, because they change a path's meaning.

use http::uri::{PathAndQuery, Uri};

/// `path` normalized; `None` when it is already normal (or not an absolute path).
pub fn path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let decoded = decode_unreserved(path);
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "." | ".." => {
                if *s == ".." {
                    out.pop();
                }
                if i == last {
                    // `/a/b/..` is the directory `/a/`.
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let normal = format!("/{}", out.join("/"));
    (normal != path).then_some(normal)
}

/// Rewrites `uri`'s path to its normal form, keeping scheme, authority and query; `false`
/// (and `uri` untouched) when the result would not be a valid URI.
pub fn uri(uri: &mut Uri) -> bool {
    let Some(normal) = path(uri.path()) else {
        return true;
    };
    let pq = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    let Ok(pq) = pq.parse::<PathAndQuery>() else {
        return false;
    };
    parts.path_and_query = Some(pq);
    match Uri::from_parts(parts) {
        Ok(u) => {
            *uri = u;
            true
        }
        Err(_) => false,
    }
}

/// Decodes `%XX` escapes of unreserved characters (letters, digits, `-._~`).
fn decode_unreserved(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                    i += 3;
                    continue;
                }
            }
        }
        // `s` is a URI path, so ASCII; any other byte is copied as it is.
        let ch_len = s[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&s[i..i + ch_len]);
        i += ch_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_unreserved_escapes() {
        let n = |p: &str| path(p).unwrap_or_else(|| p.to_string());
        assert_eq!(n("/public/../admin"), "/admin");
        assert_eq!(n("/a/./b"), "/a/b");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/%61dmin"), "/admin");
        assert_eq!(n("/public/%2e%2E/admin"), "/admin");
        assert_eq!(n("/a%2Fb"), "/a%2Fb", "reserved escapes stay");
        assert_eq!(n("/a//b"), "/a//b", "slashes are not merged");
        assert_eq!(n("/a%20b"), "/a%20b");
        assert_eq!(path("/already/normal"), None);
        assert_eq!(path("*"), None);
    }

    #[test]
    fn uri_keeps_authority_and_query() {
        let mut u: Uri = "http://h.example/x/../y?q=%2e".parse().expect("uri");
        assert!(uri(&mut u));
        assert_eq!(u.to_string(), "http://h.example/y?q=%2e");
        let mut u: Uri = "/p/./q".parse().expect("uri");
        assert!(uri(&mut u));
        assert_eq!(u.to_string(), "/p/q");
    }
}
