//! Device sessions end to end: one keyvault, two gateways, simulated devices
//! on both, operator requests through either gateway.
use std::time::Duration;
use trellis_device::sim::{DeviceReport, SimConfig, run_fleet};
use trellis_proto::v1::variable_value::Value;
use trellis_proto::v1::*;
use trellis_tests::{Cluster, eventually};

fn sim_config(image: &[u8]) -> SimConfig {
    SimConfig {
        product_id: 1,
        firmware_version: 7,
        firmware_image: image.to_vec(),
        event_interval: Some(Duration::from_millis(300)),
        event_name: "temperature".into(),
        keepalive: Duration::from_secs(15),
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_gateways_events_calls_and_variables() -> anyhow::Result<()> {
    let cluster = Cluster::start(2).await?;
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for i in 0..6 {
        let id = cluster.provision(1).await?;
        if i % 2 == 0 {
            on_a.push(id)
        } else {
            on_b.push(id)
        }
    }
    let a_ids: Vec<String> = on_a.iter().map(|d| d.device_id.to_string()).collect();
    let b_ids: Vec<String> = on_b.iter().map(|d| d.device_id.to_string()).collect();
    let image = b"firmware image v7".to_vec();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&image));

    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(run_fleet(
        on_a,
        sim_config(&image),
        vec![cluster.gateways[0].devices.to_string()],
        stop.clone(),
        tx.clone(),
    ));
    tokio::spawn(run_fleet(
        on_b,
        sim_config(&image),
        vec![cluster.gateways[1].devices.to_string()],
        stop.clone(),
        tx,
    ));

    let mut gw_a = cluster.gateway_client(0).await?;
    let mut gw_b = cluster.gateway_client(1).await?;

    // Everyone comes online, on the gateway they dialled, reporting the
    // SHA-256 of their image from Hello.
    let listed = eventually(Duration::from_secs(30), "all devices online", || {
        let mut gw = gw_b.clone();
        async move {
            let list = gw
                .list_devices(ListDeviceStatesRequest {
                    product_id: 0,
                    online_only: true,
                })
                .await
                .ok()?
                .into_inner();
            (list.devices.len() == 6
                && list
                    .devices
                    .iter()
                    .all(|d| !d.firmware_sha256.is_empty() && !d.functions.is_empty()))
            .then_some(list)
        }
    })
    .await?;
    for d in &listed.devices {
        assert_eq!(d.firmware_sha256, sha, "Hello SHA-256 of {}", d.device_id);
        assert_eq!(d.firmware_version, 7);
        let expected_gw = if a_ids.contains(&d.device_id) {
            "gw-1"
        } else {
            "gw-2"
        };
        assert_eq!(d.gateway_id, expected_gw, "owner of {}", d.device_id);
        assert!(
            d.functions.contains(&"add".to_string()) && d.functions.contains(&"led".to_string())
        );
        assert_eq!(d.variables.get("temp").map(String::as_str), Some("double"));
    }

    // A call sent to gateway B for a device on gateway A is routed to A and
    // answered by the device.
    let target = &a_ids[0];
    let r = gw_b
        .call_function(CallFunctionRequest {
            device_id: target.clone(),
            function: "add".into(),
            argument: "2,3".into(),
            timeout_ms: 0,
            signed_command: Vec::new(),
        })
        .await?
        .into_inner();
    assert_eq!(r.return_value, 5);
    let r = gw_b
        .call_function(CallFunctionRequest {
            device_id: target.clone(),
            function: "led".into(),
            argument: "on".into(),
            timeout_ms: 0,
            signed_command: Vec::new(),
        })
        .await?
        .into_inner();
    assert_eq!(r.return_value, 1);
    // And the other way round, and locally.
    let r = gw_a
        .call_function(CallFunctionRequest {
            device_id: b_ids[0].clone(),
            function: "add".into(),
            argument: "40,2".into(),
            timeout_ms: 0,
            signed_command: Vec::new(),
        })
        .await?
        .into_inner();
    assert_eq!(r.return_value, 42);
    let r = gw_a
        .call_function(CallFunctionRequest {
            device_id: a_ids[1].clone(),
            function: "led".into(),
            argument: "off".into(),
            timeout_ms: 0,
            signed_command: Vec::new(),
        })
        .await?
        .into_inner();
    assert_eq!(r.return_value, 0);

    // Variables, typed by the device's Describe.
    let v = gw_b
        .get_variable(GetVariableRequest {
            device_id: target.clone(),
            name: "temp".into(),
            timeout_ms: 0,
        })
        .await?
        .into_inner();
    assert_eq!(v.r#type, "double");
    assert!(matches!(v.value.and_then(|v| v.value), Some(Value::DoubleValue(t)) if t.is_finite()));
    let v = gw_b
        .get_variable(GetVariableRequest {
            device_id: target.clone(),
            name: "uptime".into(),
            timeout_ms: 0,
        })
        .await?
        .into_inner();
    assert_eq!(v.r#type, "int32");
    assert!(matches!(v.value.and_then(|v| v.value), Some(Value::IntValue(u)) if u >= 0));

    // Events the devices publish are readable through either gateway.
    let mut events = gw_a
        .stream_events(StreamEventsRequest {
            device_id: b_ids[1].clone(),
            prefix: "temp".into(),
            from_start: true,
        })
        .await?
        .into_inner();
    let event = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await??
        .expect("an event");
    assert_eq!(event.device_id, b_ids[1]);
    assert_eq!(event.name, "temperature");
    assert_eq!(event.gateway_id, "gw-2");

    // Clear errors: an unknown device, a malformed id, an offline device.
    let err = gw_a
        .call_function(CallFunctionRequest {
            device_id: "zz".into(),
            function: "add".into(),
            argument: String::new(),
            timeout_ms: 0,
            signed_command: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let offline = cluster.provision(1).await?;
    let err = gw_a
        .call_function(CallFunctionRequest {
            device_id: offline.device_id.to_string(),
            function: "add".into(),
            argument: "1,1".into(),
            timeout_ms: 0,
            signed_command: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("offline"), "{}", err.message());
    let err = gw_a
        .get_variable(GetVariableRequest {
            device_id: target.clone(),
            name: "nope".into(),
            timeout_ms: 2000,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::NotFound | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );

    // Every device reported its handshake.
    let mut connected = 0;
    while let Ok(r) = reports.try_recv() {
        if matches!(r, DeviceReport::Connected { .. }) {
            connected += 1;
        }
    }
    assert!(connected >= 6, "{connected} handshakes reported");
    stop.cancel();
    cluster.stop().await;
    Ok(())
}
