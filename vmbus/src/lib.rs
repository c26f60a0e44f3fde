//! vmbus (under construction).
