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
    page_hashes(data, page_size)
        .chunks_exact(32)
        .flat_map(|h| &h[..PAGE_DIGEST_LEN])
        .copied()
        .collect()
}

/// blake3 (32 bytes) of each piece of `data` cut at `page_size` (the last
/// may be short), concatenated: what `FileChunk.pages_blake3` is the
/// blake3 of, and whose first [`PAGE_DIGEST_LEN`] bytes per page are the
/// page digests the standby records (each byte is hashed once).
pub fn page_hashes(data: &[u8], page_size: usize) -> Vec<u8> {
    let page_size = page_size.max(1);
    let mut out = Vec::with_capacity(data.len().div_ceil(page_size) * 32);
    let done = wide_page_hashes(data, page_size, &mut out);
    for page in data[done..].chunks(page_size) {
        out.extend_from_slice(blake3::hash(page).as_bytes());
    }
    out
}

/// Appends `blake3::hash(page)` of each whole page of `data` to `out`, with
/// every SIMD lane busy, and returns the bytes that covered: 0 unless
/// `page_size` is a power of two from 512 to 64 KiB (BDB's page sizes).
///
/// Why: `blake3::hash` of one 4 KiB page compresses its four 1 KiB blake3
/// chunks side by side, leaving 12 of AVX-512's 16 lanes idle (measured on
/// this project's machine: 0.47 CPU-s per GiB page by page, 0.19 here).
/// Here chunk `j` of every page is compressed in one `hash_many` call, then
/// the parents of every page level by level: each page's own tree (BLAKE3
/// paper §2.1), so the same 32 bytes. This is Tandem's one use of
/// `blake3::platform`, which blake3 hides from its docs as not stable API:
/// the workspace Cargo.toml pins blake3 exactly, and the tests below
/// compare every page size with `blake3::hash`.
fn wide_page_hashes(data: &[u8], page_size: usize, out: &mut Vec<u8>) -> usize {
    use blake3::{platform::Platform, IncrementCounter::No, CHUNK_LEN};
    // blake3's flags and IV (the paper, §2.1 and §2.2).
    const CHUNK_START: u8 = 1;
    const CHUNK_END: u8 = 2;
    const PARENT: u8 = 4;
    const ROOT: u8 = 8;
    const IV: [u32; 8] = [
        0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB,
        0x5BE0CD19,
    ];
    let pages = data.len() / page_size;
    if !page_size.is_power_of_two() || !(512..=65536).contains(&page_size) || pages == 0 {
        return 0;
    }
    let platform = Platform::detect();
    let start = out.len();
    out.resize(start + pages * 32, 0);
    if page_size == 512 {
        // One short blake3 chunk per page: it is the root.
        let inputs: Vec<&[u8; 512]> = data
            .chunks_exact(512)
            .filter_map(|c| c.first_chunk())
            .collect();
        platform.hash_many(
            &inputs,
            &IV,
            0,
            No,
            0,
            CHUNK_START,
            CHUNK_END | ROOT,
            &mut out[start..],
        );
        return pages * page_size;
    }
    let per_page = page_size / CHUNK_LEN;
    let leaf_end = if per_page == 1 {
        CHUNK_END | ROOT
    } else {
        CHUNK_END
    };
    // cvs[(p * per_page + j) * 32..][..32]: chaining value of page p's chunk j.
    let mut cvs = vec![0u8; pages * per_page * 32];
    for j in 0..per_page {
        let inputs: Vec<&[u8; CHUNK_LEN]> = (0..pages)
            .filter_map(|p| data[p * page_size + j * CHUNK_LEN..].first_chunk())
            .collect();
        // Chunk j of a page is chunk j of that page's tree: counter j.
        let leaves = &mut out[start..];
        platform.hash_many(&inputs, &IV, j as u64, No, 0, CHUNK_START, leaf_end, leaves);
        for (p, cv) in leaves.chunks_exact(32).enumerate() {
            cvs[(p * per_page + j) * 32..][..32].copy_from_slice(cv);
        }
    }
    // Each level joins neighbours (a page's chunks stay together at every
    // level, per_page being a power of two); the last level is the root.
    let mut width = per_page;
    while width > 1 {
        width /= 2;
        let flags = if width == 1 { PARENT | ROOT } else { PARENT };
        let inputs: Vec<&[u8; 64]> = cvs
            .chunks_exact(64)
            .filter_map(|c| c.first_chunk())
            .collect();
        let mut next = vec![0u8; inputs.len() * 32];
        platform.hash_many(&inputs, &IV, 0, No, flags, 0, 0, &mut next);
        cvs = next;
    }
    out[start..].copy_from_slice(&cvs);
    pages * page_size
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

    /// Deterministic pseudo-random bytes (xorshift).
    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn by_blake3_hash(data: &[u8], page: usize) -> Vec<u8> {
        data.chunks(page)
            .flat_map(|p| *blake3::hash(p).as_bytes())
            .collect()
    }

    /// The wide digests (blake3::platform, pinned) are blake3::hash of each
    /// page, byte for byte: every page size BDB allows and sizes it does
    /// not, 0 to 300 pages (partial SIMD batches), short last pages, empty
    /// input, random and constant data, and the 16-byte page digests.
    #[test]
    fn page_hashes_are_blake3_of_each_page() {
        let mut wide_used = 0;
        for page in [
            1, 100, 511, 512, 1000, 1024, 2048, 3000, 4096, 8192, 16384, 32768, 65536, 131072,
        ] {
            for pages in [0usize, 1, 2, 3, 7, 15, 16, 17, 33, 300] {
                if page * pages > 8 << 20 {
                    continue;
                }
                for tail in [0, 1, 511, page.saturating_sub(1)] {
                    let len = page * pages + tail.min(page.saturating_sub(1));
                    let data = random_bytes(len, (page * 1_000 + pages * 10 + tail) as u64);
                    let want = by_blake3_hash(&data, page);
                    assert_eq!(
                        page_hashes(&data, page),
                        want,
                        "page {page}, {pages} pages, tail {tail}"
                    );
                    let short: Vec<u8> = want
                        .chunks(32)
                        .flat_map(|h| h[..PAGE_DIGEST_LEN].to_vec())
                        .collect();
                    assert_eq!(
                        page_digests(&data, page),
                        short,
                        "digests: page {page}, {pages} pages"
                    );
                    let mut out = vec![7u8; 5];
                    let done = wide_page_hashes(&data, page, &mut out);
                    assert_eq!(&out[..5], &[7u8; 5], "appends, never overwrites");
                    assert_eq!(out[5..], want[..out.len() - 5]);
                    if done > 0 {
                        wide_used += 1;
                        assert_eq!(done, page * pages);
                    }
                }
            }
        }
        assert!(wide_used > 100, "the wide path ran only {wide_used} times");
        // Constant pages (all alike) and the empty input.
        let zeros = vec![0u8; 4096 * 20];
        assert_eq!(page_hashes(&zeros, 4096), by_blake3_hash(&zeros, 4096));
        assert!(page_hashes(&[], 4096).is_empty());
        assert!(page_digests(&[], 4096).is_empty());
        // A page size of 0 is taken as 1, as before.
        assert_eq!(page_hashes(b"ab", 0), by_blake3_hash(b"ab", 1));
        // One flipped byte changes exactly its own page's hash.
        let mut data = random_bytes(4096 * 40, 3);
        let before = page_hashes(&data, 4096);
        data[4096 * 17 + 123] ^= 1;
        let after = page_hashes(&data, 4096);
        for (i, (a, b)) in before.chunks(32).zip(after.chunks(32)).enumerate() {
            assert_eq!(a == b, i != 17, "page {i}");
        }
    }

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
