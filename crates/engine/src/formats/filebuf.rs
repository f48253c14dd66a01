//! A model file read once into memory we own.
//!
//! Model files used to be memory-mapped. A mapped file that is truncated
//! while loaded (a download restarted over it, a disk cleaned up) turns the
//! next read of a missing page into SIGBUS, which kills the whole Node
//! process with every other model and request in it. Reading the file into
//! an owned buffer costs one copy at load (the page cache serves it at
//! memory speed) and no extra memory afterwards, since nothing else keeps
//! the pages; after that the file on disk can change or vanish without
//! touching the loaded model.

use std::alloc::{alloc, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek};
use std::ops::Deref;
use std::path::Path;
use std::ptr::NonNull;

/// Tensor data is 32-byte aligned inside a GGUF file; aligning the buffer
/// to a cache line keeps that alignment in memory for the SIMD kernels.
const ALIGN: usize = 64;

/// A transparent huge page. Buffers of at least this size start on one
/// and ask Linux to back them with huge pages (`MADV_HUGEPAGE`, which the
/// common `madvise` setting of transparent huge pages waits for): decode
/// streams every weight byte once per token, and with 4 KiB pages that is
/// a TLB miss every 64 cache lines.
const HUGE: usize = 2 << 20;

fn layout(len: usize) -> Layout {
    let align = if len >= HUGE { HUGE } else { ALIGN };
    Layout::from_size_align(len.max(1), align).expect("buffer size")
}

/// Allocates `len` bytes for a buffer, asking for huge pages where it
/// pays (a hint: refused or unsupported, the buffer works the same).
fn allocate(len: usize) -> Option<NonNull<u8>> {
    // SAFETY: the layout has a non-zero size.
    let ptr = NonNull::new(unsafe { alloc(layout(len)) })?;
    #[cfg(target_os = "linux")]
    if len >= HUGE {
        // SAFETY: advice on memory this buffer owns; it changes no contents.
        unsafe { libc::madvise(ptr.as_ptr().cast(), len / HUGE * HUGE, libc::MADV_HUGEPAGE) };
    }
    Some(ptr)
}

pub struct FileBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is written only while being filled and while its
// model loads on one thread (`range_mut`); afterwards it is read-only.
unsafe impl Send for FileBuf {}
unsafe impl Sync for FileBuf {}

impl FileBuf {
    /// Reads exactly `len` bytes (the length seen when the file was opened).
    /// A file that shrinks while being read is an error, not a short buffer.
    pub fn read(file: &mut File, len: usize) -> std::io::Result<FileBuf> {
        if Layout::from_size_align(len.max(1), HUGE).is_err() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "file too large"));
        }
        let ptr = allocate(len).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, format!("cannot allocate {len} bytes"))
        })?;
        let buf = FileBuf { ptr, len };
        // SAFETY: freshly allocated, `len` bytes, uniquely owned here.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) };
        file.read_exact(dst).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(e.kind(), "the file shrank while it was being read")
            } else {
                e
            }
        })?;
        Ok(buf)
    }
}

impl FileBuf {
    /// `len` bytes of `byte`, written (so backed by memory, not the zero page).
    pub fn filled(len: usize, byte: u8) -> FileBuf {
        let ptr = allocate(len).expect("out of memory");
        // SAFETY: freshly allocated with room for `len` bytes.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), byte, len) };
        FileBuf { ptr, len }
    }

    /// An aligned copy of `bytes` (a file already in memory: fuzzing, tests).
    pub fn from_bytes(bytes: &[u8]) -> FileBuf {
        let ptr = allocate(bytes.len()).expect("out of memory");
        // SAFETY: freshly allocated with room for `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr(), bytes.len()) };
        FileBuf { ptr, len: bytes.len() }
    }
}

/// Opens `path` for reading if it is a regular file, with its length.
/// A FIFO, socket or device named as a model or config file would block
/// the open (or the read) until a writer appears, holding up the load or
/// the JavaScript thread that asked; the open is non-blocking so that the
/// check after it can refuse such a file at once.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "is a directory"));
    }
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok((file, meta.len()))
}

/// The most a model folder's JSON or template file may hold (the largest
/// real `tokenizer.json` files are about 35 MB).
pub const MAX_MODEL_TEXT: u64 = 128 << 20;
/// The most a YAML config file may hold.
pub const MAX_CONFIG_TEXT: u64 = 8 << 20;

/// A whole text file (a config, a template, a tokenizer), refused past
/// `limit` bytes before any of it is read.
pub fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{len} bytes, more than the {limit} allowed")));
    }
    let mut text = String::with_capacity(len as usize);
    // `take`: a file that grows while it is read stops at the limit too.
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than the {limit} bytes allowed")));
    }
    Ok(text)
}

impl FileBuf {
    /// Reads a whole model file once `check` has accepted its first `head`
    /// bytes (fewer if the file is shorter) and its length: a 1 GB file
    /// that is not a model is refused without reading it. Errors say which
    /// step failed (`cannot open: ...`).
    pub fn open(path: &Path, head: usize, check: impl FnOnce(&[u8], u64) -> Result<(), String>) -> Result<FileBuf, String> {
        let (mut file, len) = open_regular(path).map_err(|e| format!("cannot open: {e}"))?;
        let len = usize::try_from(len).map_err(|_| "file too large".to_string())?;
        let mut first = vec![0u8; head.min(len)];
        file.read_exact(&mut first).map_err(|e| format!("cannot read: {e}"))?;
        check(&first, len as u64)?;
        file.rewind().map_err(|e| format!("cannot read: {e}"))?;
        FileBuf::read(&mut file, len).map_err(|e| format!("cannot read: {e}"))
    }

    /// Bytes `offset..offset + len`, to rearrange in place (weights put into
    /// the kernels' layout at load, without a second copy).
    ///
    /// # Safety
    /// Only while the model is being loaded on one thread, and only for a
    /// range that no other live reference reads or writes: each weight
    /// matrix owns its tensor's bytes.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "range past the buffer");
        std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len)
    }
}

impl Deref for FileBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for FileBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `allocate` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout(self.len)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_whole_file_aligned_and_refuses_a_shrunk_one() {
        let path = std::env::temp_dir().join(format!("filebuf-{}.bin", std::process::id()));
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let mut f = File::open(&path).unwrap();
        let buf = FileBuf::read(&mut f, data.len()).unwrap();
        assert_eq!(&buf[..], &data[..]);
        assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
        // Claiming more than the file holds is the shape of a file truncated
        // between stat and read.
        let mut f = File::open(&path).unwrap();
        let err = FileBuf::read(&mut f, data.len() + 1).err().unwrap();
        assert!(err.to_string().contains("shrank"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_fifo_or_an_oversized_text_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.gguf");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string naming a path in a fresh directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer ever opens it: a blocking open would hang this test.
        assert_eq!(open_regular(&fifo).err().unwrap().to_string(), "not a regular file");
        assert_eq!(read_text(&fifo, 10).err().unwrap().to_string(), "not a regular file");
        assert_eq!(FileBuf::open(&fifo, 4, |_, _| Ok(())).err().unwrap(), "cannot open: not a regular file");
        assert_eq!(open_regular(dir.path()).err().unwrap().to_string(), "is a directory");
        let text = dir.path().join("config.json");
        std::fs::write(&text, "0123456789").unwrap();
        assert_eq!(read_text(&text, 10).unwrap(), "0123456789");
        assert!(read_text(&text, 9).err().unwrap().to_string().contains("10 bytes, more than the 9 allowed"));
        // The check sees the head before the rest is read.
        let err = FileBuf::open(&text, 4, |head, len| Err(format!("{:?} of {len}", std::str::from_utf8(head).unwrap()))).err().unwrap();
        assert_eq!(err, "\"0123\" of 10");
    }
}
