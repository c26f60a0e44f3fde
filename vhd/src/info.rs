//! What `info` shows of an image: [`VhdInfo`], and the facts the generic layer asks for.

use serde::Serialize;

use crate::footer::fourcc;
use crate::geometry::chs_sectors;
use crate::limits::SECTOR;
use crate::locator::LocatorInfo;
use crate::{DiskType, VhdDisk};

/// Parsed facts about an image.
#[derive(Clone, Debug, Serialize)]
pub struct VhdInfo {
    pub disk_type: &'static str,
    pub virtual_size: u64,
    pub size_rule: &'static str,
    pub size_rule_reason: String,
    pub creator_app: String,
    pub creator_version: u32,
    pub creator_host_os: String,
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub chs_size: u64,
    pub timestamp: u32,
    pub unique_id: String,
    pub saved_state: bool,
    pub features: u32,
    pub block_size: Option<u32>,
    pub max_table_entries: Option<u32>,
    pub bat_offset: Option<u64>,
    pub header_offset: Option<u64>,
    /// Blocks the table allocates: a walk of the whole table, made only by [`VhdDisk::info`]
    /// (0 when the walk failed; a warning then says why).
    pub allocated_blocks: u64,
    pub parent_name: Option<String>,
    pub parent_unique_id: Option<String>,
    pub parent_timestamp: Option<u32>,
    pub locators: Vec<LocatorInfo>,
    pub file_size: u64,
    pub warnings: Vec<String>,
}

impl VhdDisk {
    /// Facts about the image, with the count of allocated blocks (a walk of the table).
    pub fn info(&self) -> VhdInfo {
        self.info_with(true)
    }

    /// Facts about the image; `count`: walk the table to count the allocated blocks (else 0).
    pub fn info_with(&self, count: bool) -> VhdInfo {
        let m = self.m();
        let mut warnings = m.warnings.clone();
        let allocated_blocks = if count {
            m.bat.allocated_count(&*self.storage).unwrap_or_else(|e| {
                warnings.push(format!("cannot count the allocated blocks: {e}"));
                0
            })
        } else {
            0
        };
        let f = &m.footer;
        let h = m.header.as_ref();
        let diff = self.kind == DiskType::Differencing;
        VhdInfo {
            disk_type: self.kind.name(),
            virtual_size: m.size,
            size_rule: m.rule,
            size_rule_reason: m.rule_reason.clone(),
            creator_app: f.creator_app_str(),
            creator_version: f.creator_version,
            creator_host_os: fourcc(&f.creator_os.to_be_bytes()),
            original_size: f.original_size,
            current_size: f.current_size,
            cylinders: f.geometry.0,
            heads: f.geometry.1,
            sectors_per_track: f.geometry.2,
            chs_size: chs_sectors(f.geometry) * SECTOR,
            timestamp: f.timestamp,
            unique_id: f.unique_id.to_string(),
            saved_state: f.saved_state != 0,
            features: f.features,
            block_size: h.map(|h| h.block_size),
            max_table_entries: h.map(|h| h.max_table_entries),
            bat_offset: h.map(|h| h.table_offset),
            header_offset: h.map(|_| m.header_offset),
            allocated_blocks,
            parent_name: h.filter(|_| diff).map(|h| h.parent_name_lossy()),
            parent_unique_id: h.filter(|_| diff).map(|h| h.parent_unique_id.to_string()),
            parent_timestamp: h.filter(|_| diff).map(|h| h.parent_timestamp),
            locators: m.locators.clone(),
            file_size: m.file_len,
            warnings,
        }
    }

    /// [`disk::BlockDevice::facts`].
    pub(crate) fn layer_facts(&self) -> disk::LayerFacts {
        let i = self.info_with(false);
        disk::LayerFacts {
            disk_type: Some(i.disk_type),
            creator_app: Some(i.creator_app),
            creator_host_os: Some(i.creator_host_os),
            size_rule: Some(i.size_rule),
            current_size: Some(i.current_size),
            chs_size: Some(i.chs_size),
            geometry: Some((i.cylinders, i.heads, i.sectors_per_track)),
            saved_state: i.saved_state,
        }
    }

    /// [`disk::BlockDevice::format_specific`]: [`VhdInfo`] plus a geometry object.
    pub(crate) fn info_json(&self) -> Option<serde_json::Value> {
        let i = self.info();
        let mut v = serde_json::to_value(&i).ok()?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "geometry".into(),
                serde_json::json!({
                    "cylinders": i.cylinders, "heads": i.heads,
                    "sectors-per-track": i.sectors_per_track,
                }),
            );
        }
        Some(v)
    }
}
