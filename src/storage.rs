//! Positioned I/O over an image file or an in-memory buffer.
