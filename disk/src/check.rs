//! The result of an image consistency check, shaped like qemu-img check's JSON.

use serde::Serialize;

/// One problem found by a check.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// "corruption", "leak" or "warning".
    pub kind: &'static str,
    /// Human text naming the structure, offset and expected value.
    pub message: String,
    /// Whether `check -r` fixed it.
    pub fixed: bool,
}

/// Counts follow qemu-img check (ImageCheck); exit codes derive from them.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    #[serde(rename = "check-errors")]
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragmented_clusters: Option<u64>,
    /// Details (not in qemu's JSON; ours).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<Finding>,
}

/// What `check -r` may repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Repair {
    #[default]
    None,
    Leaks,
    All,
}

impl CheckReport {
    pub fn corruption(&mut self, message: impl Into<String>) {
        self.corruptions += 1;
        self.findings.push(Finding {
            kind: "corruption",
            message: message.into(),
            fixed: false,
        });
    }
    pub fn leak(&mut self, message: impl Into<String>) {
        self.leaks += 1;
        self.findings.push(Finding {
            kind: "leak",
            message: message.into(),
            fixed: false,
        });
    }
    pub fn warning(&mut self, message: impl Into<String>) {
        self.findings.push(Finding {
            kind: "warning",
            message: message.into(),
            fixed: false,
        });
    }

    /// qemu-img check's exit code: 0 clean, 1 check not completed (errors), 2 corruptions
    /// remain, 3 only leaks remain.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > self.corruptions_fixed {
            2
        } else if self.leaks > self.leaks_fixed {
            3
        } else {
            0
        }
    }
}
