//! The Hello payload, which grew over firmware generations (4, 6, 8, 22
//! bytes) and gained Trellis extensions; one parser accepts every prefix so a
//! gateway can talk to all of them.

use crate::DEVICE_ID_LEN;
use crate::error::MessageError;
use crate::id::DeviceId;

/// Hello flag bit 0: running an update applied since the last session.
pub const FLAG_UPDATED: u8 = 1;
/// Extension type carrying the SHA-256 of the running image.
pub const EXT_FIRMWARE_SHA256: u8 = 0x01;
/// Extension type announcing signed commands (docs/protocol.md §7.4): the
/// device enforces a command policy and understands the signed-command
/// option on function calls. Value: the SHA-256 of the policy (32 bytes),
/// then the last sequence number it accepted (u64, big-endian).
pub const EXT_COMMAND_POLICY: u8 = 0x02;
/// Length of the [`EXT_COMMAND_POLICY`] value.
pub const COMMAND_POLICY_LEN: usize = 40;
/// Extension type announcing cloud key rotation support (docs/protocol.md
/// §6.7): the device accepts a signed cloud key announcement (`ck`). Value:
/// the version of the cloud key the device holds (u32, big-endian).
pub const EXT_CLOUD_KEY_VERSION: u8 = 0x03;
/// Length of the [`EXT_CLOUD_KEY_VERSION`] value.
pub const CLOUD_KEY_VERSION_LEN: usize = 4;

/// Extension type announcing the device's firmware trust policy
/// (docs/protocol.md §7.5): value = policy version (u64, big-endian), then
/// the SHA-256 of the canonical policy bytes (32).
pub const EXT_TRUST_POLICY: u8 = 0x04;
/// Length of the [`EXT_TRUST_POLICY`] value.
pub const TRUST_POLICY_LEN: usize = 40;

/// The trust policy a device announces in its Hello.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrustPolicyReport {
    pub version: u64,
    /// SHA-256 of the canonical `TrustPolicyDoc` bytes.
    pub sha256: [u8; 32],
}

/// What a device with signed commands announces in its Hello.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandPolicyReport {
    /// SHA-256 of the command policy the device enforces.
    pub policy_sha256: [u8; 32],
    /// The highest sequence number it has accepted.
    pub last_sequence: u64,
}

/// A device's (or the server's) Hello. A field the sender cut short reads as
/// zero / `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hello {
    pub product_id: u16,
    pub firmware_version: u16,
    pub reserved: u8,
    pub flags: u8,
    pub platform_id: u16,
    pub device_id: Option<DeviceId>,
    pub firmware_sha256: Option<[u8; 32]>,
    /// Present when the device enforces signed commands.
    pub command_policy: Option<CommandPolicyReport>,
    /// Present when the device has a firmware trust policy (extension 0x04).
    pub trust_policy: Option<TrustPolicyReport>,
    /// Present when the device supports cloud key rotation: the version of
    /// the cloud key it holds.
    pub cloud_key_version: Option<u32>,
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

impl Hello {
    pub fn parse(payload: &[u8]) -> Result<Self, MessageError> {
        let mut h = Hello {
            product_id: be16(payload, 0).unwrap_or(0),
            firmware_version: be16(payload, 2).unwrap_or(0),
            reserved: payload.get(4).copied().unwrap_or(0),
            flags: payload.get(5).copied().unwrap_or(0),
            platform_id: be16(payload, 6).unwrap_or(0),
            device_id: None,
            firmware_sha256: None,
            command_policy: None,
            trust_policy: None,
            cloud_key_version: None,
        };
        let Some(id_len) = be16(payload, 8) else {
            return Ok(h);
        };
        let id_len = usize::from(id_len);
        if id_len != DEVICE_ID_LEN {
            return Err(MessageError::HelloDeviceIdLength { len: id_len });
        }
        let Some(id) = payload
            .get(10..10 + DEVICE_ID_LEN)
            .and_then(DeviceId::from_slice)
        else {
            return Ok(h);
        };
        h.device_id = Some(id);

        let mut at = 10 + DEVICE_ID_LEN;
        while at < payload.len() {
            let available = payload.len() - at;
            if available < 2 {
                return Err(MessageError::HelloExtensionTruncated {
                    offset: at,
                    needed: 2,
                    available,
                });
            }
            let ext_type = payload[at];
            let len = usize::from(payload[at + 1]);
            let Some(value) = payload.get(at + 2..at + 2 + len) else {
                return Err(MessageError::HelloExtensionTruncated {
                    offset: at,
                    needed: 2 + len,
                    available,
                });
            };
            if ext_type == EXT_FIRMWARE_SHA256 {
                let sha = <[u8; 32]>::try_from(value).map_err(|_| {
                    MessageError::HelloExtensionLength {
                        ext_type,
                        len,
                        expected: 32,
                    }
                })?;
                h.firmware_sha256 = Some(sha);
            } else if ext_type == EXT_COMMAND_POLICY {
                if len != COMMAND_POLICY_LEN {
                    return Err(MessageError::HelloExtensionLength {
                        ext_type,
                        len,
                        expected: COMMAND_POLICY_LEN,
                    });
                }
                let mut policy_sha256 = [0u8; 32];
                policy_sha256.copy_from_slice(&value[..32]);
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&value[32..]);
                h.command_policy = Some(CommandPolicyReport {
                    policy_sha256,
                    last_sequence: u64::from_be_bytes(seq),
                });
            } else if ext_type == EXT_TRUST_POLICY {
                if len != TRUST_POLICY_LEN {
                    return Err(MessageError::HelloExtensionLength {
                        ext_type,
                        len,
                        expected: TRUST_POLICY_LEN,
                    });
                }
                let mut version = [0u8; 8];
                version.copy_from_slice(&value[..8]);
                let mut sha256 = [0u8; 32];
                sha256.copy_from_slice(&value[8..]);
                h.trust_policy = Some(TrustPolicyReport {
                    version: u64::from_be_bytes(version),
                    sha256,
                });
            } else if ext_type == EXT_CLOUD_KEY_VERSION {
                let v = <[u8; CLOUD_KEY_VERSION_LEN]>::try_from(value).map_err(|_| {
                    MessageError::HelloExtensionLength {
                        ext_type,
                        len,
                        expected: CLOUD_KEY_VERSION_LEN,
                    }
                })?;
                h.cloud_key_version = Some(u32::from_be_bytes(v));
            }
            at += 2 + len;
        }
        Ok(h)
    }

    /// The 8-byte spark layout, 22 bytes with a device id, the full Trellis
    /// layout when the firmware hash or a command policy is known. An
    /// extension without an id is sent with an all-zero id, since
    /// extensions only follow the id.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            22 + 34 + 2 + COMMAND_POLICY_LEN + 2 + CLOUD_KEY_VERSION_LEN + 2 + TRUST_POLICY_LEN,
        );
        out.extend_from_slice(&self.product_id.to_be_bytes());
        out.extend_from_slice(&self.firmware_version.to_be_bytes());
        out.push(self.reserved);
        out.push(self.flags);
        out.extend_from_slice(&self.platform_id.to_be_bytes());
        if self.device_id.is_none()
            && self.firmware_sha256.is_none()
            && self.command_policy.is_none()
            && self.trust_policy.is_none()
            && self.cloud_key_version.is_none()
        {
            return out;
        }
        out.extend_from_slice(&(DEVICE_ID_LEN as u16).to_be_bytes());
        out.extend_from_slice(&self.device_id.unwrap_or_default().0);
        if let Some(sha) = &self.firmware_sha256 {
            out.push(EXT_FIRMWARE_SHA256);
            out.push(32);
            out.extend_from_slice(sha);
        }
        if let Some(policy) = &self.command_policy {
            out.push(EXT_COMMAND_POLICY);
            out.push(COMMAND_POLICY_LEN as u8);
            out.extend_from_slice(&policy.policy_sha256);
            out.extend_from_slice(&policy.last_sequence.to_be_bytes());
        }
        if let Some(version) = self.cloud_key_version {
            out.push(EXT_CLOUD_KEY_VERSION);
            out.push(CLOUD_KEY_VERSION_LEN as u8);
            out.extend_from_slice(&version.to_be_bytes());
        }
        if let Some(policy) = &self.trust_policy {
            out.push(EXT_TRUST_POLICY);
            out.push(TRUST_POLICY_LEN as u8);
            out.extend_from_slice(&policy.version.to_be_bytes());
            out.extend_from_slice(&policy.sha256);
        }
        out
    }

    pub fn updated(&self) -> bool {
        self.flags & FLAG_UPDATED != 0
    }
}
