//! The protocol's messages on top of CoAP: builders that produce exactly the
//! bytes spark-protocol 0.1.6 and its firmware exchange, and `classify`,
//! which turns an incoming CoAP message into a typed request.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::coap::{
    CoapMessage, MessageType, OPTION_SIGNED_COMMAND, OPTION_URI_PATH, OPTION_URI_QUERY, code,
};
use crate::error::MessageError;
use crate::hello::Hello;
use crate::ota::{Chunk, UpdateBegin};

const CON: MessageType = MessageType::Confirmable;
const NON: MessageType = MessageType::NonConfirmable;
const ACK: MessageType = MessageType::Acknowledgement;

/// Device → server Hello: NON POST `h`, no token.
pub fn hello_device(id: u16, hello: &Hello) -> CoapMessage {
    CoapMessage::new(NON, code::POST, id)
        .with_option(OPTION_URI_PATH, b"h")
        .with_payload(&hello.encode())
}

/// Server → device Hello: NON POST `h`, one-byte token, no payload.
pub fn hello_server(id: u16, token: u8) -> CoapMessage {
    CoapMessage::new(NON, code::POST, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"h")
}

/// CON EMPTY: keepalive.
pub fn ping(id: u16) -> CoapMessage {
    CoapMessage::new(CON, code::EMPTY, id)
}

/// ACK EMPTY with the ping's id; spark sends a `00` token, Trellis none.
pub fn ping_ack(id: u16, token: &[u8]) -> CoapMessage {
    CoapMessage::new(ACK, code::EMPTY, id).with_token(token)
}

/// ACK EMPTY, no token: acknowledges a CON whose answer comes separately.
pub fn empty_ack(id: u16) -> CoapMessage {
    CoapMessage::new(ACK, code::EMPTY, id)
}

/// spark-protocol's answer to most device events: ACK 4.00 with token `00`.
pub fn event_slowdown(id: u16) -> CoapMessage {
    CoapMessage::new(ACK, code::BAD_REQUEST, id).with_token(&[0])
}

/// CON GET `d`.
pub fn describe(id: u16, token: u8) -> CoapMessage {
    CoapMessage::new(CON, code::GET, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"d")
}

/// NON CHANGED carrying the Describe JSON.
pub fn describe_reply(id: u16, token: &[u8], json: &[u8]) -> CoapMessage {
    CoapMessage::new(NON, code::CHANGED, id)
        .with_token(token)
        .with_payload(json)
}

/// CON POST `f/<name>`, the argument split on `&` into Uri-Query options.
pub fn function_call(id: u16, token: u8, name: &str, argument: &[u8]) -> CoapMessage {
    let mut m = CoapMessage::new(CON, code::POST, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"f")
        .with_option(OPTION_URI_PATH, name.as_bytes());
    if !argument.is_empty() {
        for part in argument.split(|b| *b == b'&') {
            m = m.with_option(OPTION_URI_QUERY, part);
        }
    }
    m
}

/// CON PUT `s` with one Uri-Query byte, 1 or 0: "signal" (the device shows
/// it is the one being talked to, Particle's rainbow LED) or stop. The
/// device answers with a piggybacked ACK 2.04 (spark-protocol's
/// RaiseYourHand).
pub fn signal(id: u16, token: u8, on: bool) -> CoapMessage {
    CoapMessage::new(CON, code::PUT, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"s")
        .with_option(OPTION_URI_QUERY, &[u8::from(on)])
}

/// A function call carrying a signed command (docs/protocol.md §7.4): the
/// same bytes as [`function_call`] plus one [`OPTION_SIGNED_COMMAND`]
/// option after the Uri-Query options. The option is elective, so a device
/// that does not know it runs the call as before.
pub fn signed_function_call(
    id: u16,
    token: u8,
    name: &str,
    argument: &[u8],
    signed_command: &[u8],
) -> CoapMessage {
    function_call(id, token, name, argument).with_option(OPTION_SIGNED_COMMAND, signed_command)
}

/// The device's refusal of a function call whose signed command failed its
/// checks: NON 4.03 Forbidden with the token, the reason as UTF-8 payload
/// (`signature missing`, `expired`, `replayed`, …).
pub fn function_refused(token: &[u8], reason: &str) -> CoapMessage {
    CoapMessage::new(NON, code::FORBIDDEN, 0)
        .with_token(token)
        .with_payload(reason.as_bytes())
}

/// NON CHANGED with the i32 result, big-endian.
pub fn function_return(id: u16, token: &[u8], value: i32) -> CoapMessage {
    CoapMessage::new(NON, code::CHANGED, id)
        .with_token(token)
        .with_payload(&value.to_be_bytes())
}

/// CON GET `v/<name>`.
pub fn variable_request(id: u16, token: u8, name: &str) -> CoapMessage {
    CoapMessage::new(CON, code::GET, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"v")
        .with_option(OPTION_URI_PATH, name.as_bytes())
}

/// ACK CONTENT piggybacked on the request's id.
pub fn variable_value(request_id: u16, token: &[u8], value: &[u8]) -> CoapMessage {
    CoapMessage::new(ACK, code::CONTENT, request_id)
        .with_token(token)
        .with_payload(value)
}

/// NON POST `e/<name>` (public) or `E/<name>` (private): the whole name,
/// slashes included, is ONE Uri-Path option, as the firmware sends it.
pub fn event(id: u16, public: bool, name: &str, data: &[u8]) -> CoapMessage {
    CoapMessage::new(NON, code::POST, id)
        .with_option(OPTION_URI_PATH, if public { b"e" } else { b"E" })
        .with_option(OPTION_URI_PATH, name.as_bytes())
        .with_payload(data)
}

/// CON GET `e/<prefix>`.
pub fn subscribe(id: u16, token: u8, prefix: &str) -> CoapMessage {
    CoapMessage::new(CON, code::GET, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"e")
        .with_option(OPTION_URI_PATH, prefix.as_bytes())
}

/// CON GET `t`.
pub fn get_time(id: u16, token: u8) -> CoapMessage {
    CoapMessage::new(CON, code::GET, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"t")
}

/// ACK CONTENT with the u32 unix time.
pub fn time_reply(request_id: u16, token: &[u8], unix: u32) -> CoapMessage {
    CoapMessage::new(ACK, code::CONTENT, request_id)
        .with_token(token)
        .with_payload(&unix.to_be_bytes())
}

/// CON POST `u`.
pub fn update_begin(id: u16, token: u8, begin: &UpdateBegin) -> CoapMessage {
    CoapMessage::new(CON, code::POST, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"u")
        .with_payload(&begin.encode())
}

/// NON CHANGED: the device is ready for chunks.
pub fn update_ready(id: u16, token: &[u8]) -> CoapMessage {
    CoapMessage::new(NON, code::CHANGED, id).with_token(token)
}

/// CON POST `c`, CRC as a 4-byte Uri-Query, optional index as a second one.
pub fn chunk(id: u16, token: u8, chunk: &Chunk) -> CoapMessage {
    let mut m = CoapMessage::new(CON, code::POST, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"c")
        .with_option(OPTION_URI_QUERY, &chunk.crc.to_be_bytes());
    if let Some(index) = chunk.index {
        m = m.with_option(OPTION_URI_QUERY, &index.to_be_bytes());
    }
    m.with_payload(&chunk.data)
}

/// Appends to `out` exactly the bytes of `chunk(id, token, &chunk)` for
/// a chunk whose data is `data` zero-padded to `padded_len` (its CRC over
/// the padding too), without building the message: a firmware transfer
/// sends thousands of chunks a second, and the built message costs a copy
/// of the data and half a dozen allocations each.
///
/// # Panics
/// If `data` is longer than `padded_len` (a caller bug).
pub fn encode_chunk_into(
    out: &mut Vec<u8>,
    id: u16,
    token: u8,
    index: Option<u16>,
    data: &[u8],
    padded_len: usize,
) {
    assert!(
        data.len() <= padded_len,
        "chunk data longer than its padded length"
    );
    const ZEROS: [u8; 64] = [0; 64];
    let padding = padded_len - data.len();
    let mut crc = crc32fast::Hasher::new();
    crc.update(data);
    let mut left = padding;
    while left > 0 {
        let n = left.min(ZEROS.len());
        crc.update(&ZEROS[..n]);
        left -= n;
    }
    let crc = crc.finalize().to_be_bytes();
    // The options' deltas and lengths are all below 13: one header byte each.
    const PATH_DELTA: u16 = OPTION_URI_PATH;
    const QUERY_DELTA: u16 = OPTION_URI_QUERY - OPTION_URI_PATH;
    const _: () = assert!(PATH_DELTA < 13 && QUERY_DELTA < 13);
    out.reserve(16 + padded_len);
    out.push((1 << 6) | (CON.bits() << 4) | 1);
    out.push(code::POST);
    out.extend_from_slice(&id.to_be_bytes());
    out.push(token);
    out.extend_from_slice(&[((PATH_DELTA as u8) << 4) | 1, b'c']);
    out.push(((QUERY_DELTA as u8) << 4) | 4);
    out.extend_from_slice(&crc);
    if let Some(index) = index {
        out.push(2);
        out.extend_from_slice(&index.to_be_bytes());
    }
    if padded_len > 0 {
        out.push(crate::coap::PAYLOAD_MARKER);
        out.extend_from_slice(data);
        out.resize(out.len() + padding, 0);
    }
}

/// NON CHANGED (CRC ok) or NON BAD_REQUEST (send it again).
pub fn chunk_received(id: u16, token: &[u8], ok: bool) -> CoapMessage {
    CoapMessage::new(NON, if ok { code::CHANGED } else { code::BAD_REQUEST }, id).with_token(token)
}

/// CON GET `c` listing missed chunk indexes, u16 each.
pub fn chunk_missed(id: u16, token: u8, indexes: &[u16]) -> CoapMessage {
    let payload: Vec<u8> = indexes.iter().flat_map(|i| i.to_be_bytes()).collect();
    CoapMessage::new(CON, code::GET, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"c")
        .with_payload(&payload)
}

/// CON PUT `u`: the image is complete.
pub fn update_done(id: u16, token: u8) -> CoapMessage {
    CoapMessage::new(CON, code::PUT, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"u")
}

/// ACK CHANGED for UpdateDone, as the firmware sends it.
pub fn update_done_ack(request_id: u16, token: &[u8]) -> CoapMessage {
    CoapMessage::new(ACK, code::CHANGED, request_id).with_token(token)
}

/// Trust policy rotation (docs/protocol.md §7.5), gateway → device: CON
/// POST `tp`, the `trellis.v1.SignedPolicy` bytes as payload.
pub fn trust_policy(id: u16, token: u8, signed_policy: &[u8]) -> CoapMessage {
    CoapMessage::new(CON, code::POST, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"tp")
        .with_payload(signed_policy)
}

/// The device's answer to [`trust_policy`], piggybacked on the request's
/// id and token: ACK 2.04 (accepted, stored, in force) when `refusal` is
/// `None`; else ACK with the refusal's code (4.03 or 4.06) and
/// `<reason_code>: <message>` as payload.
pub fn trust_policy_reply(
    request_id: u16,
    token: &[u8],
    refusal: Option<(u8, &str)>,
) -> CoapMessage {
    match refusal {
        None => CoapMessage::new(ACK, code::CHANGED, request_id).with_token(token),
        Some((c, reason)) => CoapMessage::new(ACK, c, request_id)
            .with_token(token)
            .with_payload(reason.as_bytes()),
    }
}

/// Cloud key announcement (docs/protocol.md §6.7): CON POST `ck`, payload
/// `version (u32 BE) || public key DER || signature (256 bytes)`
/// ([`crate::rotation::CloudKeyAnnouncement`]). The device answers ACK 2.04
/// (stored) or ACK 4.03 with its reason as UTF-8 payload.
pub fn cloud_key_announcement(id: u16, token: u8, payload: &[u8]) -> CoapMessage {
    CoapMessage::new(CON, code::POST, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"ck")
        .with_payload(payload)
}

/// Device key rotation request (§6.8): CON POST `dk`, no payload. The
/// device answers ACK 2.04 whose payload is its signed new key
/// ([`crate::rotation::DeviceKeyOffer`]), or ACK 4.03 with a reason.
pub fn device_key_rotate(id: u16, token: u8) -> CoapMessage {
    CoapMessage::new(CON, code::POST, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"dk")
}

/// Device key commit (§6.8): CON POST `nk`, payload the SHA-256 of the new
/// key's DER (32 bytes): keyvault registered it as the device's next key,
/// and the device uses it from its next handshake. ACK 2.04 or 4.03.
pub fn device_key_commit(id: u16, token: u8, key_sha256: &[u8; 32]) -> CoapMessage {
    CoapMessage::new(CON, code::POST, id)
        .with_token(&[token])
        .with_option(OPTION_URI_PATH, b"nk")
        .with_payload(key_sha256)
}

/// A piggybacked answer to a CON request: ACK with `code`, the request's id
/// and token, and `payload` (a key offer, or a refusal's reason).
pub fn piggybacked(request_id: u16, token: &[u8], code: u8, payload: &[u8]) -> CoapMessage {
    CoapMessage::new(ACK, code, request_id)
        .with_token(token)
        .with_payload(payload)
}

/// A request, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello(Hello),
    Ping,
    Describe,
    FunctionCall {
        name: String,
        argument: Vec<u8>,
        /// The signed command that came with the call, if any (§7.4).
        signed: Option<Vec<u8>>,
    },
    VariableRequest {
        name: String,
    },
    Event {
        public: bool,
        name: String,
        data: Vec<u8>,
    },
    Subscribe {
        prefix: String,
    },
    GetTime,
    /// Start (`true`) or stop signalling.
    Signal(bool),
    UpdateBegin(UpdateBegin),
    Chunk(Chunk),
    ChunkMissed(Vec<u16>),
    UpdateDone,
    /// A signed trust policy to replace the device's (§7.5): the
    /// `SignedPolicy` bytes, judged only by the device.
    TrustPolicy(Vec<u8>),
    /// A cloud key announcement (`ck`), its payload as sent.
    CloudKey(Vec<u8>),
    /// Rotate the device key (`dk`).
    RotateDeviceKey,
    /// Switch to the new device key (`nk`), its payload as sent.
    CommitDeviceKey(Vec<u8>),
}

impl Request {
    /// A stable lowercase name for logs, spans and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::Ping => "ping",
            Request::Describe => "describe",
            Request::FunctionCall { .. } => "function_call",
            Request::VariableRequest { .. } => "variable_request",
            Request::Event { .. } => "event",
            Request::Subscribe { .. } => "subscribe",
            Request::GetTime => "get_time",
            Request::Signal(_) => "signal",
            Request::UpdateBegin(_) => "update_begin",
            Request::Chunk(_) => "chunk",
            Request::ChunkMissed(_) => "chunk_missed",
            Request::UpdateDone => "update_done",
            Request::TrustPolicy(_) => "trust_policy",
            Request::CloudKey(_) => "cloud_key",
            Request::RotateDeviceKey => "rotate_device_key",
            Request::CommitDeviceKey(_) => "commit_device_key",
        }
    }
}

/// What an incoming message is. Responses are matched by the caller, by
/// token (separate replies) or message id (piggybacked ACKs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Request(Request),
    Response,
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, MessageError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| MessageError::NameNotUtf8 { what })
}

/// Joins the Uri-Path segments after the first with `/`: the firmware sends
/// one segment holding the whole name, a strict CoAP client would split it.
fn name_after_first(path: &[&[u8]], what: &'static str) -> Result<String, MessageError> {
    let rest = path.get(1..).unwrap_or_default();
    if rest.is_empty() {
        return Err(MessageError::MissingName { what });
    }
    utf8(&rest.join(&b'/'), what)
}

fn join_queries(m: &CoapMessage) -> Vec<u8> {
    m.uri_query().join(&b'&')
}

/// Classifies an incoming message by type, code and Uri-Path.
pub fn classify(m: &CoapMessage) -> Result<Incoming, MessageError> {
    if m.is_response() {
        return Ok(Incoming::Response);
    }
    let class = code::class(m.code);
    let detail = code::detail(m.code);
    if m.mtype == MessageType::Reset {
        return Ok(Incoming::Response);
    }
    if class != 0 {
        return Err(MessageError::ReservedCode { class, detail });
    }
    if m.code == code::EMPTY {
        return match m.mtype {
            MessageType::Confirmable => Ok(Incoming::Request(Request::Ping)),
            other => Err(MessageError::UnexpectedEmpty {
                mtype: other.name(),
            }),
        };
    }
    let path = m.uri_path();
    let first = path.first().copied().unwrap_or_default();
    let request = match (m.code, first) {
        (code::POST, b"h") => Request::Hello(Hello::parse(&m.payload)?),
        (code::GET, b"d") => Request::Describe,
        (code::POST, b"f") => Request::FunctionCall {
            name: name_after_first(&path, "function")?,
            argument: join_queries(m),
            signed: m
                .option_values(OPTION_SIGNED_COMMAND)
                .first()
                .map(|v| v.to_vec()),
        },
        (code::GET, b"v") => Request::VariableRequest {
            name: name_after_first(&path, "variable")?,
        },
        (code::POST, b"e") | (code::POST, b"E") => Request::Event {
            public: first == b"e",
            name: name_after_first(&path, "event")?,
            data: m.payload.clone(),
        },
        (code::GET, b"e") => Request::Subscribe {
            prefix: if path.len() > 1 {
                name_after_first(&path, "subscription")?
            } else {
                String::new()
            },
        },
        (code::GET, b"t") => Request::GetTime,
        (code::PUT, b"s") => {
            Request::Signal(m.uri_query().first().and_then(|q| q.first()) == Some(&1))
        }
        (code::POST, b"u") => Request::UpdateBegin(UpdateBegin::parse(&m.payload)?),
        (code::PUT, b"u") => Request::UpdateDone,
        (code::POST, b"tp") => Request::TrustPolicy(m.payload.clone()),
        (code::POST, b"c") => Request::Chunk(parse_chunk(m)?),
        (code::POST, b"ck") => Request::CloudKey(m.payload.clone()),
        (code::POST, b"dk") => Request::RotateDeviceKey,
        (code::POST, b"nk") => Request::CommitDeviceKey(m.payload.clone()),
        (code::GET, b"c") => {
            if !m.payload.len().is_multiple_of(2) {
                return Err(MessageError::ChunkMissedLength {
                    len: m.payload.len(),
                });
            }
            Request::ChunkMissed(
                m.payload
                    .chunks_exact(2)
                    .map(|p| u16::from_be_bytes([p[0], p[1]]))
                    .collect(),
            )
        }
        _ => {
            return Err(MessageError::UnknownRequest {
                mtype: m.mtype.name(),
                class,
                detail,
                path: path
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect::<Vec<_>>()
                    .join("/"),
            });
        }
    };
    Ok(Incoming::Request(request))
}

fn parse_chunk(m: &CoapMessage) -> Result<Chunk, MessageError> {
    let queries = m.uri_query();
    let crc_bytes = queries.first().ok_or(MessageError::ChunkMissingCrc)?;
    let crc = <[u8; 4]>::try_from(*crc_bytes).map_err(|_| MessageError::ChunkCrcLength {
        len: crc_bytes.len(),
    })?;
    let index = match queries.get(1) {
        None => None,
        Some(b) => Some(u16::from_be_bytes(
            <[u8; 2]>::try_from(*b).map_err(|_| MessageError::ChunkIndexLength { len: b.len() })?,
        )),
    };
    Ok(Chunk {
        crc: u32::from_be_bytes(crc),
        index,
        data: m.payload.clone(),
    })
}

/// A variable's type as Describe announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum VariableType {
    Bool = 1,
    Int = 2,
    String = 4,
    Double = 9,
}

impl VariableType {
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn name(self) -> &'static str {
        match self {
            VariableType::Bool => "bool",
            VariableType::Int => "int32",
            VariableType::String => "string",
            VariableType::Double => "double",
        }
    }
}

impl TryFrom<u8> for VariableType {
    type Error = MessageError;

    fn try_from(v: u8) -> Result<Self, MessageError> {
        match v {
            1 => Ok(VariableType::Bool),
            2 => Ok(VariableType::Int),
            4 => Ok(VariableType::String),
            9 => Ok(VariableType::Double),
            other => Err(MessageError::UnknownVariableType(other)),
        }
    }
}

/// A variable's value. Strings are raw bytes: firmware does not promise UTF-8.
#[derive(Debug, Clone, PartialEq)]
pub enum VariableValue {
    Bool(bool),
    Int(i32),
    String(Vec<u8>),
    Double(f64),
}

impl VariableValue {
    pub fn variable_type(&self) -> VariableType {
        match self {
            VariableValue::Bool(_) => VariableType::Bool,
            VariableValue::Int(_) => VariableType::Int,
            VariableValue::String(_) => VariableType::String,
            VariableValue::Double(_) => VariableType::Double,
        }
    }
}

impl fmt::Display for VariableValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VariableValue::Bool(b) => write!(f, "{b}"),
            VariableValue::Int(i) => write!(f, "{i}"),
            VariableValue::String(s) => write!(f, "{}", String::from_utf8_lossy(s)),
            VariableValue::Double(d) => write!(f, "{d}"),
        }
    }
}

fn fixed<const N: usize>(ty: VariableType, bytes: &[u8]) -> Result<[u8; N], MessageError> {
    <[u8; N]>::try_from(bytes).map_err(|_| MessageError::VariableValueLength {
        ty: ty.name(),
        expected: N,
        got: bytes.len(),
    })
}

/// Decodes a variable's wire value (double is little-endian, as devices send it).
pub fn decode_value(ty: VariableType, bytes: &[u8]) -> Result<VariableValue, MessageError> {
    Ok(match ty {
        VariableType::Bool => VariableValue::Bool(fixed::<1>(ty, bytes)?[0] != 0),
        VariableType::Int => VariableValue::Int(i32::from_be_bytes(fixed(ty, bytes)?)),
        VariableType::String => VariableValue::String(bytes.to_vec()),
        VariableType::Double => VariableValue::Double(f64::from_le_bytes(fixed(ty, bytes)?)),
    })
}

/// Encodes a variable's value for the wire.
pub fn encode_value(value: &VariableValue) -> Vec<u8> {
    match value {
        VariableValue::Bool(b) => vec![u8::from(*b)],
        VariableValue::Int(i) => i.to_be_bytes().to_vec(),
        VariableValue::String(s) => s.clone(),
        VariableValue::Double(d) => d.to_le_bytes().to_vec(),
    }
}

/// What a device exposes: `{"f":[functions],"v":{name:type}}`. Order is kept
/// as the device declared it, so a reply re-encodes byte for byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Describe {
    pub functions: Vec<String>,
    pub variables: Vec<(String, VariableType)>,
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

impl Describe {
    pub fn to_json(&self) -> Vec<u8> {
        let f: Vec<String> = self.functions.iter().map(|n| json_string(n)).collect();
        let v: Vec<String> = self
            .variables
            .iter()
            .map(|(n, t)| format!("{}:{}", json_string(n), t.code()))
            .collect();
        format!("{{\"f\":[{}],\"v\":{{{}}}}}", f.join(","), v.join(",")).into_bytes()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, MessageError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let d = de
            .deserialize_map(DescribeVisitor)
            .map_err(|e| MessageError::DescribeJson(e.to_string()))?;
        de.end()
            .map_err(|e| MessageError::DescribeJson(e.to_string()))?;
        Ok(d)
    }

    pub fn variable_type(&self, name: &str) -> Option<VariableType> {
        self.variables
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
    }
}

// A hand-written visitor because serde_json's default map type sorts keys,
// which would reorder the variables (and enabling `preserve_order` would
// change serde_json for the whole workspace).
struct DescribeVisitor;
struct VariablesInOrder(Vec<(String, VariableType)>);
struct VariablesVisitor;

impl<'de> Visitor<'de> for DescribeVisitor {
    type Value = Describe;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"an object {"f":[...],"v":{...}}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Describe, A::Error> {
        let mut d = Describe::default();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "f" => d.functions = map.next_value()?,
                "v" => d.variables = map.next_value::<VariablesInOrder>()?.0,
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(d)
    }
}

impl<'de> de::Deserialize<'de> for VariablesInOrder {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `any`, not `map`: some firmware sends `[]` for no variables.
        d.deserialize_any(VariablesVisitor)
    }
}

impl<'de> Visitor<'de> for VariablesVisitor {
    type Value = VariablesInOrder;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of variable name to type code (1, 2, 4 or 9)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<VariablesInOrder, A::Error> {
        let mut out = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            let ty: u8 = map.next_value()?;
            let ty = VariableType::try_from(ty).map_err(de::Error::custom)?;
            out.push((name, ty));
        }
        Ok(VariablesInOrder(out))
    }

    // Some firmware sends an empty list instead of an empty object.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<VariablesInOrder, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(VariablesInOrder(Vec::new()))
    }
}
