//! mount (under construction).
