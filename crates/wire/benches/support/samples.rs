//! One message of each type the protocol carries, as a session would send
//! it, plus fixed session material: shared by the criterion benchmarks
//! (`benches/wire.rs`) and the allocation table of `trellis-bench wire`,
//! so both measure the same bytes.
use trellis_wire::coap::CoapMessage;
use trellis_wire::hello::Hello;
use trellis_wire::message;
use trellis_wire::ota::{Chunk, UpdateBegin, chunk_crc};
use trellis_wire::{DeviceId, SessionMaterial};

pub fn material() -> SessionMaterial {
    let bytes: Vec<u8> = (0u8..40).collect();
    SessionMaterial::from_bytes(&bytes).expect("40 bytes")
}

pub fn samples() -> Vec<(&'static str, CoapMessage)> {
    let hello = Hello {
        product_id: 6,
        firmware_version: 3,
        reserved: 0,
        flags: 0,
        platform_id: 6,
        device_id: Some(DeviceId([0x42; 12])),
        firmware_sha256: Some([0x5a; 32]),
        command_policy: None,
        trust_policy: None,
        cloud_key_version: None,
    };
    let data = vec![0xab_u8; 256];
    let chunk = Chunk {
        crc: chunk_crc(&data),
        index: Some(7),
        data,
    };
    let begin = UpdateBegin {
        flags: 0,
        chunk_size: 256,
        file_size: 1 << 20,
        destination: 0,
        address: 0x0808_0000,
        manifest: Some(vec![0x11; 600]),
    };
    vec![
        ("hello", message::hello_device(1, &hello)),
        ("ping", message::ping(2)),
        ("ping_ack", message::ping_ack(2, &[0])),
        ("describe", message::describe(3, 1)),
        (
            "describe_reply",
            message::describe_reply(4, &[1], br#"{"f":["led","add"],"v":{"uptime":2,"temp":9}}"#),
        ),
        ("function_call", message::function_call(5, 2, "add", b"2,3")),
        ("function_return", message::function_return(6, &[2], 5)),
        ("variable_request", message::variable_request(7, 3, "temp")),
        (
            "variable_value",
            message::variable_value(7, &[3], &21.5f64.to_le_bytes()),
        ),
        (
            "event",
            message::event(8, true, "sim/telemetry", b"{\"t\":21.5}"),
        ),
        ("update_begin", message::update_begin(9, 4, &begin)),
        ("chunk_256", message::chunk(10, 5, &chunk)),
    ]
}
