//! The server side of the handshake, fed what a device sends.
//!
//! Input: `step` (the size of each read, 0 = everything in one read),
//! `extra` (bytes of what follows glued onto the read that completes the
//! 256, as a device that does not wait for the reply would send them), then
//! the device's byte stream: the 256-byte RSA ciphertext and, after the
//! server's reply, its encrypted frames.
//!
//! Runs `ServerHandshake::receive` over the reads (refusing anything past
//! 256 bytes), what keyvault does with the ciphertext once decrypted
//! (`HandshakePlaintext::parse`, the constant-time nonce check, the offered
//! public key's DER; see below for the decryption), `accept` with the vectors'
//! session material and reply, then the session: the device's frames
//! through the session cipher, CoAP, `classify` and the message counter.
//! The seeds are the vectors' handshake and conversation, so the fuzzer
//! starts from a complete valid session.

use rsa::pkcs8::DecodePublicKey;
use trellis_wire::coap::MessageType;
use trellis_wire::message::{Incoming, Request};
use trellis_wire::{
    CoapMessage, HANDSHAKE_CIPHERTEXT_LEN, HandshakePlaintext, IncomingCounter, ServerHandshake,
    SessionMaterial, classify, nonce_matches,
};

use crate::{Input, reads, vectors};

pub fn run(data: &[u8]) {
    drive(data);
}

/// How far a run got (the seeds are checked to get through).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reached {
    pub ciphertext: bool,
    /// Keyvault would go on: the plaintext parsed and echoed our nonce.
    pub nonce_ok: bool,
    /// Session messages the device got through the counter.
    pub messages: usize,
}

pub fn drive(data: &[u8]) -> Reached {
    let mut reached = Reached::default();
    let v = vectors::get();
    let mut input = Input::new(data);
    let step = usize::from(input.byte());
    let extra = usize::from(input.byte());
    let stream = input.rest();

    let mut hs = ServerHandshake::new(v.nonce);
    assert_eq!(hs.nonce(), &v.nonce);

    // Reads up to the 256th byte, the last one with `extra` bytes more.
    let head_len = stream.len().min(HANDSHAKE_CIPHERTEXT_LEN);
    let glued = stream.len().min(HANDSHAKE_CIPHERTEXT_LEN + extra);
    let mut pieces: Vec<&[u8]> = reads(&stream[..head_len], step).collect();
    if let Some(last) = pieces.last_mut()
        && head_len == HANDSHAKE_CIPHERTEXT_LEN
    {
        let start = HANDSHAKE_CIPHERTEXT_LEN - last.len();
        *last = &stream[start..glued];
    }
    let mut fed = 0usize;
    let mut ciphertext = None;
    for piece in pieces {
        if piece.is_empty() {
            continue;
        }
        match hs.receive(piece) {
            Ok(Some(ct)) => {
                fed += piece.len();
                assert_eq!(fed, HANDSHAKE_CIPHERTEXT_LEN);
                assert_eq!(&ct[..], &stream[..HANDSHAKE_CIPHERTEXT_LEN]);
                ciphertext = Some(ct);
            }
            Ok(None) => {
                fed += piece.len();
                assert!(
                    fed < HANDSHAKE_CIPHERTEXT_LEN,
                    "{fed} bytes in, no ciphertext"
                );
            }
            Err(_) => {
                assert!(
                    fed + piece.len() > HANDSHAKE_CIPHERTEXT_LEN,
                    "refused at {fed}"
                );
                return reached;
            }
        }
    }
    let material = SessionMaterial::from_bytes(&v.session_material).expect("material");
    let Some(ciphertext) = ciphertext else {
        assert!(fed < HANDSHAKE_CIPHERTEXT_LEN);
        assert!(
            hs.accept(material, &v.server_reply).is_err(),
            "accepted after {fed} bytes"
        );
        return reached;
    };
    reached.ciphertext = true;

    // Keyvault's part: decrypt, parse, compare the nonce. An RSA-2048
    // decryption per input would cost most of the run (tens of ms under
    // the sanitizer), so the vectors' ciphertext stands for the valid case
    // (decrypted once, in `vectors`) and any other ciphertext's bytes are
    // taken as the plaintext keyvault would have got: arbitrary bytes
    // either way, but ones the fuzzer controls.
    let plaintext: &[u8] = if ciphertext[..] == v.device_ciphertext[..] {
        &v.device_plaintext
    } else {
        &ciphertext
    };
    reached.nonce_ok = plaintext_checks(plaintext, &v.nonce);

    // A reply of the wrong length is refused; the vectors' one is taken.
    let (reply, mut cipher) = hs.accept(material, &v.server_reply).expect("accept");
    assert_eq!(reply, v.server_reply);

    // The session: what the device sends after the reply.
    let mut counter = IncomingCounter::new();
    let mut hello_seen = false;
    for piece in reads(&stream[glued..], step) {
        cipher.decoder.push(piece);
        loop {
            match cipher.decoder.next_message() {
                Ok(Some(plain)) => match session_message(&plain, &mut counter, &mut hello_seen) {
                    Some(counted) => reached.messages += usize::from(counted),
                    None => return reached,
                },
                Ok(None) => break,
                Err(_) => return reached,
            }
        }
    }
    reached
}

/// True when the plaintext parses and echoes `nonce`.
fn plaintext_checks(bytes: &[u8], nonce: &[u8; trellis_wire::NONCE_LEN]) -> bool {
    let Ok(p) = HandshakePlaintext::parse(bytes) else {
        assert!(bytes.len() < 52, "{} bytes refused", bytes.len());
        return false;
    };
    assert_eq!(p.to_bytes(), bytes);
    assert_eq!(nonce_matches(nonce, &p.nonce), &p.nonce == nonce);
    let shown = p.device_id.to_string();
    assert_eq!(
        shown.parse::<trellis_wire::DeviceId>().expect("id"),
        p.device_id
    );
    let _ = format!("{p:?}");
    if let Some(der) = &p.public_key_der
        && let Ok(key) = rsa::PublicKey::from_public_key_der(der)
    {
        // What keyvault names the offered key by.
        let _ = trellis_firmware::key_id(&key);
    }
    nonce_matches(nonce, &p.nonce)
}

/// The gateway's first steps with each message, as its session does:
/// CoAP; a CON or NON must be the Hello first (which starts the counter)
/// and then carry the previous id + 1; `classify`. `None`: the gateway
/// ends the session here. `Some(true)`: a message through the counter.
fn session_message(
    plain: &[u8],
    counter: &mut IncomingCounter,
    hello_seen: &mut bool,
) -> Option<bool> {
    let m = CoapMessage::decode(plain).ok()?;
    let classified = classify(&m);
    let request_flow = matches!(
        m.mtype,
        MessageType::Confirmable | MessageType::NonConfirmable
    );
    if !request_flow {
        return hello_seen.then_some(false);
    }
    if !*hello_seen {
        let Ok(Incoming::Request(Request::Hello(_))) = classified else {
            return None;
        };
        *hello_seen = true;
        counter.start(m.message_id);
        assert_eq!(counter.expected(), Some(m.message_id.wrapping_add(1)));
        return Some(true);
    }
    let expected = counter.expected().expect("started");
    let ok = counter.check(m.message_id).is_ok();
    assert_eq!(ok, m.message_id == expected);
    ok.then_some(true)
}
