//! trellis-device
