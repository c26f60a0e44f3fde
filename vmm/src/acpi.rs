//! ACPI tables: RSDP → XSDT → {FADT (hardware-reduced), MADT}, DSDT with COM1 and the VMBus
//! device. Written into the reserved BIOS area at 0xE0000.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::Aml;

use crate::layout::{BIOS_END, IOAPIC_ADDR, LAPIC_ADDR, RSDP_ADDR};
use crate::memory::GuestRam;
use crate::VmmError;

const OEM_ID: [u8; 6] = *b"VIRIDN";
const OEM_TABLE_ID: [u8; 8] = *b"VIRIDIAN";

/// I/O port of the hardware-reduced sleep control/status register (poweroff).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// SLP_EN in the sleep control register.
pub const SLEEP_ENABLE: u8 = 0x20;

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// A standard 36-byte table header around `body`, checksummed.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"VRDN");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The DSDT's AML: COM1 (IRQ 4), the VMBus device with an empty _CRS, and _S5_.
pub fn dsdt_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let irq4 = aml::Interrupt::new(true, true, false, false, 4);
    let io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_crs = aml::ResourceTemplate::new(vec![&irq4, &io]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid0 = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs_name = aml::Name::new("_CRS".into(), &com1_crs);
    aml::Device::new("_SB_.COM1".into(), vec![&com1_hid, &uid0, &com1_crs_name])
        .to_aml_bytes(&mut out);
    // Linux matches _HID "VMBUS" or "VMBus" and requires a _CRS (empty on x86: an IRQ there
    // would be taken for an ARM64 INTID).
    let empty_crs = aml::ResourceTemplate::new(vec![]);
    let vmbus_hid = aml::Name::new("_HID".into(), &"VMBUS");
    let vmbus_ddn = aml::Name::new("_DDN".into(), &"VMBUS");
    let crs_empty = aml::Name::new("_CRS".into(), &empty_crs);
    let vmbus = aml::Device::new(
        "VMBS".into(),
        vec![&vmbus_hid, &uid0, &vmbus_ddn, &crs_empty],
    );
    let parent_hid = aml::Name::new("_HID".into(), &"ACPI0004");
    aml::Device::new(
        "_SB_.VMOD".into(),
        vec![&parent_hid, &uid0, &crs_empty, &vmbus],
    )
    .to_aml_bytes(&mut out);
    let s5 = aml::Package::new(vec![&5u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut out);
    out
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // no 8259 (PCAT_COMPAT clear)
    for i in 0..cpus {
        body.extend_from_slice(&[0, 8, i, i]);
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    table(b"APIC", 4, &body)
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Writes all tables; returns the RSDP address.
pub fn write_tables(ram: &GuestRam, cpus: u8) -> Result<u64, VmmError> {
    let memerr = |e: crate::memory::GuestMemError| VmmError::Memory(format!("ACPI tables: {e}"));
    let xsdt_addr = RSDP_ADDR + 0x40;
    // XSDT with two entries.
    let fadt_addr = align16(xsdt_addr + 36 + 16);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let madt_addr = align16(fadt_addr + fadt_len);
    let madt = madt(cpus);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let dsdt = table(b"DSDT", 2, &dsdt_aml());
    if dsdt_addr + dsdt.len() as u64 > BIOS_END {
        return Err(VmmError::Config(
            "ACPI tables do not fit the BIOS area".into(),
        ));
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    // IAPC_BOOT_ARCH: VGA not present, PCIe ASPM controls off.
    fadt.iapc_boot_arch = ((1u16 << 2) | (1 << 4)).into();
    let sleep = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    fadt.sleep_control_reg = sleep;
    fadt.sleep_status_reg = sleep;
    let mut fadt_bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut fadt_bytes);

    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_addr.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = table(b"XSDT", 1, &xsdt_body);

    let mut rsdp = acpi_tables::rsdp::Rsdp::new(OEM_ID, xsdt_addr);
    rsdp.length = 36.into();
    let mut rsdp_bytes = Vec::new();
    rsdp.to_aml_bytes(&mut rsdp_bytes);

    ram.write(RSDP_ADDR, &rsdp_bytes).map_err(memerr)?;
    ram.write(xsdt_addr, &xsdt).map_err(memerr)?;
    ram.write(fadt_addr, &fadt_bytes).map_err(memerr)?;
    ram.write(madt_addr, &madt).map_err(memerr)?;
    ram.write(dsdt_addr, &dsdt).map_err(memerr)?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_checksum_and_contain_vmbus() {
        let ram = GuestRam::new(64 << 20).unwrap();
        write_tables(&ram, 2).unwrap();
        let mut rsdp = [0u8; 36];
        ram.read(RSDP_ADDR, &mut rsdp).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let mut hdr = [0u8; 52];
        ram.read(xsdt, &mut hdr).unwrap();
        assert_eq!(&hdr[..4], b"XSDT");
        assert_eq!(hdr.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let aml = dsdt_aml();
        let find = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"VMBUS\0"));
        assert!(find(b"VMBS"));
        // An empty resource template: BufferOp, length, size 2, end tag.
        assert!(find(&[0x11, 0x05, 0x0a, 0x02, 0x79, 0x00]));
        let m = madt(2);
        assert_eq!(m.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(m.len(), 36 + 8 + 2 * 8 + 12);
    }
}
