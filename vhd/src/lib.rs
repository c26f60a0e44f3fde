//! vhd (under construction).
