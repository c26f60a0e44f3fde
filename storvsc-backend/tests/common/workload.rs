//! Scan and mixed queued I/O against the simulated guest, checked byte for byte against a
//! model of each LUN.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use disk::BlockDevice;
use storvsc_backend::scsi::opcode;
use storvsc_backend::vstor::direction;

use super::guest::{assert_good, cdb_rw10, cdb_rw16, Guest, Sg, PAGE};

/// What the scan found about one LUN.
#[derive(Debug, Clone)]
pub struct LunInfo {
    pub lun: u8,
    pub block_size: u32,
    pub blocks: u64,
    pub lbpme: bool,
    pub lbprz: bool,
}

/// Linux's scan: REPORT LUNS, INQUIRY, VPD pages, READ CAPACITY(16), MODE SENSE.
pub fn scan(g: &mut Guest) -> Vec<LunInfo> {
    // Targets other than 0:0 answer INQUIRY with PQ 3 (nothing here).
    let inq = [0x12, 0, 0, 0, 36, 0];
    let (p, d) = g.scsi_at((0, 1, 0), &inq, direction::READ, 36, None);
    assert_good(&p);
    assert_eq!(d[0], 0x7F);
    let mut rl = [0u8; 12];
    rl[0] = opcode::REPORT_LUNS;
    rl[6..10].copy_from_slice(&1024u32.to_be_bytes());
    let (p, d) = g.scsi(0, &rl, direction::READ, 1024, None);
    assert_good(&p);
    let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize / 8;
    assert_eq!(p.data_transfer_length() as usize, 8 + 8 * n);
    let luns: Vec<u8> = (0..n).map(|i| d[8 + 8 * i + 1]).collect();
    let mut out = Vec::new();
    for &lun in &luns {
        let (p, d) = g.scsi(lun, &inq, direction::READ, 36, None);
        assert_good(&p);
        assert_eq!(d[0], 0);
        assert_eq!(&d[8..16], b"Msft    ");
        let add = d[4] as u32 + 5;
        let (p, d) = g.scsi(
            lun,
            &[0x12, 0, 0, 0, add as u8, 0],
            direction::READ,
            add,
            None,
        );
        assert_good(&p);
        assert_eq!(p.data_transfer_length(), add);
        assert_eq!(&d[16..32], b"Virtual Disk    ");
        // VPD 0: supported pages, then each.
        let (p, d) = g.scsi(lun, &[0x12, 1, 0, 0, 255, 0], direction::READ, 255, None);
        assert_good(&p);
        let pages = d[4..4 + d[3] as usize].to_vec();
        assert_eq!(pages, vec![0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
        for &pg in &pages[1..] {
            let (p, d) = g.scsi(lun, &[0x12, 1, pg, 0, 255, 0], direction::READ, 255, None);
            assert_good(&p);
            assert_eq!(d[1], pg);
            let len = u16::from_be_bytes([d[2], d[3]]) as u32 + 4;
            assert_eq!(p.data_transfer_length(), len);
            if pg == 0x83 {
                assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 16]);
                assert_eq!(d[8] >> 4, 6, "NAA 6");
            }
            if pg == 0xB0 {
                assert_eq!(len, 64);
            }
        }
        // Unsupported VPD page: CHECK CONDITION / invalid field, no data.
        let (p, _) = g.scsi(lun, &[0x12, 1, 0xC7, 0, 255, 0], direction::READ, 255, None);
        assert_eq!(super::guest::sense_of(&p), (5, 0x24));
        assert_eq!(p.data_transfer_length(), 0);
        let mut rc = [0u8; 16];
        rc[0] = opcode::SERVICE_ACTION_IN_16;
        rc[1] = 0x10;
        rc[13] = 32;
        let (p, d) = g.scsi(lun, &rc, direction::READ, 32, None);
        assert_good(&p);
        let blocks = u64::from_be_bytes(d[0..8].try_into().unwrap()) + 1;
        let block_size = u32::from_be_bytes(d[8..12].try_into().unwrap());
        // MODE SENSE(10) caching page: WCE.
        let ms = [0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0];
        let (p, d) = g.scsi(lun, &ms, direction::READ, 255, None);
        assert_good(&p);
        assert_eq!(d[8], 0x08);
        assert_eq!(d[10] & 0x04, 0x04);
        assert_eq!(d[3] & 0x80, 0, "not write protected");
        let (p, _) = g.scsi(lun, &[0, 0, 0, 0, 0, 0], direction::NONE, 0, None);
        assert_good(&p);
        let (_, d) = g.scsi(lun, &rc, direction::READ, 32, None);
        out.push(LunInfo {
            lun,
            block_size,
            blocks,
            lbpme: d[14] & 0x80 != 0,
            lbprz: d[14] & 0x40 != 0,
        });
    }
    out
}

#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub read: u64,
    pub write: u64,
    pub unmap: u64,
    pub sync: u64,
    /// Transfer sizes in bytes: min and max (multiples of the block size are chosen).
    pub min_bytes: u32,
    pub max_bytes: u32,
    pub verify: bool,
    /// Use random (8-byte aligned) offsets into the first page instead of page-aligned buffers.
    pub scatter_offsets: bool,
}

impl Mix {
    pub fn mixed() -> Mix {
        Mix {
            read: 45,
            write: 40,
            unmap: 10,
            sync: 5,
            min_bytes: 512,
            max_bytes: 128 << 10,
            verify: true,
            scatter_offsets: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    pub reads: u64,
    pub writes: u64,
    pub unmaps: u64,
    pub syncs: u64,
    pub bytes: u64,
    pub max_inflight: usize,
    pub ring_full: u64,
    pub host_signals: u64,
    pub interrupts: u64,
    pub pending_wakeups: u64,
}

enum Kind {
    Read(Vec<u8>),
    Write,
    Unmap,
    Sync,
}

struct Inflight {
    kind: Kind,
    lun: usize,
    range: (u64, u64),
    sg: Option<Sg>,
    len: u32,
}

/// Initial contents of each LUN (the model starts from the disk itself, so any backend works).
pub fn models_from(disks: &[Arc<dyn BlockDevice>]) -> Vec<Vec<u8>> {
    disks
        .iter()
        .map(|d| {
            let mut v = vec![0u8; d.size() as usize];
            d.read_at(&mut v, 0).unwrap();
            v
        })
        .collect()
}

/// Runs `ops` requests with up to `qd` in flight.
pub fn run(
    g: &mut Guest,
    luns: &[LunInfo],
    models: &mut [Vec<u8>],
    ops: u64,
    qd: usize,
    mix: Mix,
) -> RunStats {
    let mut st = RunStats::default();
    let mut inflight: HashMap<u64, Inflight> = HashMap::new();
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut last_interrupts = g.interrupts;
    let total_w = mix.read + mix.write + mix.unmap + mix.sync;
    let signals0 = g.host_signals_sent;
    let irq0 = g.interrupts;
    let pw0 = g.pending_wakeups;
    let mut pattern_seq = 1u64;
    while completed < ops {
        let mut need_signal = false;
        let mut progress = false;
        while inflight.len() < qd && submitted < ops {
            let li = g.rng.below(luns.len() as u64) as usize;
            let info = &luns[li];
            let bs = info.block_size as u64;
            let pick = g.rng.below(total_w);
            let max_blocks = (mix.max_bytes as u64 / bs).max(1);
            let min_blocks = (mix.min_bytes as u64 / bs).max(1);
            let nblk = min_blocks + g.rng.below(max_blocks - min_blocks + 1);
            let nblk = nblk.min(info.blocks);
            let mut lba = g.rng.below(info.blocks - nblk + 1);
            // Keep in-flight ranges of one LUN disjoint so the model has one answer.
            let mut tries = 0;
            while inflight
                .values()
                .any(|f| f.lun == li && lba < f.range.0 + f.range.1 && f.range.0 < lba + nblk)
            {
                lba = g.rng.below(info.blocks - nblk + 1);
                tries += 1;
                if tries > 100 {
                    break;
                }
            }
            if tries > 100 {
                break;
            }
            let tag = g.new_tag();
            let byte_off = (lba * bs) as usize;
            let nbytes = (nblk * bs) as usize;
            let offset = if mix.scatter_offsets {
                (g.rng.below(PAGE / 8) * 8) as u32
            } else {
                0
            };
            let (kind, cdb, dir, len, data): (Kind, Vec<u8>, u8, u32, Option<Vec<u8>>) =
                if pick < mix.read {
                    let exp = if mix.verify {
                        models[li][byte_off..byte_off + nbytes].to_vec()
                    } else {
                        Vec::new()
                    };
                    let cdb = if g.rng.below(2) == 0 && lba < u32::MAX as u64 && nblk <= 0xFFFF {
                        cdb_rw10(opcode::READ_10, lba as u32, nblk as u16, false)
                    } else {
                        cdb_rw16(opcode::READ_16, lba, nblk as u32, false)
                    };
                    (Kind::Read(exp), cdb, direction::READ, nbytes as u32, None)
                } else if pick < mix.read + mix.write {
                    let fua = g.rng.below(8) == 0;
                    let cdb = if g.rng.below(2) == 0 && nblk <= 0xFFFF {
                        cdb_rw10(opcode::WRITE_10, lba as u32, nblk as u16, fua)
                    } else {
                        cdb_rw16(opcode::WRITE_16, lba, nblk as u32, fua)
                    };
                    let mut d = vec![0u8; nbytes];
                    if mix.verify {
                        // A cheap pattern that differs per write and per 8-byte word.
                        pattern_seq += 1;
                        let seed = pattern_seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        for (i, c) in d.chunks_exact_mut(8).enumerate() {
                            c.copy_from_slice(&(seed ^ (i as u64 + byte_off as u64)).to_le_bytes());
                        }
                    }
                    (Kind::Write, cdb, direction::WRITE, nbytes as u32, Some(d))
                } else if pick < mix.read + mix.write + mix.unmap {
                    let mut list = vec![0u8; 24];
                    list[0..2].copy_from_slice(&22u16.to_be_bytes());
                    list[2..4].copy_from_slice(&16u16.to_be_bytes());
                    list[8..16].copy_from_slice(&lba.to_be_bytes());
                    list[16..20].copy_from_slice(&(nblk as u32).to_be_bytes());
                    let mut cdb = vec![0u8; 10];
                    cdb[0] = opcode::UNMAP;
                    cdb[7..9].copy_from_slice(&24u16.to_be_bytes());
                    (Kind::Unmap, cdb, direction::WRITE, 24, Some(list))
                } else {
                    let mut cdb = vec![0u8; 10];
                    cdb[0] = opcode::SYNCHRONIZE_CACHE_10;
                    (Kind::Sync, cdb, direction::NONE, 0, None)
                };
            let sg = if len > 0 {
                let sg = g.alloc_sg(offset, len);
                if let Some(d) = &data {
                    g.sg_write(&sg, d);
                }
                Some(sg)
            } else {
                None
            };
            let p = storvsc_backend::VstorPacket::scsi_request((0, 0, info.lun), &cdb, dir, len);
            let pkt = match &sg {
                Some(sg) => Guest::packet(9, 1, tag, &Guest::gpa_header(sg), &p.0),
                None => Guest::packet(6, 1, tag, &[], &p.0),
            };
            match g.write_raw(&pkt) {
                None => {
                    // Ring full: undo and wait for completions.
                    st.ring_full += 1;
                    if let Some(sg) = sg {
                        g.free_pages(sg.pfns);
                    }
                    break;
                }
                Some(sig) => {
                    if mix.verify {
                        match (&kind, &data) {
                            (Kind::Write, Some(d)) => {
                                models[li][byte_off..byte_off + nbytes].copy_from_slice(d)
                            }
                            (Kind::Unmap, _) => models[li][byte_off..byte_off + nbytes].fill(0),
                            _ => {}
                        }
                    }
                    need_signal |= sig;
                    progress = true;
                    submitted += 1;
                    inflight.insert(
                        tag,
                        Inflight {
                            kind,
                            lun: li,
                            range: (lba, nblk),
                            sg,
                            len,
                        },
                    );
                    st.max_inflight = st.max_inflight.max(inflight.len());
                }
            }
        }
        if need_signal {
            g.signal_host();
        }
        // Interrupt handling: the guest reads completions only after an interrupt.
        if g.interrupts == last_interrupts {
            let ring = g.in_ring.as_ref().unwrap();
            assert_eq!(
                ring.get(&g.mem, 0),
                ring.get(&g.mem, 4),
                "completions waiting without an interrupt (lost wakeup)"
            );
        } else {
            last_interrupts = g.interrupts;
            g.drain();
        }
        let done: Vec<u64> = inflight
            .keys()
            .copied()
            .filter(|t| g.done.contains_key(t))
            .collect();
        for tag in done {
            let d = g.done.remove(&tag).unwrap();
            let f = inflight.remove(&tag).unwrap();
            assert_eq!(d.packet_len, 80);
            assert_good(&d.vstor);
            completed += 1;
            progress = true;
            match f.kind {
                Kind::Read(exp) => {
                    assert_eq!(d.vstor.data_transfer_length(), f.len);
                    st.reads += 1;
                    st.bytes += f.len as u64;
                    if mix.verify {
                        let got = g.sg_read(f.sg.as_ref().unwrap(), f.len as usize);
                        if got != exp {
                            let at = got.iter().zip(&exp).position(|(a, b)| a != b).unwrap();
                            panic!(
                                "LUN {} read at block {} ({} blocks) differs at byte {at}",
                                f.lun, f.range.0, f.range.1
                            );
                        }
                    }
                }
                Kind::Write => {
                    assert_eq!(d.vstor.data_transfer_length(), f.len);
                    st.writes += 1;
                    st.bytes += f.len as u64;
                }
                Kind::Unmap => st.unmaps += 1,
                Kind::Sync => st.syncs += 1,
            }
            if let Some(sg) = f.sg {
                g.free_pages(sg.pfns);
            }
        }
        assert!(
            progress,
            "no progress with {} in flight; host log {:?}",
            inflight.len(),
            g.log
        );
        assert!(g.failures.is_empty(), "channel failed: {:?}", g.failures);
    }
    st.host_signals = g.host_signals_sent - signals0;
    st.interrupts = g.interrupts - irq0;
    st.pending_wakeups = g.pending_wakeups - pw0;
    st
}

/// Checks every LUN's full contents against its model through the SCSI path.
pub fn verify_all(g: &mut Guest, luns: &[LunInfo], models: &[Vec<u8>]) {
    for (i, info) in luns.iter().enumerate() {
        let chunk = 128u64 << 10;
        let total = info.blocks * info.block_size as u64;
        let mut off = 0;
        while off < total {
            let n = chunk.min(total - off);
            let lba = off / info.block_size as u64;
            let blocks = (n / info.block_size as u64) as u32;
            let (p, d) = g.scsi(
                info.lun,
                &cdb_rw16(opcode::READ_16, lba, blocks, false),
                direction::READ,
                n as u32,
                None,
            );
            assert_good(&p);
            assert!(
                d == models[i][off as usize..(off + n) as usize],
                "LUN {i} at {off}"
            );
            off += n;
        }
    }
}
