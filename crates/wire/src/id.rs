//! Device identity as it travels on the wire (12 bytes) and as operators see
//! it (24 hex characters); kept apart so every layer parses ids the same way.

use std::fmt;
use std::str::FromStr;

use crate::DEVICE_ID_LEN;

/// A device id: 12 bytes, shown as 24 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceId(pub [u8; DEVICE_ID_LEN]);

/// Why a string is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("a device id is 24 hex characters, got {len} characters")]
    Length { len: usize },
    #[error("a device id is 24 hex characters, found {found:?} at position {position}")]
    NotHex { position: usize, found: char },
}

impl DeviceId {
    pub fn as_bytes(&self) -> &[u8; DEVICE_ID_LEN] {
        &self.0
    }

    /// Takes exactly 12 bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; DEVICE_ID_LEN]>::try_from(bytes).ok().map(DeviceId)
    }
}

impl From<[u8; DEVICE_ID_LEN]> for DeviceId {
    fn from(bytes: [u8; DEVICE_ID_LEN]) -> Self {
        DeviceId(bytes)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

fn hex_value(c: char) -> Option<u8> {
    c.to_digit(16).and_then(|d| u8::try_from(d).ok())
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let chars: Vec<char> = s.chars().collect();
        if chars.len() != DEVICE_ID_LEN * 2 {
            return Err(DeviceIdError::Length { len: chars.len() });
        }
        let mut out = [0u8; DEVICE_ID_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            let mut v = 0u8;
            for j in 0..2 {
                let position = i * 2 + j;
                let c = chars[position];
                let d = hex_value(c).ok_or(DeviceIdError::NotHex { position, found: c })?;
                v = (v << 4) | d;
            }
            *byte = v;
        }
        Ok(DeviceId(out))
    }
}
