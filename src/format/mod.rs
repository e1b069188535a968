//! On-disk qcow2 structures: parse and serialize from byte slices, no I/O.
