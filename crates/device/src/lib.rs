//! The device side of the Trellis protocol: a device SDK (identity on disk,
//! an async session driving `trellis-wire`, a pluggable application) and the
//! fleet simulator that runs thousands of such devices as tasks for load and
//! failover tests. Devices accept only signed firmware their trust policy
//! allows (`trellis-firmware`), and report refusals as the private event
//! `trellis/ota/rejected`.

pub mod app;
pub mod failover;
pub mod identity;
pub mod keys;
pub mod session;
pub mod sim;

pub use app::{DemoApp, DeviceApp};
pub use identity::{
    DeviceIdentity, IdentityError, POLICY_FILE, generate_device_key, load_fleet, load_trust_policy,
    write_cloud_key, write_identity, write_trust_policy,
};
pub use keys::{DeviceKeys, SharedKeys};
pub use session::{Session, SessionConfig, SessionEnd, SessionError, SessionEvent};
pub use sim::{DeviceReport, SimConfig, run_fleet};
