//! Just enough x86-64 decoding to finish the instructions KVM's emulator on our nested hosts
//! gives up on (int3, fwait, ldmxcsr: docs/vmm.md, "Test hosts").

/// What the VMM can do for a failed instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixup {
    /// `int3`: skip it and inject #BP (as the CPU would: RIP after the instruction).
    Int3,
    /// `fwait`/`wait`: no pending x87 exceptions here; skip it.
    Fwait,
    /// `clac` (false) / `stac` (true): clear or set RFLAGS.AC (SMAP), 3 bytes.
    SetAc(bool),
    /// `ldmxcsr m32` / `vldmxcsr m32`: load MXCSR from the linear address.
    Ldmxcsr { addr: u64, len: usize },
}

/// Segment prefix that changes the linear address in 64-bit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegBase {
    None,
    Fs,
    Gs,
}

/// Register file in ModRM order: rax rcx rdx rbx rsp rbp rsi rdi r8..r15.
pub type Gprs = [u64; 16];

/// Decodes the instruction at `rip` (bytes `b`, at least what was readable).
pub fn classify(b: &[u8], rip: u64, gprs: &Gprs, fs_base: u64, gs_base: u64) -> Option<Fixup> {
    match b.first()? {
        0xcc => return Some(Fixup::Int3),
        0x9b => return Some(Fixup::Fwait),
        0x0f if b.get(1) == Some(&0x01) && b.get(2) == Some(&0xca) => {
            return Some(Fixup::SetAc(false))
        }
        0x0f if b.get(1) == Some(&0x01) && b.get(2) == Some(&0xcb) => {
            return Some(Fixup::SetAc(true))
        }
        _ => {}
    }
    let mut i = 0;
    let mut seg = SegBase::None;
    let mut addr32 = false;
    let mut rex = 0u8;
    // Legacy prefixes, then an optional REX.
    loop {
        match *b.get(i)? {
            0x64 => seg = SegBase::Fs,
            0x65 => seg = SegBase::Gs,
            0x67 => addr32 = true,
            0x66 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 => {}
            _ => break,
        }
        i += 1;
    }
    let (x, bb);
    match *b.get(i)? {
        0xc5 => {
            // Two-byte VEX: map 0F implied; R only (X and B are 0).
            let v = *b.get(i + 1)?;
            if v & 0x78 != 0x78 {
                return None; // vvvv must be 1111
            }
            x = false;
            bb = false;
            i += 2;
        }
        0xc4 => {
            let v1 = *b.get(i + 1)?;
            let v2 = *b.get(i + 2)?;
            if v1 & 0x1f != 1 || v2 & 0x78 != 0x78 {
                return None;
            }
            x = v1 & 0x40 == 0;
            bb = v1 & 0x20 == 0;
            i += 3;
        }
        r @ 0x40..=0x4f => {
            rex = r;
            i += 1;
            if *b.get(i)? != 0x0f {
                return None;
            }
            x = rex & 2 != 0;
            bb = rex & 1 != 0;
            i += 1;
        }
        0x0f => {
            x = false;
            bb = false;
            i += 1;
        }
        _ => return None,
    }
    let _ = rex;
    if *b.get(i)? != 0xae {
        return None;
    }
    i += 1;
    let modrm = *b.get(i)?;
    i += 1;
    let md = modrm >> 6;
    let reg = (modrm >> 3) & 7;
    let rm = modrm & 7;
    if md == 3 || reg != 2 {
        return None;
    }
    let mut ea: u64;
    let mut rip_relative = false;
    if rm == 4 {
        let sib = *b.get(i)?;
        i += 1;
        let scale = sib >> 6;
        let index = ((sib >> 3) & 7) | if x { 8 } else { 0 };
        let base = (sib & 7) | if bb { 8 } else { 0 };
        ea = if index == 4 {
            0
        } else {
            gprs[index as usize] << scale
        };
        if base & 7 == 5 && md == 0 {
            let d = i32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?);
            i += 4;
            ea = ea.wrapping_add(d as i64 as u64);
        } else {
            ea = ea.wrapping_add(gprs[base as usize]);
        }
    } else if rm == 5 && md == 0 {
        rip_relative = true;
        ea = 0;
    } else {
        ea = gprs[(rm | if bb { 8 } else { 0 }) as usize];
    }
    let disp: i64 = match md {
        0 if rip_relative => {
            let d = i32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?);
            i += 4;
            d as i64
        }
        1 => {
            let d = *b.get(i)? as i8;
            i += 1;
            d as i64
        }
        2 => {
            let d = i32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?);
            i += 4;
            d as i64
        }
        _ => 0,
    };
    ea = ea.wrapping_add(disp as u64);
    if rip_relative {
        ea = ea.wrapping_add(rip.wrapping_add(i as u64));
    }
    if addr32 {
        ea &= 0xffff_ffff;
    }
    ea = ea.wrapping_add(match seg {
        SegBase::None => 0,
        SegBase::Fs => fs_base,
        SegBase::Gs => gs_base,
    });
    Some(Fixup::Ldmxcsr { addr: ea, len: i })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> Gprs {
        let mut g = [0u64; 16];
        for (i, r) in g.iter_mut().enumerate() {
            *r = 0x1000 * (i as u64 + 1);
        }
        g
    }

    #[test]
    fn simple_ones() {
        let g = regs();
        assert_eq!(classify(&[0xcc, 0x90], 0, &g, 0, 0), Some(Fixup::Int3));
        assert_eq!(classify(&[0x9b], 0, &g, 0, 0), Some(Fixup::Fwait));
        assert_eq!(classify(&[0x90], 0, &g, 0, 0), None);
        assert_eq!(
            classify(&[0x0f, 0x01, 0xca, 0xfc], 0, &g, 0, 0),
            Some(Fixup::SetAc(false))
        );
        assert_eq!(
            classify(&[0x0f, 0x01, 0xcb], 0, &g, 0, 0),
            Some(Fixup::SetAc(true))
        );
    }

    #[test]
    fn ldmxcsr_forms() {
        let g = regs();
        // ldmxcsr (%rdi): 0f ae 17
        assert_eq!(
            classify(&[0x0f, 0xae, 0x17], 0, &g, 0, 0),
            Some(Fixup::Ldmxcsr {
                addr: 0x8000,
                len: 3
            })
        );
        // ldmxcsr 0x8(%rsp): 0f ae 54 24 08
        assert_eq!(
            classify(&[0x0f, 0xae, 0x54, 0x24, 0x08], 0, &g, 0, 0),
            Some(Fixup::Ldmxcsr {
                addr: 0x5008,
                len: 5
            })
        );
        // ldmxcsr 0x10(%rip): 0f ae 15 10 00 00 00 at rip 0x100
        assert_eq!(
            classify(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0], 0x100, &g, 0, 0),
            Some(Fixup::Ldmxcsr {
                addr: 0x117,
                len: 7
            })
        );
        // ldmxcsr (%r9): 41 0f ae 11
        assert_eq!(
            classify(&[0x41, 0x0f, 0xae, 0x11], 0, &g, 0, 0),
            Some(Fixup::Ldmxcsr {
                addr: 0xa000,
                len: 4
            })
        );
        // vldmxcsr -4(%rbp): c5 f8 ae 55 fc
        assert_eq!(
            classify(&[0xc5, 0xf8, 0xae, 0x55, 0xfc], 0, &g, 0, 0),
            Some(Fixup::Ldmxcsr {
                addr: 0x6000 - 4,
                len: 5
            })
        );
        // %gs:0x20 via SIB with no base: 65 0f ae 14 25 20 00 00 00
        assert_eq!(
            classify(
                &[0x65, 0x0f, 0xae, 0x14, 0x25, 0x20, 0, 0, 0],
                0,
                &g,
                0,
                0x5000_0000
            ),
            Some(Fixup::Ldmxcsr {
                addr: 0x5000_0020,
                len: 9
            })
        );
        // stmxcsr (reg 3) is not handled; register form neither.
        assert_eq!(classify(&[0x0f, 0xae, 0x1f], 0, &g, 0, 0), None);
        assert_eq!(classify(&[0x0f, 0xae, 0xd0], 0, &g, 0, 0), None);
        // Truncated input.
        assert_eq!(classify(&[0x0f, 0xae], 0, &g, 0, 0), None);
    }
}
