//! Reading database pages from a live environment without shipping a torn
//! page. A buffered read racing BDB's page write can return half old, half
//! new bytes (BDB.md §8). Tandem reads whole, aligned pages and re-reads
//! until two consecutive reads of every page agree; BDB writes a page with
//! one pwrite, so two identical reads are a page as BDB wrote it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Stops a page that never reads the same twice from blocking forever.
const MAX_READS: u32 = 64;

/// Reads `len` bytes at `offset` (both multiples of `page_size`, except
/// that the last page may be short at the end of the file) and returns
/// bytes in which every page was read identically twice in a row.
pub fn read_stable_pages(file: &File, offset: u64, len: usize, page_size: usize) -> io::Result<Vec<u8>> {
    let mut first = vec![0u8; len];
    let n = read_at_most(file, &mut first, offset)?;
    first.truncate(n);
    let mut second = vec![0u8; n];
    read_at_most(file, &mut second, offset)?;
    let page_size = page_size.max(1);
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
            read_at_most(file, &mut second[start..end], offset + start as u64)?;
            tries += 1;
        }
    }
    Ok(first)
}

/// Bytes of blake3 kept per page when comparing pages for a rebase: 128
/// bits, ample against accidental collisions.
pub const PAGE_DIGEST_LEN: usize = 16;

/// Concatenated per-page digests of `data` (the last page may be short).
pub fn page_digests(data: &[u8], page_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(page_size.max(1)) * PAGE_DIGEST_LEN);
    for page in data.chunks(page_size.max(1)) {
        out.extend_from_slice(&blake3::hash(page).as_bytes()[..PAGE_DIGEST_LEN]);
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
        assert_eq!(read_stable_pages(&f, 0, 16384, 4096).unwrap(), data);
        assert_eq!(read_stable_pages(&f, 4096, 4096, 4096).unwrap(), &data[4096..8192]);
    }
}
