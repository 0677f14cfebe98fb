//! The bytes of a shared answer in Redis: a small versioned binary format, body kept exact.
//!
//! Layout (big-endian): `b"HG"`, version `1`, status u16, hub id u64, header count u16, each
//! header as name length u16 + name + value length u32 + value, then body length u32 + body.
//! A reader refuses any other version instead of guessing, so a rolling upgrade that changes
//! the format reads the old one as a miss.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// One HubSpot answer as replicas share it: status, the headers a replay sends, the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HubSpot account the answer belongs to.
    pub hub_id: u64,
    /// HubSpot's HTTP status.
    pub status: u16,
    /// Header names (lower case) and raw values, in order.
    pub headers: Vec<(String, Bytes)>,
    /// HubSpot's body bytes, unchanged.
    pub body: Bytes,
}

const MAGIC: &[u8; 2] = b"HG";
const VERSION: u8 = 1;

/// Header names that carry credentials: refused, so no token can be written to Redis even
/// if a caller passes request headers by mistake.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Why bytes are not an answer, or an answer cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Not a complete answer.
    #[error("stored answer is truncated or malformed")]
    Malformed,
    /// Written by a build with another format version.
    #[error("stored answer has format version {0}, this build reads {VERSION}")]
    Version(u8),
    /// The answer carries a credential header.
    #[error("header {0} carries credentials and is never stored")]
    Credential(String),
    /// A header or the body exceeds the format's length fields.
    #[error("answer part too large to encode")]
    TooLarge,
}

impl Answer {
    /// The encoded bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = BytesMut::with_capacity(
            32 + self.body.len()
                + self
                    .headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len() + 6)
                    .sum::<usize>(),
        );
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u16(self.status);
        out.put_u64(self.hub_id);
        out.put_u16(u16::try_from(self.headers.len()).map_err(|_| CodecError::TooLarge)?);
        for (name, value) in &self.headers {
            if CREDENTIAL_HEADERS
                .iter()
                .any(|c| c.eq_ignore_ascii_case(name))
            {
                return Err(CodecError::Credential(name.to_ascii_lowercase()));
            }
            out.put_u16(u16::try_from(name.len()).map_err(|_| CodecError::TooLarge)?);
            out.put_slice(name.as_bytes());
            out.put_u32(u32::try_from(value.len()).map_err(|_| CodecError::TooLarge)?);
            out.put_slice(value);
        }
        out.put_u32(u32::try_from(self.body.len()).map_err(|_| CodecError::TooLarge)?);
        out.put_slice(&self.body);
        Ok(out.to_vec())
    }

    /// Reads encoded bytes back; anything but a complete version-1 answer is an error.
    pub fn decode(bytes: &[u8]) -> Result<Answer, CodecError> {
        let mut buf = bytes;
        if buf.len() < 3 || &buf[..2] != MAGIC {
            return Err(CodecError::Malformed);
        }
        buf.advance(2);
        let version = buf.get_u8();
        if version != VERSION {
            return Err(CodecError::Version(version));
        }
        let status = take_u16(&mut buf)?;
        let hub_id = take_u64(&mut buf)?;
        let count = take_u16(&mut buf)?;
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let len = usize::from(take_u16(&mut buf)?);
            let name = std::str::from_utf8(take(&mut buf, len)?)
                .map_err(|_| CodecError::Malformed)?
                .to_owned();
            let len = take_u32(&mut buf)? as usize;
            headers.push((name, Bytes::copy_from_slice(take(&mut buf, len)?)));
        }
        let len = take_u32(&mut buf)? as usize;
        let body = Bytes::copy_from_slice(take(&mut buf, len)?);
        if !buf.is_empty() {
            return Err(CodecError::Malformed);
        }
        Ok(Answer {
            hub_id,
            status,
            headers,
            body,
        })
    }
}

/// A flight's pub/sub message: the flight key, the leader's token and the encoded answer, so
/// a woken waiter needs no further round trip.
pub(crate) fn encode_published(
    key: &str,
    token: &str,
    answer: &[u8],
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(8 + key.len() + token.len() + answer.len());
    out.put_u16(u16::try_from(key.len()).map_err(|_| CodecError::TooLarge)?);
    out.put_slice(key.as_bytes());
    out.put_u16(u16::try_from(token.len()).map_err(|_| CodecError::TooLarge)?);
    out.put_slice(token.as_bytes());
    out.put_slice(answer);
    Ok(out)
}

/// The parts of a pub/sub message: flight key, token, encoded answer.
pub(crate) fn decode_published(bytes: &[u8]) -> Result<(String, String, &[u8]), CodecError> {
    let mut buf = bytes;
    let len = usize::from(take_u16(&mut buf)?);
    let key = std::str::from_utf8(take(&mut buf, len)?).map_err(|_| CodecError::Malformed)?;
    let len = usize::from(take_u16(&mut buf)?);
    let token = std::str::from_utf8(take(&mut buf, len)?).map_err(|_| CodecError::Malformed)?;
    Ok((key.to_owned(), token.to_owned(), buf))
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], CodecError> {
    if buf.len() < n {
        return Err(CodecError::Malformed);
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn take_u16(buf: &mut &[u8]) -> Result<u16, CodecError> {
    let b = take(buf, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn take_u32(buf: &mut &[u8]) -> Result<u32, CodecError> {
    let b = take(buf, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_u64(buf: &mut &[u8]) -> Result<u64, CodecError> {
    let mut a = [0u8; 8];
    a.copy_from_slice(take(buf, 8)?);
    Ok(u64::from_be_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Answer {
        Answer {
            hub_id: 42,
            status: 200,
            headers: vec![
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
                (
                    "x-hubspot-correlation-id".into(),
                    Bytes::from_static(b"c-1"),
                ),
            ],
            body: Bytes::from_static(b"{\"status\":\"COMPLETE\"}\xff\x00"),
        }
    }

    /// Encoding then decoding gives back the same answer, body bytes exact.
    #[test]
    fn round_trips() {
        let a = sample();
        assert_eq!(Answer::decode(&a.encode().expect("encodes")), Ok(a));
    }

    /// Truncated, padded or future-version bytes are refused, never half-read.
    #[test]
    fn refuses_bad_bytes() {
        let bytes = sample().encode().expect("encodes");
        for cut in 0..bytes.len() {
            assert!(Answer::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert_eq!(Answer::decode(&padded), Err(CodecError::Malformed));
        let mut v2 = bytes;
        v2[2] = 2;
        assert_eq!(Answer::decode(&v2), Err(CodecError::Version(2)));
    }

    /// A credential header is refused, so no token can be written to Redis.
    #[test]
    fn credentials_are_never_encoded() {
        let mut a = sample();
        a.headers
            .push(("Authorization".into(), Bytes::from_static(b"Bearer tok")));
        assert_eq!(
            a.encode(),
            Err(CodecError::Credential("authorization".into()))
        );
    }

    /// A pub/sub message carries key, token and answer intact.
    #[test]
    fn published_frame_round_trips() {
        let frame = encode_published("k:1", "tok", b"answer").expect("encodes");
        let (k, t, a) = decode_published(&frame).expect("decodes");
        assert_eq!((k.as_str(), t.as_str(), a), ("k:1", "tok", &b"answer"[..]));
        assert!(decode_published(&frame[..3]).is_err());
    }
}
