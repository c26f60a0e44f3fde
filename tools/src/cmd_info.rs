//! `viridian info`: qemu-img info's output (human and JSON, same keys), plus VHD/VHDX facts
//! under `format-specific`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use chain::OpenOptions;
use disk::{Allocation, BlockDevice};
use serde_json::{json, Map, Value};

use crate::common::{self, Output, SizeRuleArg};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (raw, vhd/vpc, vhdx); probed when absent.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Output as human text or JSON (qemu-img's keys).
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Force shared access: open without the lock, so the image can be read while another
    /// process (serve --rw, a VM) writes it; what is read may then be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// VHD size rule.
    #[arg(long = "size-rule", value_enum, default_value_t = SizeRuleArg::Auto)]
    size_rule: SizeRuleArg,
    /// Use this file as the parent (moved chains).
    #[arg(long)]
    parent: Option<PathBuf>,
    /// The image file.
    file: PathBuf,
}

pub fn run(a: Args) -> Result<i32> {
    // The top image's facts do not need its parent; open it alone first so a missing parent
    // still lets us show everything the file itself says.
    let mut opts = OpenOptions::read_only();
    opts.parent_override = a.parent.clone();
    opts.lock = !a.force_share;
    let full = common::open_with(&a.file, a.format.as_deref(), a.size_rule, opts.clone());
    let (top, chain_error) = match full {
        Ok(d) => (d, None),
        Err(e) => {
            let mut alone = opts;
            alone.no_parent = true;
            match common::open_with(&a.file, a.format.as_deref(), a.size_rule, alone) {
                Ok(d) if d.parent_link().is_some() => (d, Some(e)),
                _ => return Err(e),
            }
        }
    };
    let layers = chain::layers(&top);
    let shown: Vec<&std::sync::Arc<dyn BlockDevice>> = if a.backing_chain {
        layers.iter().collect()
    } else {
        layers.iter().take(1).collect()
    };
    let mut infos = Vec::new();
    for (i, layer) in shown.iter().enumerate() {
        let path = if i == 0 {
            a.file.clone()
        } else {
            layer.path().map(Path::to_path_buf).unwrap_or_default()
        };
        let mut info = image_info(layer.as_ref(), &path)?;
        let (probed, rule) = if i > 0 {
            (
                false,
                format!(
                    "parent of a {} image: opened as that format, never probed",
                    layers[i - 1].format()
                ),
            )
        } else if let Some(f) = &a.format {
            (false, format!("stated by -f {f}"))
        } else {
            let p = chain::probe_path_explained(&a.file)?;
            (true, p.rule.to_string())
        };
        if let Value::Object(m) = &mut info {
            m.insert("format-probed".into(), json!(probed));
            m.insert("format-rule".into(), json!(rule));
            if is_block_device(&path) {
                m.insert("block-device".into(), json!(true));
            }
        }
        infos.push(info);
    }
    // Why the parent is not shown: missing, or found but no longer the parent (written to
    // since the child was made). Saying "not found" for the second sends users looking for a
    // file that is right there.
    let backing_problem = chain_error.as_ref().map(|e| {
        match e.chain().find_map(|c| c.downcast_ref::<disk::Error>()) {
            Some(disk::Error::ParentMismatch { parent, detail, .. }) => format!(
                "found {}, but its identity changed ({detail}); it was modified after this \
                 child was made",
                parent.display()
            ),
            _ => "not found".to_string(),
        }
    });
    match a.output {
        Output::Json => {
            let v = if a.backing_chain {
                Value::Array(infos)
            } else {
                infos.pop().unwrap_or(Value::Null)
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Human => {
            for (i, info) in infos.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_human(
                    info,
                    if i == 0 {
                        backing_problem.as_deref()
                    } else {
                        None
                    },
                );
            }
        }
    }
    // As in qemu-img: the image's own facts are the answer (exit 0; the human form names the
    // parent's problem), but a --backing-chain that cannot be followed is an error.
    if let Some(e) = chain_error {
        if a.backing_chain {
            eprintln!("viridian: {}", common::one_line(&e));
            return Ok(1);
        }
        eprintln!("viridian: warning: {}", common::one_line(&e));
    }
    Ok(0)
}

fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// Bytes the layer stores itself, its allocated clusters, and how many of those do not follow
/// their predecessor in the file (stored before it, or after a gap larger than per-block
/// metadata such as a VHD sector bitmap could explain).
fn allocation_stats(d: &dyn BlockDevice) -> Result<(u64, u64, u64)> {
    let size = d.size();
    let cluster = d.cluster_size().unwrap_or(1 << 20).max(512);
    let slack = (cluster / 16).max(64 << 10);
    let mut pos = 0;
    let mut allocated = 0u64;
    let mut clusters = 0u64;
    let mut fragmented = 0u64;
    let mut prev_end: Option<u64> = None;
    while pos < size {
        // Ask for the rest of the disk: holes come back as one long run, so a huge sparse
        // image costs a few calls, not one per cluster.
        let e = d.block_status(pos, size - pos)?;
        let n = e.len.clamp(1, size - pos);
        if let Allocation::Data { host_offset } = e.allocation {
            allocated += n;
            // Cluster starts inside this run; within one run the data is contiguous.
            let first = pos.div_ceil(cluster) * cluster;
            if first < pos + n {
                clusters += (pos + n - first).div_ceil(cluster);
                if let Some(h) = host_offset {
                    let h_first = h + (first - pos);
                    if prev_end.is_some_and(|end| h_first < end || h_first > end + slack) {
                        fragmented += 1;
                    }
                    let last = first + (pos + n - 1 - first) / cluster * cluster;
                    prev_end = Some(h + (last - pos) + cluster);
                }
            }
        }
        pos += n;
    }
    Ok((allocated, clusters, fragmented))
}

pub fn image_info(d: &dyn BlockDevice, path: &Path) -> Result<Value> {
    let mut m = Map::new();
    m.insert("filename".into(), json!(path.display().to_string()));
    m.insert("format".into(), json!(common::qemu_format_name(d.format())));
    m.insert("virtual-size".into(), json!(d.size()));
    if let Some(n) = common::actual_size(path) {
        m.insert("actual-size".into(), json!(n));
    }
    if let Some(c) = d.cluster_size() {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("dirty-flag".into(), json!(d.dirty()));
    if let Some(link) = d.parent_link() {
        m.insert("backing-filename".into(), json!(link.name));
        if let Some(p) = d.backing().and_then(|b| b.path()) {
            let full = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            m.insert(
                "full-backing-filename".into(),
                json!(full.display().to_string()),
            );
        }
        m.insert(
            "backing-filename-format".into(),
            json!(common::qemu_format_name(link.format)),
        );
    }
    let raw = match d.format_specific() {
        Some(Value::Object(o)) => o,
        Some(other) => {
            let mut o = Map::new();
            o.insert("details".into(), other);
            o
        }
        None => Map::new(),
    };
    // One schema (docs/json.md): kebab-case keys, GUIDs as bare lowercase GUID strings.
    let mut data = match canonical(Value::Object(raw)) {
        Value::Object(o) => o,
        _ => Map::new(),
    };
    data.insert("logical-sector-size".into(), json!(d.logical_sector_size()));
    data.insert(
        "physical-sector-size".into(),
        json!(d.physical_sector_size()),
    );
    get_vhd_facts(d, path, &mut data);
    if d.format() != "raw" {
        let (allocated, clusters, fragmented) = allocation_stats(d)?;
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                (a as f64 * 10000.0 / b as f64).round() / 100.0
            }
        };
        data.insert("allocated-bytes".into(), json!(allocated));
        data.insert("allocated-percent".into(), json!(pct(allocated, d.size())));
        data.insert(
            "fragmentation-percent".into(),
            json!(pct(fragmented, clusters)),
        );
    }
    if let Some(link) = d.parent_link() {
        data.insert(
            "parent-candidates".into(),
            json!(
                chain::parent_candidates(Some(d.path().unwrap_or(path)), &link)
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
            ),
        );
        data.insert(
            "parent-identity".into(),
            json!(link.expected_id.to_string()),
        );
    }
    m.insert(
        "format-specific".into(),
        json!({ "type": common::qemu_format_name(d.format()), "data": Value::Object(data) }),
    );
    Ok(Value::Object(m))
}

/// Keys in kebab-case and GUID strings in one form (lowercase, no braces), recursively.
fn canonical(v: Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k.replace('_', "-"), canonical(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(canonical).collect()),
        Value::String(s) => Value::String(canonical_guid(&s).unwrap_or(s)),
        other => other,
    }
}

/// `{B4BBF546-EBEF-434D-BEC6-EBFFB37F87F6}` -> `b4bbf546-ebef-434d-bec6-ebffb37f87f6`.
fn canonical_guid(s: &str) -> Option<String> {
    let t = s
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(s);
    let groups: Vec<&str> = t.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let is_guid = groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()));
    is_guid.then(|| t.to_ascii_lowercase())
}

/// The facts Hyper-V's Get-VHD reports, under the same keys for VHD and VHDX.
fn get_vhd_facts(d: &dyn BlockDevice, path: &Path, data: &mut Map<String, Value>) {
    if d.format() == "raw" {
        return;
    }
    let vhd_type = if d.parent_link().is_some() {
        "differencing"
    } else if data.get("disk-type").and_then(Value::as_str) == Some("fixed")
        || data.get("leave-blocks-allocated").and_then(Value::as_bool) == Some(true)
    {
        "fixed"
    } else {
        "dynamic"
    };
    data.insert("vhd-type".into(), json!(vhd_type));
    if let Ok(m) = std::fs::metadata(path) {
        data.insert("file-size".into(), json!(m.len()));
    }
    let identifier = data
        .get("page83")
        .or_else(|| data.get("unique-id"))
        .cloned()
        .unwrap_or(Value::Null);
    data.insert("disk-identifier".into(), identifier);
    let parent = d
        .backing()
        .and_then(|b| b.path())
        .map(|p| json!(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())))
        .unwrap_or(Value::Null);
    data.insert("parent-path".into(), parent);
}

fn print_human(info: &Value, backing_problem: Option<&str>) {
    let s = |k: &str| {
        info.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let n = |k: &str| info.get(k).and_then(Value::as_u64);
    println!("image: {}", common::shown_path(Path::new(&s("filename"))));
    println!("file format: {}", s("format"));
    if let Some(p) = info.get("format-probed").and_then(Value::as_bool) {
        println!("format probed: {p} ({})", s("format-rule"));
    }
    if info.get("block-device").and_then(Value::as_bool) == Some(true) {
        println!("block device: yes");
    }
    if let Some(v) = n("virtual-size") {
        println!("virtual size: {} ({v} bytes)", common::human_size(v));
    }
    if let Some(v) = n("actual-size") {
        println!("disk size: {}", common::human_size(v));
    }
    if let Some(v) = n("cluster-size") {
        println!("cluster_size: {v}");
    }
    if info.get("backing-filename").is_some() {
        match info.get("full-backing-filename").and_then(Value::as_str) {
            Some(full) => println!(
                "backing file: {} (actual path: {full})",
                common::shown_link_name(&s("backing-filename"))
            ),
            None => println!(
                "backing file: {} ({})",
                common::shown_link_name(&s("backing-filename")),
                backing_problem.unwrap_or("not found")
            ),
        }
        println!("backing file format: {}", s("backing-filename-format"));
    }
    if info.get("dirty-flag").and_then(Value::as_bool) == Some(true) {
        println!("dirty flag: yes (log needs replay)");
    }
    if let Some(data) = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(Value::as_object)
    {
        if !data.is_empty() {
            println!("Format specific information:");
            for (k, v) in data {
                print_value(k, v, 1);
            }
        }
    }
}

fn print_value(key: &str, v: &Value, depth: usize) {
    let pad = "    ".repeat(depth);
    match v {
        Value::Object(o) => {
            println!("{pad}{key}:");
            for (k, v) in o {
                print_value(k, v, depth + 1);
            }
        }
        Value::Array(items) => {
            println!("{pad}{key}:");
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::Object(_) | Value::Array(_) => {
                        print_value(&format!("[{i}]"), item, depth + 1)
                    }
                    other => println!("{pad}    [{i}]: {}", scalar(other)),
                }
            }
        }
        other => println!("{pad}{key}: {}", scalar(other)),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
