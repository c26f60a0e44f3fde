//! vmm (under construction).
