//! GUIDs on the VMBus wire are in Windows order (the first three fields little-endian); the type
//! itself is the workspace's one [`disk::Guid`].

pub use disk::Guid;
