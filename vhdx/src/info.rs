//! Facts about an open image (`viridian info`, `check`, tests).

use super::*;

/// Facts about an open image.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VhdxInfo {
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub has_parent: bool,
    pub leave_blocks_allocated: bool,
    pub chunk_ratio: u64,
    pub header_sequence: u64,
    /// Sequence numbers of header 1 and header 2 (None where that copy is invalid).
    pub header_sequences: [Option<u64>; 2],
    pub file_write_guid: String,
    pub data_write_guid: String,
    pub log_guid: String,
    pub log_offset: u64,
    pub log_length: u32,
    pub bat_offset: u64,
    pub metadata_offset: u64,
    pub page83: String,
    pub parent_locator: Vec<(String, String)>,
    pub block_states: BTreeMap<String, u64>,
    /// Why `block_states` could not be counted (a BAT page could not be read or holds an
    /// invalid entry); the counts are then left empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_states_error: Option<String>,
    pub replayed_log_entries: usize,
    pub dirty_at_open: bool,
}

impl VhdxDisk {
    pub fn info(&self) -> VhdxInfo {
        let both = read_headers(&*self.storage)
            .map(|(_, b)| {
                [
                    b[0].as_ref().map(|h| h.sequence),
                    b[1].as_ref().map(|h| h.sequence),
                ]
            })
            .unwrap_or([None, None]);
        let hs = lock(&self.header);
        let meta = rlock(&self.meta);
        let bat = rlock(&self.bat);
        let mut states: BTreeMap<String, u64> = BTreeMap::new();
        // Entries that are zero are not present: count the others and infer those.
        let geo = bat.geo;
        let mut others = 0u64;
        let walk = bat.for_each_nonzero(|i, e| {
            let (chunk, k) = (
                i as u64 / (geo.chunk_ratio + 1),
                i as u64 % (geo.chunk_ratio + 1),
            );
            if k == geo.chunk_ratio || chunk * geo.chunk_ratio + k >= geo.data_blocks {
                return Ok(()); // a sector bitmap entry, or padding past the last block
            }
            let st = bat_state(e);
            let name = match st {
                PB_NOT_PRESENT => return Ok(()),
                PB_UNDEFINED => "undefined",
                PB_ZERO => "zero",
                PB_UNMAPPED | PB_UNMAPPED_V095 => "unmapped",
                PB_FULLY_PRESENT => "fully_present",
                _ => "partially_present",
            };
            others += 1;
            *states.entry(name.to_string()).or_default() += 1;
            Ok(())
        });
        if walk.is_err() {
            states.clear();
        } else if geo.data_blocks > others {
            states.insert("not_present".to_string(), geo.data_blocks - others);
        }
        VhdxInfo {
            virtual_size: bat.size,
            block_size: meta.block_size,
            logical_sector_size: meta.logical_sector,
            physical_sector_size: meta.physical_sector,
            has_parent: meta.has_parent,
            leave_blocks_allocated: meta.leave_blocks_allocated,
            chunk_ratio: bat.geo.chunk_ratio,
            header_sequence: hs.current.sequence,
            header_sequences: both,
            file_write_guid: hs.current.file_write_guid.to_string(),
            data_write_guid: hs.current.data_write_guid.to_string(),
            log_guid: hs.current.log_guid.to_string(),
            log_offset: hs.current.log_offset,
            log_length: hs.current.log_length,
            bat_offset: self.rt().bat_offset,
            metadata_offset: self.rt().meta_offset,
            page83: meta.page83.to_string(),
            parent_locator: meta
                .parent_locator
                .as_ref()
                .map(|l| l.entries.clone())
                .unwrap_or_default(),
            block_states: states,
            block_states_error: walk.err().map(|e| e.to_string()),
            replayed_log_entries: self.replayed,
            dirty_at_open: self.dirty_at_open,
        }
    }

    /// Log entries written by this handle (for tests and benchmarks).
    pub fn log_entries_written(&self) -> u64 {
        lock(&self.wal).entries_written
    }

    /// The raw BAT entry of payload block `b` (tests and tools).
    pub fn bat_entry(&self, b: u64) -> Option<u64> {
        let bat = rlock(&self.bat);
        if b >= bat.geo.data_blocks {
            return None;
        }
        bat.get(bat.geo.payload_index(b)).ok()
    }

    /// The storage under this image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// [`BlockDevice::format_specific`]: the info as JSON, the locator as an object.
    pub(crate) fn info_json(&self) -> Option<serde_json::Value> {
        let i = self.info();
        let mut v = serde_json::to_value(&i).ok()?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "parent_locator".into(),
                serde_json::Value::Object(
                    i.parent_locator
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect(),
                ),
            );
        }
        Some(v)
    }

    /// [`BlockDevice::facts`].
    pub(crate) fn layer_facts(&self) -> disk::LayerFacts {
        let (has_parent, fixed) = {
            let m = rlock(&self.meta);
            (m.has_parent, m.leave_blocks_allocated)
        };
        disk::LayerFacts {
            disk_type: Some(if has_parent {
                "differencing"
            } else if fixed {
                "fixed"
            } else {
                "dynamic"
            }),
            ..Default::default()
        }
    }
}
