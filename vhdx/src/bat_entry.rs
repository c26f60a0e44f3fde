//! A BAT entry: a 64-bit little-endian word, the state in bits 0..3 and the file offset in MiB
//! in bits 20..64 (docs/vhdx.md, "BAT").

use crate::format::MIB;

/// Payload block states.
pub const PB_NOT_PRESENT: u64 = 0;
pub const PB_UNDEFINED: u64 = 1;
pub const PB_ZERO: u64 = 2;
pub const PB_UNMAPPED: u64 = 3;
/// The value that version 0.95 of the format used for "unmapped".
pub const PB_UNMAPPED_V095: u64 = 5;
pub const PB_FULLY_PRESENT: u64 = 6;
pub const PB_PARTIALLY_PRESENT: u64 = 7;
/// The one "present" state of a sector-bitmap entry.
pub const SB_PRESENT: u64 = 6;

pub fn bat_state(e: u64) -> u64 {
    e & 7
}

pub fn bat_offset(e: u64) -> u64 {
    (e >> 20) << 20
}

pub fn bat_entry(state: u64, offset: u64) -> u64 {
    (offset & !(MIB - 1)) | state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_packs_state_and_offset() {
        let e = bat_entry(PB_FULLY_PRESENT, 5 * MIB);
        assert_eq!(e, (5 << 20) | 6);
        assert_eq!(bat_state(e), PB_FULLY_PRESENT);
        assert_eq!(bat_offset(e), 5 * MIB);
    }
}
