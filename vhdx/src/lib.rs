//! vhdx (under construction).
