//! Sizes for people, as qemu-img prints them.

/// `512 B`, `64 MiB`, `1.5 GiB`: binary units, at most three decimals, trailing zeros dropped.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_read_like_qemu() {
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }
}
