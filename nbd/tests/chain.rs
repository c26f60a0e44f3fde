//! The merged view across a parent chain: BLOCK_STATUS and sparse READs follow
//! `disk::map::status_through_chain`, and multi-conn consistency through one shared disk.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use disk::{Allocation, BlockDevice, Extent};

const BLOCK: u64 = 64 << 10;
const SIZE: u64 = 16 * BLOCK;

/// A toy differencing layer: per 64 KiB block, data (held here), zero, or unallocated (read
/// from the parent).
#[derive(Debug)]
struct Overlay {
    parent: Arc<dyn BlockDevice>,
    blocks: Mutex<Vec<Option<Option<Vec<u8>>>>>, // None = unallocated, Some(None) = zero
}

impl BlockDevice for Overlay {
    fn format(&self) -> &'static str {
        "toy"
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        disk::check_range(offset, buf.len() as u64, SIZE)?;
        let blocks = self.blocks.lock().unwrap();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = (pos / BLOCK) as usize;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(buf.len() - done);
            match &blocks[b] {
                None => self.parent.read_at(&mut buf[done..done + n], pos)?,
                Some(None) => buf[done..done + n].fill(0),
                Some(Some(d)) => buf[done..done + n].copy_from_slice(&d[within..within + n]),
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> disk::Result<()> {
        Err(disk::Error::ReadOnly)
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> disk::Result<Extent> {
        disk::check_range(offset, len, SIZE)?;
        let b = (offset / BLOCK) as usize;
        let n = (BLOCK - offset % BLOCK).min(len);
        let allocation = match &self.blocks.lock().unwrap()[b] {
            None => Allocation::Unallocated,
            Some(None) => Allocation::Zero,
            Some(Some(_)) => Allocation::Data { host_offset: None },
        };
        Ok(Extent { len: n, allocation })
    }
    fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        Some(&self.parent)
    }
}

/// Parent: memory disk (reports data everywhere) wrapped so blocks 8.. are unallocated with
/// no further parent.
#[derive(Debug)]
struct Base {
    inner: disk::RawDisk,
}

impl BlockDevice for Base {
    fn format(&self) -> &'static str {
        "toy"
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> disk::Result<()> {
        Err(disk::Error::ReadOnly)
    }
    fn flush(&self) -> disk::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> disk::Result<Extent> {
        disk::check_range(offset, len, SIZE)?;
        let half = SIZE / 2;
        Ok(if offset < half {
            Extent {
                len: (half - offset).min(len),
                allocation: Allocation::Data { host_offset: None },
            }
        } else {
            Extent {
                len,
                allocation: Allocation::Unallocated,
            }
        })
    }
}

#[test]
fn block_status_and_reads_follow_the_merged_view() {
    let base_bytes = pattern(SIZE as usize / 2, 5);
    let inner = disk::RawDisk::memory(SIZE).unwrap();
    inner.write_at(&base_bytes, 0).unwrap();
    let base: Arc<dyn BlockDevice> = Arc::new(Base { inner });
    // Top: block 0 data, block 1 zero, blocks 2..16 unallocated (2..8 come from the base's
    // data, 8..16 are unallocated everywhere).
    let mut blocks = vec![None; 16];
    blocks[0] = Some(Some(vec![0xABu8; BLOCK as usize]));
    blocks[1] = Some(None);
    let top = Arc::new(Overlay {
        parent: base,
        blocks: Mutex::new(blocks),
    });
    let srv = TestServer::start(vec![nbd::Export::new("c", top)], Default::default());
    let (mut c, size, _) = Client::open(&srv.sock, "c");
    assert_eq!(size, SIZE);

    c.request(0, CMD_BLOCK_STATUS, 1, 0, SIZE as u32);
    let ch = c.chunks();
    assert_eq!(ch.len(), 1);
    let p = &ch[0].payload;
    assert_eq!(
        &p[0..4],
        &1u32.to_be_bytes(),
        "context id from SET_META_CONTEXT"
    );
    let descs: Vec<(u32, u32)> = p[4..]
        .chunks_exact(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[0..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..8].try_into().unwrap()),
            )
        })
        .collect();
    let b = BLOCK as u32;
    assert_eq!(
        descs,
        vec![(b, 0), (b, 3), (6 * b, 0), (8 * b, 3)],
        "data / zero (hole,zero) / parent data / unallocated without parent (hole,zero)"
    );

    // REQ_ONE gives one extent, clipped to the request.
    c.request(8, CMD_BLOCK_STATUS, 2, 2 * BLOCK, 1000);
    let p = c.chunks().remove(0).payload;
    assert_eq!(p.len(), 12);
    assert_eq!(&p[4..8], &1000u32.to_be_bytes());

    // A read across everything: holes come as hole chunks, data is the merged bytes.
    c.request(0, CMD_READ, 3, 0, SIZE as u32);
    let kinds: Vec<u16> = c.chunks().iter().map(|c| c.kind).collect();
    assert_eq!(kinds, vec![CHUNK_DATA, CHUNK_HOLE, CHUNK_DATA, CHUNK_HOLE]);
    let got = c.read(4, 0, SIZE as u32).unwrap();
    assert!(got[..BLOCK as usize].iter().all(|&x| x == 0xAB));
    assert!(got[BLOCK as usize..2 * BLOCK as usize]
        .iter()
        .all(|&x| x == 0));
    assert!(got[2 * BLOCK as usize..8 * BLOCK as usize] == base_bytes[2 * BLOCK as usize..]);
    assert!(got[8 * BLOCK as usize..].iter().all(|&x| x == 0));
}

#[test]
fn multi_conn_writes_are_visible_and_flushed_across_connections() {
    let d = Arc::new(disk::RawDisk::memory(SIZE).unwrap());
    let srv = TestServer::start(
        vec![nbd::Export::new("m", d).writable(true)],
        Default::default(),
    );
    let (mut a, _, flags) = Client::open(&srv.sock, "m");
    assert_ne!(flags & (1 << 8), 0, "CAN_MULTI_CONN");
    let (mut b, _, _) = Client::open(&srv.sock, "m");
    a.write(0, 1, 4096, b"from connection a");
    assert_eq!(a.status(1), 0);
    b.request(0, CMD_FLUSH, 2, 0, 0);
    assert_eq!(b.status(2), 0);
    assert_eq!(b.read(3, 4096, 17).unwrap(), b"from connection a");
}
