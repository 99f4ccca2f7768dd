//! Firmware transfer payloads: UpdateBegin (spark's 12 bytes plus the Trellis
//! manifest) and the CRC-checked, zero-padded chunks.

use crate::error::MessageError;

/// UpdateBegin: spark's 12 bytes, then optionally a u16-length manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateBegin {
    pub flags: u8,
    pub chunk_size: u16,
    pub file_size: u32,
    pub destination: u8,
    pub address: u32,
    pub manifest: Option<Vec<u8>>,
}

impl UpdateBegin {
    /// Bytes after the manifest are ignored, so a later extension does not
    /// break today's devices; a manifest cut short is an error.
    pub fn parse(payload: &[u8]) -> Result<Self, MessageError> {
        let Some(head) = payload.get(..12) else {
            return Err(MessageError::UpdateBeginTooShort { len: payload.len() });
        };
        let rest = &payload[12..];
        let manifest = match rest {
            [] => None,
            [_] => {
                return Err(MessageError::ManifestTruncated {
                    declared: 2,
                    available: 1,
                });
            }
            [hi, lo, body @ ..] => {
                let declared = usize::from(u16::from_be_bytes([*hi, *lo]));
                let m = body
                    .get(..declared)
                    .ok_or(MessageError::ManifestTruncated {
                        declared,
                        available: body.len(),
                    })?;
                Some(m.to_vec())
            }
        };
        Ok(UpdateBegin {
            flags: head[0],
            chunk_size: u16::from_be_bytes([head[1], head[2]]),
            file_size: u32::from_be_bytes([head[3], head[4], head[5], head[6]]),
            destination: head[7],
            address: u32::from_be_bytes([head[8], head[9], head[10], head[11]]),
            manifest,
        })
    }

    /// A manifest longer than 65535 bytes is truncated to what the u16 length
    /// can describe (manifests are a few hundred bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.manifest.as_ref().map_or(0, |m| m.len() + 2));
        out.push(self.flags);
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.file_size.to_be_bytes());
        out.push(self.destination);
        out.extend_from_slice(&self.address.to_be_bytes());
        if let Some(m) = &self.manifest {
            let len = u16::try_from(m.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&m[..usize::from(len)]);
        }
        out
    }
}

/// CRC-32 (zlib/IEEE) of a padded chunk, as sent in its Uri-Query.
pub fn chunk_crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Splits an image into `chunk_size` chunks, the last zero-padded (the CRC
/// covers the padding). A `chunk_size` of 0 is treated as 1.
pub fn padded_chunks(image: &[u8], chunk_size: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let size = chunk_size.max(1);
    image.chunks(size).map(move |c| {
        let mut v = c.to_vec();
        v.resize(size, 0);
        v
    })
}

/// One chunk as carried by a Chunk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub crc: u32,
    pub index: Option<u16>,
    pub data: Vec<u8>,
}

impl Chunk {
    /// A chunk with its CRC computed over `data`.
    pub fn new(index: Option<u16>, data: Vec<u8>) -> Self {
        Chunk {
            crc: chunk_crc(&data),
            index,
            data,
        }
    }

    pub fn crc_ok(&self) -> bool {
        chunk_crc(&self.data) == self.crc
    }
}
