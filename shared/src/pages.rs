//! Reading database pages from a live environment without shipping a torn
//! page. A buffered read racing BDB's page write can return half old, half
//! new bytes (BDB-NOTES.md §8). Tandem reads whole, aligned pages and re-reads
//! until two consecutive reads of every page agree; BDB writes a page with
//! one pwrite, so two identical reads are a page as BDB wrote it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Stops a page that never reads the same twice from blocking forever.
const MAX_READS: u32 = 64;

/// Reads `len` bytes at `offset` (both multiples of `page_size`, except
/// that the last page may be short at the end of the file) and returns
/// bytes in which every page was read identically twice in a row.
///
/// `second` holds the second read; the caller keeps it across calls so a
/// base copy allocates it once. The returned buffer is fresh and never
/// zero-filled (every byte returned was read), so it can be handed to the
/// network as is.
pub fn read_stable_pages(
    file: &File,
    offset: u64,
    len: usize,
    page_size: usize,
    second: &mut Vec<u8>,
) -> io::Result<Vec<u8>> {
    let mut first = Vec::new();
    read_appending(file, &mut first, offset, len)?;
    let n = first.len();
    second.resize(n, 0);
    let page_size = page_size.max(1);
    let again = read_at_most(file, second, offset)?;
    // The file shrank between the reads: keep the whole pages both reads
    // saw, so that the next read starts on a page boundary again.
    let n = if again < n {
        again - again % page_size
    } else {
        n
    };
    first.truncate(n);
    for start in (0..n).step_by(page_size) {
        let end = (start + page_size).min(n);
        let mut tries = 2;
        while first[start..end] != second[start..end] {
            if tries >= MAX_READS {
                return Err(io::Error::other(format!(
                    "page at offset {} changed on every one of {MAX_READS} reads",
                    offset + start as u64
                )));
            }
            first[start..end].copy_from_slice(&second[start..end]);
            let got = read_at_most(file, &mut second[start..end], offset + start as u64)?;
            if got < end - start {
                // Truncated under us: a short page cannot be proven stable.
                first.truncate(start);
                return Ok(first);
            }
            tries += 1;
        }
    }
    Ok(first)
}

/// Appends to `buf` what the file holds from `offset + buf.len()` on,
/// until `buf` is `upto` bytes long or the file ends, without zero-filling
/// the new part first (`offset` is the file offset of `buf[0]`).
pub fn read_appending(file: &File, buf: &mut Vec<u8>, offset: u64, upto: usize) -> io::Result<()> {
    buf.reserve_exact(upto.saturating_sub(buf.len()));
    while buf.len() < upto {
        let at = i64::try_from(offset + buf.len() as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let want = upto - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..want];
        // SAFETY: pread writes at most `want` bytes into memory we own;
        // `set_len` then covers only the bytes it wrote.
        let n = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), want, at) };
        match n {
            0 => break,
            n if n > 0 => unsafe { buf.set_len(buf.len() + n as usize) },
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Bytes of blake3 kept per page when comparing pages for a rebase: 128
/// bits, ample against accidental collisions.
pub const PAGE_DIGEST_LEN: usize = 16;

/// Concatenated per-page digests of `data` (the last page may be short):
/// the first [`PAGE_DIGEST_LEN`] bytes of blake3 of each page.
pub fn page_digests(data: &[u8], page_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(page_size.max(1)) * PAGE_DIGEST_LEN);
    for page in data.chunks(page_size.max(1)) {
        out.extend_from_slice(&blake3::hash(page).as_bytes()[..PAGE_DIGEST_LEN]);
    }
    out
}

/// blake3 (32 bytes) of each piece of `data` cut at `page_size` (the last
/// may be short), concatenated: what `FileChunk.pages_blake3` is the
/// blake3 of, and whose first [`PAGE_DIGEST_LEN`] bytes per page are the
/// page digests the standby records (each byte is hashed once).
pub fn page_hashes(data: &[u8], page_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(page_size.max(1)) * 32);
    for page in data.chunks(page_size.max(1)) {
        out.extend_from_slice(blake3::hash(page).as_bytes());
    }
    out
}

/// Reads into `buf` from `offset` until it is full or the file ends;
/// returns the bytes read.
pub fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_quiet_file_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let mut second = Vec::new();
        assert_eq!(
            read_stable_pages(&f, 0, 16384, 4096, &mut second).unwrap(),
            data
        );
        assert_eq!(
            read_stable_pages(&f, 4096, 4096, 4096, &mut second).unwrap(),
            &data[4096..8192]
        );
        assert_eq!(
            read_stable_pages(&f, 8192, 8192, 4096, &mut second).unwrap(),
            &data[8192..]
        );
        assert!(read_stable_pages(&f, 16384, 4096, 4096, &mut second)
            .unwrap()
            .is_empty());
    }
}
