//! Headers in one byte string, for server backends whose columns or
//! stream fields hold a record's ordered header list (duplicates allowed,
//! order kept). Format: for each header, the name's length (u32
//! big-endian), the name (UTF-8), the value's length (u32 BE), the value.
//! An empty list is zero bytes. Written once: PostgreSQL and Redis use it.

use crate::{Error, ErrorKind, Header, Result};
use bytes::Bytes;

/// Encode headers.
pub fn encode_headers(headers: &[Header]) -> Vec<u8> {
    let len: usize = headers
        .iter()
        .map(|h| 8 + h.name.len() + h.value.len())
        .sum();
    let mut out = Vec::with_capacity(len);
    for h in headers {
        out.extend_from_slice(&(h.name.len() as u32).to_be_bytes());
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(&(h.value.len() as u32).to_be_bytes());
        out.extend_from_slice(&h.value);
    }
    out
}

/// Decode what [`encode_headers`] wrote.
///
/// # Errors
/// `Corrupt`, naming `at()`, when the bytes are not such an encoding.
pub fn decode_headers(data: &[u8], at: &dyn Fn() -> String) -> Result<Vec<Header>> {
    let bad = |why: &str| {
        Error::new(
            ErrorKind::Corrupt,
            format!("{}: stored headers are damaged ({why})", at()),
        )
    };
    let mut headers = Vec::new();
    let mut rest = data;
    let take = |rest: &mut &[u8], n: usize| -> Result<Vec<u8>> {
        if rest.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head.to_vec())
    };
    while !rest.is_empty() {
        let n = u32::from_be_bytes(take(&mut rest, 4)?.try_into().map_err(|_| bad("length"))?);
        let name = String::from_utf8(take(&mut rest, n as usize)?).map_err(|_| bad("name"))?;
        let n = u32::from_be_bytes(take(&mut rest, 4)?.try_into().map_err(|_| bad("length"))?);
        let value = Bytes::from(take(&mut rest, n as usize)?);
        headers.push(Header { name, value });
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_order_with_duplicates_and_damage_is_corrupt() {
        let hs = vec![
            Header::new("a", "1"),
            Header::new("a", ""),
            Header::new("", vec![0u8, 255]),
        ];
        let enc = encode_headers(&hs);
        assert_eq!(decode_headers(&enc, &|| "x".into()).unwrap(), hs);
        assert!(decode_headers(&[], &|| "x".into()).unwrap().is_empty());
        let e = decode_headers(&enc[..enc.len() - 1], &|| "t/0@3".into()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("t/0@3"));
    }
}
