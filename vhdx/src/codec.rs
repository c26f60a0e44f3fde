//! Reading and writing the typed on-disk structures (binrw) from and to byte buffers.

use std::io::Cursor;

use binrw::meta::{ReadEndian, WriteEndian};
use binrw::{BinRead, BinResult, BinWrite};
use disk::Guid;

/// Decodes a `T` from the start of `bytes`.
pub(crate) fn decode<T>(bytes: &[u8]) -> BinResult<T>
where
    T: BinRead + ReadEndian,
    for<'a> T::Args<'a>: Default,
{
    T::read(&mut Cursor::new(bytes))
}

/// Encodes `value` at the start of `out`. The callers size `out` for the structure (fixed
/// layouts of this crate), so running out of room is a bug, not bad input.
pub(crate) fn encode<T>(value: &T, out: &mut [u8])
where
    T: BinWrite + WriteEndian,
    for<'a> T::Args<'a>: Default,
{
    value
        .write(&mut Cursor::new(out))
        .expect("buffer sized for the structure");
}

/// Encodes `value` into a new buffer of exactly its size.
pub(crate) fn encode_vec<T>(value: &T) -> Vec<u8>
where
    T: BinWrite + WriteEndian,
    for<'a> T::Args<'a>: Default,
{
    let mut c = Cursor::new(Vec::new());
    value.write(&mut c).expect("writing to memory");
    c.into_inner()
}

/// VHDX stores GUIDs in Windows byte order (docs/vhdx.md, "GUIDs").
pub(crate) fn guid_from_disk(b: [u8; 16]) -> Guid {
    Guid::from_windows_bytes(b)
}

pub(crate) fn guid_to_disk(g: &Guid) -> [u8; 16] {
    g.to_windows_bytes()
}
