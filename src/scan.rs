//! Reads an image's metadata and fills a metadata map.
