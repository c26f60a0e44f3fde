//! CPUID for the guest: the host's supported leaves minus the KVM signature and the features
//! our nested hosts cannot run, plus the Hyper-V leaves 0x40000000-0x4000000A.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Hyper-V privilege flags (0x40000003.EAX): SynIC MSRs, hypercall MSRs, VP index, frequency
/// MSRs, TSC invariant control.
pub const HV_PRIVILEGES_LOW: u32 = (1 << 2) | (1 << 5) | (1 << 6) | (1 << 11) | (1 << 15);
/// 0x40000003.EBX: PostMessages, SignalEvents.
pub const HV_PRIVILEGES_HIGH: u32 = (1 << 4) | (1 << 5);
/// 0x40000003.EDX: frequency registers available, guest crash MSRs.
pub const HV_FEATURES_EDX: u32 = (1 << 8) | (1 << 10);
/// 0x40000004.EAX: deprecate auto-EOI (mandatory: KVM's LAPIC cannot auto-EOI).
pub const HV_HINTS: u32 = 1 << 9;
/// Highest Hyper-V leaf.
pub const HV_MAX_LEAF: u32 = 0x4000_000a;

fn entry(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// Feature bits removed from leaf 1 ECX: CX16, XSAVE, OSXSAVE, AVX, FMA, F16C.
const LEAF1_ECX_HIDE: u32 = (1 << 13) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 12) | (1 << 29);
/// Leaf 7 EBX: AVX2, SMAP and the AVX-512 family.
const LEAF7_EBX_HIDE: u32 = (1 << 5)
    | (1 << 20)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);

/// Builds the CPUID of VP `vp` (APIC ID = VP index) from the host's supported entries.
pub fn guest_cpuid(supported: &[kvm_cpuid_entry2], vp: u32, vps: u32) -> Vec<kvm_cpuid_entry2> {
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !(0x4000_0000..0x5000_0000).contains(&e.function))
        .copied()
        .collect();
    for e in out.iter_mut() {
        match e.function {
            1 => {
                e.ecx &= !LEAF1_ECX_HIDE;
                e.ecx |= 1 << 31; // hypervisor present
                e.ebx = (e.ebx & 0x00ff_ffff) | (vp << 24);
            }
            7 if e.index == 0 => {
                e.ebx &= !LEAF7_EBX_HIDE;
            }
            0xb | 0x1f => {
                e.edx = vp;
            }
            0xd => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    out.push(entry(
        0x4000_0000,
        HV_MAX_LEAF,
        0x7263_694d,
        0x666f_736f,
        0x7648_2074,
    ));
    out.push(entry(0x4000_0001, 0x3123_7648, 0, 0, 0));
    out.push(entry(0x4000_0002, 20348, 0x000a_0000, 0, 0));
    out.push(entry(
        0x4000_0003,
        HV_PRIVILEGES_LOW,
        HV_PRIVILEGES_HIGH,
        0,
        HV_FEATURES_EDX,
    ));
    out.push(entry(0x4000_0004, HV_HINTS, 0xffff_ffff, 0, 0));
    out.push(entry(0x4000_0005, vps.max(1), vps.max(1), 0, 0));
    for f in 0x4000_0006..=HV_MAX_LEAF {
        out.push(entry(f, 0, 0, 0, 0));
    }
    out
}

pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, crate::VmmError> {
    CpuId::from_entries(entries).map_err(|e| crate::VmmError::Config(format!("CPUID table: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_signature_removed_and_hyperv_added() {
        let host = vec![
            entry(1, 0, 0x0001_0800, (1 << 13) | (1 << 26) | 1, 0),
            entry(0x4000_0000, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x4000_0100, 0x4000_0101, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x4000_0001, 0x1234, 0, 0, 0),
        ];
        let g = guest_cpuid(&host, 3, 4);
        let f = |leaf: u32| g.iter().filter(|e| e.function == leaf).collect::<Vec<_>>();
        assert_eq!(f(0x4000_0100).len(), 0);
        let base = f(0x4000_0000);
        assert_eq!(base.len(), 1);
        let sig: Vec<u8> = [base[0].ebx, base[0].ecx, base[0].edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig, b"Microsoft Hv");
        assert_eq!(f(0x4000_0001)[0].eax, 0x3123_7648);
        assert_eq!(f(0x4000_0003)[0].eax, 0x8864);
        assert_eq!(f(0x4000_0004)[0].eax & (1 << 9), 1 << 9);
        let l1 = f(1)[0];
        assert_eq!(l1.ecx & (1 << 13), 0);
        assert_eq!(l1.ecx & (1 << 26), 0);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_eq!(l1.ecx & 1, 1);
        assert_eq!(l1.ebx >> 24, 3);
    }
}
