//! Sticky, balanced assignment of partitions to stream-mode members.
