//! The CoAP codec and the protocol's messages on top of it.
//!
//! Input: one CoAP message (a decrypted frame). Whatever decodes must
//! re-encode to bytes that decode to the same message and re-encode
//! identically; `classify` must not panic, and what it makes of a request
//! must survive the protocol's own builders (Hello, UpdateBegin, Chunk,
//! ChunkMissed, FunctionCall, Event, VariableRequest, Subscribe). The
//! payload also goes through the payload decoders (Describe JSON, variable
//! values, Hello, UpdateBegin).

use trellis_wire::message::{
    self, Describe, Incoming, Request, VariableType, decode_value, encode_value,
};
use trellis_wire::ota::{Chunk, UpdateBegin};
use trellis_wire::{CoapMessage, Hello, classify};

pub fn run(data: &[u8]) {
    payload_decoders(data);
    let Ok(m) = CoapMessage::decode(data) else {
        return;
    };
    let bytes = m.encode();
    let back = CoapMessage::decode(&bytes).expect("an encoded message decodes");
    assert_eq!(back, m);
    assert_eq!(back.encode(), bytes);
    let mut appended = vec![0xA5];
    m.encode_into(&mut appended);
    assert_eq!(&appended[1..], &bytes[..]);
    let _ = m.is_response();
    let _ = m.uri_path();
    if m.payload != data {
        payload_decoders(&m.payload);
    }

    let Ok(Incoming::Request(request)) = classify(&m) else {
        return;
    };
    let _ = request.kind();
    let id = m.message_id;
    let token = m.token.first().copied().unwrap_or(0);
    let rebuilt = match &request {
        Request::Hello(h) => {
            assert_eq!(&Hello::parse(&h.encode()).expect("own Hello"), h);
            message::hello_device(id, h)
        }
        Request::UpdateBegin(u) => {
            assert_eq!(
                &UpdateBegin::parse(&u.encode()).expect("own UpdateBegin"),
                u
            );
            message::update_begin(id, token, u)
        }
        Request::Chunk(c) => {
            // The in-place encoder is byte for byte the builder (CRC
            // computed over the data).
            let fresh = Chunk::new(c.index, c.data.clone());
            let mut out = Vec::new();
            message::encode_chunk_into(&mut out, id, token, c.index, &c.data, c.data.len());
            assert_eq!(out, message::chunk(id, token, &fresh).encode());
            message::chunk(id, token, c)
        }
        Request::ChunkMissed(ix) => message::chunk_missed(id, token, ix),
        Request::FunctionCall {
            name,
            argument,
            signed: None,
        } => message::function_call(id, token, name, argument),
        Request::FunctionCall {
            name,
            argument,
            signed: Some(signed),
        } => message::signed_function_call(id, token, name, argument, signed),
        Request::VariableRequest { name } => message::variable_request(id, token, name),
        Request::Signal(on) => message::signal(id, token, *on),
        Request::Event { public, name, data } => message::event(id, *public, name, data),
        Request::Subscribe { prefix } => message::subscribe(id, token, prefix),
        Request::Ping => message::ping(id),
        Request::Describe => message::describe(id, token),
        Request::GetTime => message::get_time(id, token),
        Request::UpdateDone => message::update_done(id, token),
        Request::TrustPolicy(bytes) => message::trust_policy(id, token, bytes),
        Request::CloudKey(p) => message::cloud_key_announcement(id, token, p),
        Request::RotateDeviceKey => message::device_key_rotate(id, token),
        // The parser takes any payload; the builder makes the 32 bytes a
        // commit carries, and other lengths are put in its place.
        Request::CommitDeviceKey(p) => message::device_key_commit(id, token, &[0; 32]).with_payload(p),
    };
    let again = CoapMessage::decode(&rebuilt.encode()).expect("a built message decodes");
    assert_eq!(
        classify(&again).expect("a built message classifies"),
        Incoming::Request(request),
        "{m:?} rebuilt as {again:?}"
    );
}

fn payload_decoders(payload: &[u8]) {
    let _ = Hello::parse(payload);
    let _ = UpdateBegin::parse(payload);
    if let Ok(d) = Describe::from_json(payload) {
        let json = d.to_json();
        assert_eq!(Describe::from_json(&json).expect("own Describe JSON"), d);
        for (name, ty) in &d.variables {
            assert!(d.variable_type(name).is_some());
            let _ = ty.name();
        }
    }
    for ty in [
        VariableType::Bool,
        VariableType::Int,
        VariableType::String,
        VariableType::Double,
    ] {
        assert_eq!(VariableType::try_from(ty.code()), Ok(ty));
        if let Ok(value) = decode_value(ty, payload) {
            assert_eq!(value.variable_type(), ty);
            let _ = value.to_string();
            let bytes = encode_value(&value);
            if ty == VariableType::Bool {
                assert_eq!(bytes, [u8::from(payload[0] != 0)]);
            } else {
                assert_eq!(bytes, payload);
            }
        }
    }
}
