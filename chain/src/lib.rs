//! chain (under construction).
