//! Changing which backing file the header names (`qemu-img rebase`): one header write, after
//! everything before it is on disk.

use super::Writer;
use crate::format::extension::HeaderExtension;
use crate::image::{Image, ImageError};

impl Image {
    /// Makes the header name `file` as the backing file, with `format` in the backing format
    /// extension (none when `None`), or no backing file at all when `file` is `None` (QEMU's
    /// `bdrv_change_backing_file`). Only the header changes: what the guest reads is the
    /// caller's business (a safe rebase first copies in what the new backing file reads
    /// differently). The open image keeps reading through the chain it was opened with;
    /// reopen it to read through the new one.
    ///
    /// Write order: every change made before is flushed and synced first, then the header is
    /// written and synced. A crash before the header write leaves the old backing file named
    /// over data that is right for either; the header write itself is a single write within the
    /// first sector's cluster, as QEMU's. Refused, with nothing written, when the header, its
    /// extensions and the name do not fit in the first cluster.
    pub fn change_backing_file(
        &self,
        file: Option<&str>,
        format: Option<&str>,
    ) -> Result<(), ImageError> {
        let mut w = self.writer("change_backing_file")?;
        let header = Self::header_naming(&w, file, format);
        header.serialize()?;
        let r = (|| {
            self.open_for_change(&mut w)?;
            self.flush_locked(&mut w)?;
            // open_for_change may have changed the header (autoclear bits): name on top of it.
            w.header = Self::header_naming(&w, file, format);
            self.write_header_with_extensions(&w)?;
            self.storage.flush()?;
            Ok(())
        })();
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// The writer's header with `file` and `format` named, laid out as QEMU lays it out (the
    /// backing format extension first, the name right after the extensions).
    fn header_naming(
        w: &Writer,
        file: Option<&str>,
        format: Option<&str>,
    ) -> crate::format::Header {
        let mut header = w.header.clone();
        header
            .extensions
            .retain(|e| !matches!(e, HeaderExtension::BackingFormat(_)));
        if let (Some(_), Some(format)) = (file, format) {
            header
                .extensions
                .insert(0, HeaderExtension::BackingFormat(format.to_owned()));
        }
        header.backing_file = file.map(str::to_owned);
        header.fix_layout();
        header
    }
}

#[cfg(test)]
mod tests {
    use crate::image::testutil::{created, open_alone as image};

    fn new_image() -> std::sync::Arc<crate::storage::MemStorage> {
        created(1 << 20)
    }

    #[test]
    fn the_header_names_the_new_backing_file_and_format() {
        let storage = new_image();
        let img = image(true, &storage);
        img.change_backing_file(Some("base.raw"), Some("raw"))
            .unwrap();
        drop(img);
        let img = image(false, &storage);
        assert_eq!(img.header().backing_file.as_deref(), Some("base.raw"));
        assert_eq!(img.header().backing_format(), Some("raw"));
        drop(img);

        let img = image(true, &storage);
        img.change_backing_file(None, None).unwrap();
        drop(img);
        let img = image(false, &storage);
        assert_eq!(img.header().backing_file, None);
        assert_eq!(img.header().backing_format(), None);
        assert_eq!(img.header().backing_file_offset, 0);
    }

    #[test]
    fn a_name_that_does_not_fit_is_refused_with_nothing_written() {
        let storage = new_image();
        let before = storage.snapshot();
        let img = image(true, &storage);
        let long = "x".repeat(2000);
        assert!(img.change_backing_file(Some(&long), Some("raw")).is_err());
        drop(img);
        assert_eq!(storage.snapshot(), before);
    }
}
