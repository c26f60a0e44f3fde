//! CHS geometry: the footer's cylinders/heads/sectors triple, and the size it stands for
//! (docs/vhd.md, "CHS geometry and the size rule").

use crate::limits::{MAX_CHS_SECTORS, SECTOR};

/// CHS geometry as (cylinders, heads, sectors per track) for `total` sectors, by the algorithm
/// of the specification's appendix: clamp, then 255 sectors per track above 65535*16*63.
pub fn chs_for_sectors(total: u64) -> (u16, u8, u8) {
    let total = total.min(MAX_CHS_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    let cyl = (cth / heads).min(65535);
    (cyl as u16, heads as u8, spt as u8)
}

/// Sectors a geometry addresses.
pub fn chs_sectors(g: (u16, u8, u8)) -> u64 {
    g.0 as u64 * g.1 as u64 * g.2 as u64
}

/// Smallest CHS-representable size >= `size` (qemu's create rounding), or None above the CHS
/// maximum.
pub fn round_to_chs(size: u64) -> Option<u64> {
    let total = size.div_ceil(SECTOR);
    if total > MAX_CHS_SECTORS {
        return None;
    }
    // The CHS capacity grows in steps of at most 255*16 sectors, so this loop is short.
    let mut i = 0u64;
    loop {
        let g = chs_for_sectors(total + i);
        let cap = chs_sectors(g);
        if cap >= total {
            return Some(cap * SECTOR);
        }
        i += 1;
        if total + i > MAX_CHS_SECTORS || i > 1 << 20 {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_examples() {
        // 127 GiB: 65278/16/255.
        assert_eq!(chs_for_sectors(266_338_304), (65278, 16, 255));
        // qemu's 4G default rounding: 8 389 584 sectors.
        assert_eq!(round_to_chs(4 << 30), Some(8_389_584 * 512));
        // Windows 4 MiB: 120/4/17.
        assert_eq!(chs_for_sectors(8192), (120, 4, 17));
        assert_eq!(round_to_chs((MAX_CHS_SECTORS + 1) * SECTOR), None);
    }
}
