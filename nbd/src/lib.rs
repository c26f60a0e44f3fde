//! nbd (under construction).
