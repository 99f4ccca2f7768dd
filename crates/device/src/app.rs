//! What a device exposes to the cloud (functions, variables, event data),
//! behind a trait so the session loop stays the same for any application.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use trellis_wire::message::{Describe, VariableType, VariableValue};

/// A device application. Calls run on the session task: keep them quick.
pub trait DeviceApp: Send + Sync {
    fn describe(&self) -> Describe;
    /// `None` if there is no such function.
    fn call(&self, name: &str, argument: &[u8]) -> Option<i32>;
    /// `None` if there is no such variable.
    fn read(&self, name: &str) -> Option<VariableValue>;
    /// Data for the periodic event.
    fn event_data(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// The simulator's default application: `led`, `add`, `uptime`, `temp`.
pub struct DemoApp {
    started: Instant,
    led: AtomicBool,
    temp: f64,
}

impl Default for DemoApp {
    fn default() -> Self {
        DemoApp::new(21.5)
    }
}

impl DemoApp {
    pub fn new(temp: f64) -> Self {
        DemoApp {
            started: Instant::now(),
            led: AtomicBool::new(false),
            temp,
        }
    }

    pub fn led(&self) -> bool {
        self.led.load(Ordering::Relaxed)
    }

    fn add(argument: &[u8]) -> Option<i32> {
        let text = std::str::from_utf8(argument).ok()?;
        let (a, b) = text.split_once(',')?;
        a.trim()
            .parse::<i32>()
            .ok()?
            .checked_add(b.trim().parse::<i32>().ok()?)
    }
}

impl DeviceApp for DemoApp {
    fn describe(&self) -> Describe {
        Describe {
            functions: vec!["led".into(), "add".into()],
            variables: vec![
                ("uptime".into(), VariableType::Int),
                ("temp".into(), VariableType::Double),
            ],
        }
    }

    fn call(&self, name: &str, argument: &[u8]) -> Option<i32> {
        match name {
            "led" => Some(match argument {
                b"on" => {
                    self.led.store(true, Ordering::Relaxed);
                    1
                }
                b"off" => {
                    self.led.store(false, Ordering::Relaxed);
                    0
                }
                _ => -1,
            }),
            "add" => Some(DemoApp::add(argument).unwrap_or(-1)),
            _ => None,
        }
    }

    fn read(&self, name: &str) -> Option<VariableValue> {
        match name {
            "uptime" => Some(VariableValue::Int(
                i32::try_from(self.started.elapsed().as_secs()).unwrap_or(i32::MAX),
            )),
            "temp" => Some(VariableValue::Double(self.temp)),
            _ => None,
        }
    }

    fn event_data(&self) -> Vec<u8> {
        format!("{:.1}", self.temp).into_bytes()
    }
}
