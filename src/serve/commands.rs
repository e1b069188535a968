//! One NBD request carried out on the image, and the bytes of its reply.
//!
//! Writes, zeroes and trims go through the same engine calls as the Python API
//! (`write_at`, `write_zeroes`, `discard`), so the guard checks each of them. As in qemu-nbd,
//! `--discard=ignore` (the default) answers a trim without doing it and keeps zeroed clusters
//! allocated; `--detect-zeroes` turns a write of zeros into an engine zero write. A write the
//! guard refuses is answered `EIO` with the engine's message (the image is then marked corrupt
//! by the engine, as for a direct write), and the server logs one line and goes on serving.
//! With structured replies, reads send the runs of whole zero 4 KiB granules they read as holes.

use super::{DetectZeroes, Discard, WriteModes};
use crate::convert::is_zero;
use crate::format::GuestOffset;
use crate::image::{ErrorKind, GuestExtent, Image, ImageError};
use crate::nbd::{Command, ExportConfig, Extent, Framing, NbdError, Negotiated, Request, Session};

/// Guest map entries asked for at a time.
const MAP_BATCH: usize = 1024;
/// The most extents one block status reply describes per context: qemu-nbd's 1 MiB of 8-byte
/// extents.
const MAX_REPLY_EXTENTS: usize = (1 << 20) / 8;

/// Reads send runs of zeros this long (and aligned) as holes.
const HOLE_GRANULE: u64 = 4096;

/// `base:allocation`: not allocated as data.
const STATE_HOLE: u64 = 1;
/// `base:allocation`: reads as zeros.
const STATE_ZERO: u64 = 2;

/// The metadata contexts a connection selected, by what they report.
pub(super) struct Contexts {
    /// `(id, context)` in the order they were selected.
    selected: Vec<(u32, Context)>,
}

#[derive(Clone)]
enum Context {
    /// `base:allocation`: hole and zero flags.
    Allocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 this image, 2 its backing file, ...
    Depth,
    /// `qemu:dirty-bitmap:NAME`: 1 where the persistent bitmap NAME is dirty.
    Dirty(String),
}

impl Contexts {
    pub(super) fn new(negotiated: &Negotiated, export: &ExportConfig) -> Self {
        let selected = negotiated
            .meta_contexts
            .iter()
            .filter_map(|m| {
                let name = export.meta_contexts.get(m.index)?;
                match name.as_str() {
                    "base:allocation" => Some((m.id, Context::Allocation)),
                    "qemu:allocation-depth" => Some((m.id, Context::Depth)),
                    other => other
                        .strip_prefix("qemu:dirty-bitmap:")
                        .map(|b| (m.id, Context::Dirty(b.to_owned()))),
                }
            })
            .collect();
        Self { selected }
    }
}

/// Carries out `request` (with its write `payload`) and returns the reply's bytes.
pub(super) fn execute(
    image: &Image,
    writes: WriteModes,
    session: &Session,
    contexts: &Contexts,
    request: &Request,
    payload: &[u8],
) -> Vec<u8> {
    let framing = session.framing();
    let to = request.reply_to();
    let mut out = Vec::new();
    let result = match &request.command {
        Command::Read { offset, length, df } => {
            return read(image, framing, request, *offset, *length, *df);
        }
        Command::Write { offset, fua, .. } => {
            let at = GuestOffset(*offset);
            let written = match writes.detect_zeroes {
                DetectZeroes::Off => image.write_at(at, payload),
                _ if !is_zero(payload) => image.write_at(at, payload),
                DetectZeroes::On => image.write_zeroes(at, payload.len() as u64, false),
                DetectZeroes::Unmap => {
                    image.write_zeroes(at, payload.len() as u64, writes.discard == Discard::Unmap)
                }
            };
            written.and_then(|()| flush_if(image, *fua))
        }
        Command::Flush => image.flush(),
        Command::Trim {
            offset,
            length,
            fua,
        } => match writes.discard {
            // Answered as done: a trim is only a hint (qemu-nbd's default).
            Discard::Ignore => Ok(()),
            Discard::Unmap => image.discard(GuestOffset(*offset), *length),
        }
        .and_then(|()| flush_if(image, *fua)),
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast_zero,
        } => {
            if *fast_zero && !zeroes_are_fast(image, *offset, *length) {
                framing.error_reply(&mut out, to, NbdError::NotSup, "zeroing is not fast here");
                return out;
            }
            // Clusters are freed only where the client allows it and discards are carried out.
            let unmap = !*no_hole && writes.discard == Discard::Unmap;
            image
                .write_zeroes(GuestOffset(*offset), *length, unmap)
                .and_then(|()| flush_if(image, *fua))
        }
        Command::Cache { .. } => Ok(()),
        Command::BlockStatus {
            offset,
            length,
            req_one,
            context_ids,
        } => {
            return block_status(
                image,
                framing,
                request,
                contexts,
                (*offset, *length, *req_one),
                context_ids.as_deref(),
            );
        }
        // Not advertised, so refused by the parser; answered the same way if it ever came.
        Command::Resize { .. } | Command::Disc => Err(ImageError::Unsupported(
            "this command is not supported".into(),
        )),
    };
    match result {
        Ok(()) => framing.ok_reply(&mut out, to),
        Err(e) => error_reply(&mut out, framing, request, &e),
    }
    out
}

/// Whether zeroing the range only changes metadata: version 3 zero flags over whole clusters
/// (a version 2 image, or a partial cluster, gets zeros written).
fn zeroes_are_fast(image: &Image, offset: u64, length: u64) -> bool {
    let cs = image.geometry().cluster_size();
    let end = offset.saturating_add(length);
    image.header().version >= 3
        && offset % cs == 0
        && (end % cs == 0 || end == image.virtual_size())
}

fn flush_if(image: &Image, fua: bool) -> Result<(), ImageError> {
    if fua {
        image.flush()
    } else {
        Ok(())
    }
}

/// An error reply for `e`, logged when the guard refused the write.
fn error_reply(out: &mut Vec<u8>, framing: Framing, request: &Request, e: &ImageError) {
    let error = match e.kind() {
        ErrorKind::Os(errno) => NbdError::from_errno(errno),
        ErrorKind::ReadOnly => NbdError::Perm,
        ErrorKind::InvalidArgument => NbdError::Inval,
        ErrorKind::OutOfMemory => NbdError::NoMem,
        ErrorKind::Unsupported => NbdError::NotSup,
        _ => NbdError::Io,
    };
    let message = e.message();
    // One line for the refusal itself; the writes refused after it (the engine marked the image
    // corrupt) are only answered.
    if e.kind() == ErrorKind::MetadataOverlap {
        eprintln!("qcow2ovl: serve: request refused: {message}");
    }
    framing.error_reply(out, request.reply_to(), error, &message);
}

/// The guest map over `[offset, offset + length)`, clipped to it, at most `max` entries.
fn map_range(
    image: &Image,
    offset: u64,
    length: u64,
    max: usize,
) -> Result<Vec<GuestExtent>, ImageError> {
    let end = offset.saturating_add(length).min(image.virtual_size());
    let mut extents = Vec::new();
    let mut pos = offset;
    while pos < end && extents.len() < max {
        let (batch, next) = image.guest_map_chunk(pos, MAP_BATCH)?;
        if next <= pos || batch.is_empty() {
            break;
        }
        for mut e in batch {
            if e.start >= end || extents.len() >= max {
                break;
            }
            let stop = (e.start + e.length).min(end);
            e.start = e.start.max(pos);
            e.length = stop - e.start;
            if e.length > 0 {
                extents.push(e);
            }
        }
        pos = next;
    }
    Ok(extents)
}

/// `NBD_CMD_READ`: the data, with holes sent as holes in structured replies (unless `df`).
fn read(
    image: &Image,
    framing: Framing,
    request: &Request,
    offset: u64,
    length: u32,
    df: bool,
) -> Vec<u8> {
    let to = request.reply_to();
    let mut out = Vec::new();
    let mut buf = vec![0u8; length as usize];
    if let Err(e) = image.read_at(GuestOffset(offset), &mut buf) {
        error_reply(&mut out, framing, request, &e);
        return out;
    }
    if framing == Framing::Simple {
        let _ = framing.simple(&mut out, to.cookie, None);
        out.extend_from_slice(&buf);
        return out;
    }
    if length == 0 {
        let _ = framing.none(&mut out, to);
        return out;
    }
    // Pieces of (start, len, hole), in order, covering the request: runs of whole zero
    // granules (4 KiB, guest-aligned) are sent as holes. Judged from the bytes read, which
    // costs a scan of memory the reply sends anyway, where asking the map would cost a walk
    // of it per request.
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let end = offset + u64::from(length);
    let mut pos = offset;
    while pos < end {
        let next = if df {
            end
        } else {
            ((pos / HOLE_GRANULE + 1) * HOLE_GRANULE).min(end)
        };
        let at = (pos - offset) as usize;
        let hole = !df
            && (next - pos == HOLE_GRANULE || next == end && pos % HOLE_GRANULE == 0)
            && is_zero(&buf[at..at + (next - pos) as usize]);
        match pieces.last_mut() {
            Some(last) if last.2 == hole => last.1 += next - pos,
            _ => pieces.push((pos, next - pos, hole)),
        }
        pos = next;
    }
    let last = pieces.len() - 1;
    for (i, (start, len, hole)) in pieces.into_iter().enumerate() {
        let done = i == last;
        let at = (start - offset) as usize;
        let encoded = if hole {
            framing.offset_hole(&mut out, to, done, start, len as u32)
        } else {
            framing.offset_data(&mut out, to, done, start, &buf[at..at + len as usize])
        };
        if encoded.is_err() {
            out.clear();
            framing.error_reply(&mut out, to, NbdError::Io, "reply could not be encoded");
            break;
        }
    }
    out
}

/// `NBD_CMD_BLOCK_STATUS`: one chunk per context, extents from the guest map.
fn block_status(
    image: &Image,
    framing: Framing,
    request: &Request,
    contexts: &Contexts,
    (offset, length, req_one): (u64, u64, bool),
    ids: Option<&[u32]>,
) -> Vec<u8> {
    let to = request.reply_to();
    let mut out = Vec::new();
    let max = if req_one { 1 } else { MAX_REPLY_EXTENTS };
    let map = match map_range(image, offset, length, max) {
        Ok(m) if !m.is_empty() => m,
        Ok(_) => {
            framing.error_reply(&mut out, to, NbdError::Inval, "range past the end");
            return out;
        }
        Err(e) => {
            error_reply(&mut out, framing, request, &e);
            return out;
        }
    };
    let chosen: Vec<&(u32, Context)> = contexts
        .selected
        .iter()
        .filter(|(id, _)| ids.map_or(true, |ids| ids.contains(id)))
        .collect();
    let count = chosen.len();
    for (i, (id, context)) in chosen.into_iter().enumerate() {
        let extents = match context {
            Context::Dirty(name) => {
                let end = map.last().map_or(offset, |e| e.start + e.length);
                match dirty(image, name, offset, end, max) {
                    Ok(extents) => extents,
                    Err(e) => {
                        out.clear();
                        error_reply(&mut out, framing, request, &e);
                        return out;
                    }
                }
            }
            _ => allocation(&map, context, req_one),
        };
        if framing
            .block_status(&mut out, to, i + 1 == count, *id, &extents)
            .is_err()
        {
            out.clear();
            framing.error_reply(&mut out, to, NbdError::Io, "reply could not be encoded");
            return out;
        }
    }
    if count == 0 {
        framing.error_reply(
            &mut out,
            to,
            NbdError::Inval,
            "no metadata context selected",
        );
    }
    out
}

/// The extents of an allocation context over the guest map's entries.
fn allocation(map: &[GuestExtent], context: &Context, req_one: bool) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for e in map {
        let status = match context {
            Context::Allocation => {
                (if e.data { 0 } else { STATE_HOLE }) | (if e.zero { STATE_ZERO } else { 0 })
            }
            Context::Depth if e.present => u64::from(e.depth) + 1,
            Context::Depth | Context::Dirty(_) => 0,
        };
        match extents.last_mut() {
            Some(last) if last.status == status => last.length += e.length,
            _ => extents.push(Extent {
                length: e.length,
                status,
            }),
        }
    }
    if req_one {
        extents.truncate(1);
    }
    extents
}

/// The extents of `qemu:dirty-bitmap:NAME` over `[offset, end)`: 1 dirty, 0 clean; at most
/// `max`.
fn dirty(
    image: &Image,
    name: &str,
    offset: u64,
    end: u64,
    max: usize,
) -> Result<Vec<Extent>, ImageError> {
    let mut extents: Vec<Extent> = Vec::new();
    let mut push = |length: u64, status: u64| {
        if length > 0 && extents.len() < max {
            extents.push(Extent { length, status });
        }
    };
    let mut pos = offset;
    for (start, len) in image.dirty_extents(name, offset, end - offset)? {
        let (start, stop) = (start.max(pos), (start + len).min(end));
        if stop <= start {
            continue;
        }
        push(start - pos, 0);
        push(stop - start, 1);
        pos = stop;
    }
    push(end - pos, 0);
    Ok(extents)
}
