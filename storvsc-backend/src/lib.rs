//! storvsc-backend (under construction).
