//! The device side of the Trellis protocol: a device SDK (identity on disk,
//! an async session driving `trellis-wire`, a pluggable application) and the
//! fleet simulator that runs thousands of such devices as tasks for load and
//! failover tests.

pub mod app;
pub mod identity;
pub mod session;
pub mod sim;

pub use app::{DemoApp, DeviceApp};
pub use identity::{
    DeviceIdentity, IdentityError, generate_device_key, load_fleet, write_cloud_key, write_identity,
};
pub use session::{Session, SessionConfig, SessionError, SessionEvent};
pub use sim::{DeviceReport, SimConfig, run_fleet};
