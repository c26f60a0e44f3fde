//! Allocation maps across a chain, with qemu-img map's meaning of the fields.

use crate::{Allocation, BlockDevice, Result};

/// One entry of `map` output (qemu-img's JSON keys: start, length, depth, present, zero, data,
/// offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapExtent {
    pub start: u64,
    pub length: u64,
    /// Layer that defines the bytes: 0 = the top image, 1 = its parent, ...; for ranges no layer
    /// defines, the depth of the bottom layer (as qemu-img reports it).
    pub depth: usize,
    /// Some layer defines these bytes.
    pub present: bool,
    /// The bytes read as zeros.
    pub zero: bool,
    /// The bytes are stored as data.
    pub data: bool,
    /// Host file offset of the data in the layer at `depth`, when known and contiguous.
    pub offset: Option<u64>,
}

/// Resolves the first run at `offset` through the chain.
pub fn status_through_chain(top: &dyn BlockDevice, offset: u64, len: u64) -> Result<MapExtent> {
    let mut layer: &dyn BlockDevice = top;
    let mut depth = 0;
    let mut len = len;
    loop {
        let e = layer.block_status(offset, len)?;
        len = e.len.min(len).max(1);
        match e.allocation {
            Allocation::Data { host_offset } => {
                return Ok(MapExtent {
                    start: offset,
                    length: len,
                    depth,
                    present: true,
                    zero: false,
                    data: true,
                    offset: host_offset,
                })
            }
            Allocation::Zero => {
                return Ok(MapExtent {
                    start: offset,
                    length: len,
                    depth,
                    present: true,
                    zero: true,
                    data: false,
                    offset: None,
                })
            }
            Allocation::Unallocated => match layer.backing() {
                Some(p) => {
                    layer = p.as_ref();
                    depth += 1;
                }
                None => {
                    return Ok(MapExtent {
                        start: offset,
                        length: len,
                        depth,
                        present: false,
                        zero: true,
                        data: false,
                        offset: None,
                    })
                }
            },
        }
    }
}

/// The whole map of `offset..offset+len`, adjacent equal extents merged (offsets must also be
/// contiguous to merge, as qemu-img does).
pub fn map_range(top: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
    let mut out: Vec<MapExtent> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let e = status_through_chain(top, pos, end - pos)?;
        pos += e.length;
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.length == b,
                (None, None) => true,
                _ => false,
            };
            if last.depth == e.depth
                && last.present == e.present
                && last.zero == e.zero
                && last.data == e.data
                && contiguous
            {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    Ok(out)
}

/// Iterates the top-level extents of a disk (merged view), calling `f` for each. Used by convert
/// and servers to skip holes without materialising the whole map.
pub fn for_each_extent(
    top: &dyn BlockDevice,
    mut f: impl FnMut(&MapExtent) -> Result<()>,
) -> Result<()> {
    let size = top.size();
    let mut pos = 0;
    while pos < size {
        let e = status_through_chain(top, pos, size - pos)?;
        f(&e)?;
        pos += e.length;
    }
    Ok(())
}
