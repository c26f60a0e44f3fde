//! The JSON schema written down in docs/json.md: qemu-img's keys where qemu has the fact,
//! kebab-case elsewhere, GUIDs in one form, Get-VHD's facts for VHD and VHDX.

mod common;

use common::*;
use serde_json::Value;

fn info(path: &std::path::Path) -> Value {
    serde_json::from_str(&ok(&["info", "--output", "json", p(path)])).unwrap()
}

/// Every key at every depth is kebab-case; every GUID-looking string is lowercase, no braces.
fn assert_schema(v: &Value, at: &str) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                assert!(
                    !k.contains('_') && k == &k.to_lowercase(),
                    "{at}: key {k:?}"
                );
                assert_schema(v, &format!("{at}.{k}"));
            }
        }
        Value::Array(a) => a.iter().for_each(|v| assert_schema(v, at)),
        Value::String(s) => {
            let hexish = s.len() >= 36 && s.chars().filter(|&c| c == '-').count() == 4;
            if hexish && s.trim_matches(['{', '}']).len() == 36 {
                assert!(!s.starts_with('{'), "{at}: braces in {s}");
                assert_eq!(s, &s.to_lowercase(), "{at}: GUID case");
            }
        }
        _ => {}
    }
}

#[test]
fn info_json_follows_docs_json_md_for_vhd_and_vhdx() {
    let d = tmp();
    for fmt in ["vhd", "vhdx"] {
        let base = join(d.path(), &format!("base.{fmt}"));
        let fixed = join(d.path(), &format!("fixed.{fmt}"));
        let child = join(d.path(), &format!("child.{fmt}"));
        ok(&["create", "-q", "-f", fmt, p(&base), "8M"]);
        ok(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            "subformat=fixed,preallocation=off",
            p(&fixed),
            "8M",
        ]);
        ok(&["create", "-q", "-f", fmt, "-b", p(&base), p(&child)]);
        for (path, kind) in [
            (&base, "dynamic"),
            (&fixed, "fixed"),
            (&child, "differencing"),
        ] {
            let v = info(path);
            assert_schema(&v, &format!("{fmt} {kind}"));
            let data = &v["format-specific"]["data"];
            assert_eq!(data["vhd-type"], kind, "{fmt}");
            for key in [
                "file-size",
                "block-size",
                "logical-sector-size",
                "physical-sector-size",
                "disk-identifier",
                "fragmentation-percent",
                "parent-path",
                "allocated-bytes",
            ] {
                assert!(data.get(key).is_some(), "{fmt} {kind}: no {key}: {data}");
            }
            assert_eq!(
                data["file-size"],
                std::fs::metadata(path).unwrap().len(),
                "{fmt} {kind}"
            );
        }
        // The child's parent-identity is its parent's identity field, same form.
        let parent_field = if fmt == "vhdx" {
            "data-write-guid"
        } else {
            "unique-id"
        };
        let b = info(&base);
        let c = info(&child);
        assert_eq!(
            c["format-specific"]["data"]["parent-identity"],
            b["format-specific"]["data"][parent_field],
            "{fmt}"
        );
        assert!(c["format-specific"]["data"]["parent-path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("base.{fmt}")));
        // Top-level keys: qemu-img's, where qemu-img reads the format.
        if have("qemu-img") {
            let q: Value = serde_json::from_str(&tool_ok(
                "qemu-img",
                &["info", "--output", "json", p(&base)],
            ))
            .unwrap();
            for k in q.as_object().unwrap().keys().filter(|k| *k != "children") {
                assert!(b.get(k).is_some(), "{fmt}: qemu-img's key {k} missing");
                if k != "actual-size" && k != "filename" {
                    assert_eq!(b[k], q[k], "{fmt}: {k}");
                }
            }
        }
    }
}

/// The value of `key` in `info`'s human output (`    key: value`).
fn human_field(out: &str, key: &str) -> String {
    let prefix = format!("{key}: ");
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
        .to_string()
}

/// The one GUID form (docs/json.md) everywhere a parent identity is printed: a child's
/// `parent-identity` is the very string its parent prints as its own identity, in JSON, in
/// human output, and in the message that says a parent's identity changed. (A VHDX child's
/// parent identity was once printed byte-swapped against the parent's DataWriteGuid.)
#[test]
fn a_childs_parent_identity_is_printed_as_its_parent_prints_its_own() {
    let d = tmp();
    for (fmt, field) in [("vhdx", "data-write-guid"), ("vhd", "unique-id")] {
        let base = join(d.path(), &format!("id-base.{fmt}"));
        let child = join(d.path(), &format!("id-child.{fmt}"));
        ok(&["create", "-q", "-f", fmt, p(&base), "8M"]);
        ok(&["create", "-q", "-f", fmt, "-b", p(&base), p(&child)]);

        let own = info(&base)["format-specific"]["data"][field]
            .as_str()
            .unwrap_or_else(|| panic!("{fmt}: no {field}"))
            .to_string();
        let linked = info(&child)["format-specific"]["data"]["parent-identity"]
            .as_str()
            .unwrap_or_else(|| panic!("{fmt}: no parent-identity"))
            .to_string();
        assert_eq!(linked, own, "{fmt}: JSON");
        assert!(own.parse::<disk::Guid>().is_ok(), "{fmt}: {own}");
        assert_eq!(own, own.to_lowercase(), "{fmt}");

        let own_human = human_field(&ok(&["info", p(&base)]), field);
        let linked_human = human_field(&ok(&["info", p(&child)]), "parent-identity");
        assert_eq!(own_human, own, "{fmt}: human output of the parent");
        assert_eq!(linked_human, own, "{fmt}: human output of the child");

        // Give the parent a new identity (VHDX: a write changes the DataWriteGuid; VHD: a new
        // file in its place): the refusal names both identities in the same form.
        if fmt == "vhdx" {
            ok(&["io", "-c", "write -P 1 0 4k", p(&base)]);
        } else {
            std::fs::remove_file(&base).unwrap();
            ok(&["create", "-q", "-f", fmt, p(&base), "8M"]);
        }
        let now = info(&base)["format-specific"]["data"][field]
            .as_str()
            .unwrap()
            .to_string();
        assert_ne!(now, own, "{fmt}: the parent's identity did not change");
        let o = viridian(&["info", p(&child)]);
        let err = stderr_of(&o);
        let want = format!("the child was made against identity {own}, this file has {now}");
        assert!(err.contains(&want), "{fmt}: want {want:?} in:\n{err}");
        assert!(stdout_of(&o).contains(&want), "{fmt}: human output");
    }
}
