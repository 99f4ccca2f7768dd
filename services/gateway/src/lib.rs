//! trellis-gateway
