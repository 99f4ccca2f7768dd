//! RFC 7252 message codec, written here rather than on `coap-lite` 0.13:
//! coap-lite does accept spark's token-on-empty PingAck (`61 00 <id> 00`), but
//! it maps every code it does not name (2.06, 4.10, any 3.xx, ...)
//! to 0xFF on re-encode and keeps options in a map, so it cannot promise to
//! re-encode an arbitrary decoded message byte for byte, which the vectors and
//! the round-trip property tests require. The codec is small; owning it also
//! lets us decide exactly how lenient to be with old firmware.

use crate::error::CoapError;

/// Option numbers used by the protocol.
pub const OPTION_URI_PATH: u16 = 11;
pub const OPTION_URI_QUERY: u16 = 15;
/// Trellis extension (docs/protocol.md §7.4): a signed command riding with a
/// function call. From the experimental-use range (65000-65535), even, so
/// elective: a device that does not know it ignores it.
pub const OPTION_SIGNED_COMMAND: u16 = 65000;
/// Longest signed command a gateway sends: with the call's path, a 622-byte
/// argument and framing it stays inside a device's 4,096-byte frame
/// ([`crate::DEFAULT_MAX_FRAME_LEN`]). Five 3072-bit signatures fit.
pub const MAX_SIGNED_COMMAND_LEN: usize = 3072;

pub(crate) const PAYLOAD_MARKER: u8 = 0xFF;

/// CoAP message type (the two `T` bits of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Confirmable,
    NonConfirmable,
    Acknowledgement,
    Reset,
}

impl MessageType {
    pub fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            0 => MessageType::Confirmable,
            1 => MessageType::NonConfirmable,
            2 => MessageType::Acknowledgement,
            _ => MessageType::Reset,
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            MessageType::Confirmable => 0,
            MessageType::NonConfirmable => 1,
            MessageType::Acknowledgement => 2,
            MessageType::Reset => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MessageType::Confirmable => "CON",
            MessageType::NonConfirmable => "NON",
            MessageType::Acknowledgement => "ACK",
            MessageType::Reset => "RST",
        }
    }
}

/// Codes as one byte, `class << 5 | detail`.
pub mod code {
    pub const EMPTY: u8 = 0x00;
    pub const GET: u8 = 0x01;
    pub const POST: u8 = 0x02;
    pub const PUT: u8 = 0x03;
    pub const DELETE: u8 = 0x04;
    pub const CREATED: u8 = 0x41;
    pub const DELETED: u8 = 0x42;
    pub const VALID: u8 = 0x43;
    pub const CHANGED: u8 = 0x44;
    pub const CONTENT: u8 = 0x45;
    pub const BAD_REQUEST: u8 = 0x80;
    pub const UNAUTHORIZED: u8 = 0x81;
    pub const BAD_OPTION: u8 = 0x82;
    pub const FORBIDDEN: u8 = 0x83;
    pub const NOT_FOUND: u8 = 0x84;
    pub const METHOD_NOT_ALLOWED: u8 = 0x85;
    pub const REQUEST_ENTITY_TOO_LARGE: u8 = 0x8D;
    pub const TOO_MANY_REQUESTS: u8 = 0x9D;
    pub const INTERNAL_SERVER_ERROR: u8 = 0xA0;
    pub const NOT_IMPLEMENTED: u8 = 0xA1;
    pub const SERVICE_UNAVAILABLE: u8 = 0xA3;

    /// The class (0 request, 2 success, 4 client error, 5 server error).
    pub const fn class(code: u8) -> u8 {
        code >> 5
    }

    /// The detail (the two digits after the dot).
    pub const fn detail(code: u8) -> u8 {
        code & 0x1F
    }

    /// Builds a code from the dotted form, e.g. `make(2, 4)` = 2.04 CHANGED.
    pub const fn make(class: u8, detail: u8) -> u8 {
        (class << 5) | (detail & 0x1F)
    }
}

/// One CoAP message. Options are kept in wire order; repeated options (several
/// Uri-Path segments) stay separate entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoapMessage {
    pub mtype: MessageType,
    pub code: u8,
    pub message_id: u16,
    pub token: Vec<u8>,
    pub options: Vec<(u16, Vec<u8>)>,
    pub payload: Vec<u8>,
}

/// Reads an extended delta or length (RFC 7252 §3.1): nibble 13 adds one byte
/// (+13), 14 adds two (+269), 15 is reserved and reported by the caller.
fn read_extended(
    buf: &[u8],
    idx: &mut usize,
    nibble: u8,
    what: &'static str,
) -> Result<u32, CoapError> {
    match nibble {
        13 => {
            let b = *buf
                .get(*idx)
                .ok_or(CoapError::Truncated { what, offset: *idx })?;
            *idx += 1;
            Ok(u32::from(b) + 13)
        }
        14 => {
            let hi = *buf
                .get(*idx)
                .ok_or(CoapError::Truncated { what, offset: *idx })?;
            let lo = *buf.get(*idx + 1).ok_or(CoapError::Truncated {
                what,
                offset: *idx + 1,
            })?;
            *idx += 2;
            Ok(u32::from(u16::from_be_bytes([hi, lo])) + 269)
        }
        n => Ok(u32::from(n)),
    }
}

/// Splits a delta or length into its nibble and extension bytes.
fn extended_parts(value: usize) -> (u8, Vec<u8>) {
    if value < 13 {
        (value as u8, Vec::new())
    } else if value < 269 {
        (13, vec![(value - 13) as u8])
    } else {
        // Values above 65535 + 269 cannot be expressed; saturate rather than
        // wrap so an oversized option is at least visibly wrong to the peer.
        let ext = u16::try_from(value - 269).unwrap_or(u16::MAX);
        (14, ext.to_be_bytes().to_vec())
    }
}

impl CoapMessage {
    /// A message with no token, options or payload.
    pub fn new(mtype: MessageType, code: u8, message_id: u16) -> Self {
        CoapMessage {
            mtype,
            code,
            message_id,
            token: Vec::new(),
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Parses one message. Deliberately lenient in two ways real peers need:
    /// a token on an empty message (spark's PingAck `61 00 <id> 00`) and a
    /// payload marker followed by nothing (old firmware publishing an event
    /// with empty data); both decode, the latter as an empty payload.
    pub fn decode(buf: &[u8]) -> Result<Self, CoapError> {
        if buf.len() < 4 {
            return Err(CoapError::TooShort { len: buf.len() });
        }
        let version = buf[0] >> 6;
        if version != 1 {
            return Err(CoapError::BadVersion { version });
        }
        let mtype = MessageType::from_bits(buf[0] >> 4);
        let tkl = usize::from(buf[0] & 0x0F);
        if tkl > 8 {
            return Err(CoapError::TokenTooLong { len: tkl });
        }
        let code = buf[1];
        let message_id = u16::from_be_bytes([buf[2], buf[3]]);
        let token = buf
            .get(4..4 + tkl)
            .ok_or(CoapError::Truncated {
                what: "token",
                offset: buf.len(),
            })?
            .to_vec();

        let mut idx = 4 + tkl;
        let mut number: u32 = 0;
        let mut options = Vec::new();
        let mut payload = Vec::new();
        while let Some(&byte) = buf.get(idx) {
            if byte == PAYLOAD_MARKER {
                payload = buf[idx + 1..].to_vec();
                break;
            }
            let start = idx;
            idx += 1;
            let delta_nibble = byte >> 4;
            let len_nibble = byte & 0x0F;
            if delta_nibble == 15 {
                return Err(CoapError::ReservedOptionDelta { offset: start });
            }
            if len_nibble == 15 {
                return Err(CoapError::ReservedOptionLength { offset: start });
            }
            let delta = read_extended(buf, &mut idx, delta_nibble, "option delta")?;
            let len = read_extended(buf, &mut idx, len_nibble, "option length")? as usize;
            number += delta;
            let option_number = u16::try_from(number)
                .map_err(|_| CoapError::OptionNumberOverflow { offset: start })?;
            let value = buf
                .get(idx..idx + len)
                .ok_or(CoapError::Truncated {
                    what: "option value",
                    offset: buf.len(),
                })?
                .to_vec();
            idx += len;
            options.push((option_number, value));
        }
        Ok(CoapMessage {
            mtype,
            code,
            message_id,
            token,
            options,
            payload,
        })
    }

    /// Serialises the message. Options are written in ascending number order
    /// (a stable sort, so repeated options keep their relative order); at most
    /// 8 token bytes are written.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded message to `out` (a buffer reused across
    /// messages allocates nothing per message).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let token = &self.token[..self.token.len().min(8)];
        out.reserve(4 + token.len() + self.payload.len() + 8 * self.options.len() + 1);
        out.push((1 << 6) | (self.mtype.bits() << 4) | token.len() as u8);
        out.push(self.code);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(token);

        let mut sorted: Vec<&(u16, Vec<u8>)> = self.options.iter().collect();
        sorted.sort_by_key(|(n, _)| *n);
        let mut previous = 0u16;
        for (number, value) in sorted {
            let (delta_nibble, delta_ext) = extended_parts(usize::from(number - previous));
            let (len_nibble, len_ext) = extended_parts(value.len());
            out.push((delta_nibble << 4) | len_nibble);
            out.extend_from_slice(&delta_ext);
            out.extend_from_slice(&len_ext);
            out.extend_from_slice(value);
            previous = *number;
        }
        if !self.payload.is_empty() {
            out.push(PAYLOAD_MARKER);
            out.extend_from_slice(&self.payload);
        }
    }

    /// Values of every option with this number, in order.
    pub fn option_values(&self, number: u16) -> Vec<&[u8]> {
        self.options
            .iter()
            .filter(|(n, _)| *n == number)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    pub fn uri_path(&self) -> Vec<&[u8]> {
        self.option_values(OPTION_URI_PATH)
    }

    pub fn uri_query(&self) -> Vec<&[u8]> {
        self.option_values(OPTION_URI_QUERY)
    }

    pub fn with_token(mut self, token: &[u8]) -> Self {
        self.token = token.to_vec();
        self
    }

    pub fn with_option(mut self, number: u16, value: &[u8]) -> Self {
        self.options.push((number, value.to_vec()));
        self
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// True for an ACK or for a message carrying a response code (class 2-5).
    pub fn is_response(&self) -> bool {
        self.mtype == MessageType::Acknowledgement || (2..=5).contains(&code::class(self.code))
    }
}
