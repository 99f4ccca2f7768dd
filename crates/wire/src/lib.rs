//! trellis-wire
