//! Giving start-up's memory back once the daemon is ready.
//!
//! What start-up needed and the running daemon does not:
//! - heap left free by parsing YAML, certificate work and eBPF loading, which glibc keeps
//!   unless asked to trim;
//! - code pages. The daemon's resident size is mostly its own machine code: every page start-up
//!   ran (CLI, config and YAML parsing, the CA, the eBPF loader) stays mapped, and the kernel
//!   maps file pages 64 KiB around each fault, so after start most of `.text` is resident
//!   (4.1 of 4.9 MB measured) although the idle loop and the data path use a fraction of it.
//!   Dropping the mappings of the read-only segments lets the process keep only what it
//!   touches from then on (1.4 MB measured); the pages stay in the page cache and fault back
//!   in (a minor fault, no I/O) when used. Writable segments (data, relocated pointers) are
//!   never touched. One visible effect: breakpoints or uprobes placed in the daemon's code
//!   before `ready` are gone after it (they live in private copies of code pages), and
//!   profilers may find code unmapped; `--release-code-pages=false` keeps the code pages.

use std::ffi::c_void;

/// Trims the heap and, with `code_pages`, unmaps the read-only segments of every loaded object
/// (the executable, libc, the dynamic loader); returns the bytes of address space released (not
/// all of it was resident).
pub fn release_startup_memory(code_pages: bool) -> usize {
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists; it is
    // thread-safe and takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
    if !code_pages {
        return 0;
    }
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    // SAFETY: the callback only reads the program headers the loader hands it, for the
    // duration of the call, and writes to the Vec passed as `data`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(collect_readonly), (&raw mut ranges).cast());
    }
    let mut released = 0;
    for (start, len) in ranges {
        // SAFETY: [start, start + len) lies page-aligned inside a read-only PT_LOAD segment
        // of a loaded object (a private file mapping that was never written), so dropping it
        // only makes the next access fault the same file contents back in.
        if unsafe { libc::madvise(start as *mut c_void, len, libc::MADV_DONTNEED) } == 0 {
            released += len;
        }
    }
    released
}

/// Connections (inbound HBONE connections and streams) that must have gone since the busiest
/// moment before the heap is trimmed: a burst, not the ordinary coming and going of flows.
pub const TRIM_AFTER_DROP: usize = 256;

/// Gives the heap freed by a burst of connections back to the kernel.
///
/// glibc keeps freed memory in its arenas (one per thread that allocated, so each data-plane
/// worker has its own) and returns only the top of the main heap by itself: after 2,000 peers
/// held TLS handshakes open and were closed, the daemon's resident size stayed where the
/// burst had taken it. `malloc_trim(0)` releases the free pages of every arena, also those in
/// the middle of a heap. It walks the free lists (a few milliseconds for a heap of a few
/// hundred MiB), so it runs only when the count of connections has fallen by
/// [`TRIM_AFTER_DROP`] since its peak, at most once per call of [`Reclaim::after`] (every
/// second in the daemon), never per connection.
///
/// Steady traffic never falls that far, yet leaves free heap behind too: in a 30-minute run of
/// 200 short connections a second, the moments when more of them overlapped (a busy host) left
/// the arenas' free lists larger each time, and resident anonymous memory rose in steps that
/// were never given back. So every [`STEADY_CHECK`] calls the free heap is also measured
/// (`mallinfo2`, which takes each arena's lock only to sum its free lists) and trimmed when it
/// has grown by [`STEADY_FREE_GROWTH`] since the last trim. Free chunks smaller than a page
/// cannot be given back, so the baseline is what was free right after the previous trim.
#[derive(Debug, Default)]
pub struct Reclaim {
    peak: usize,
    /// Count at the previous call.
    last: usize,
    /// Trimmed during a burst that is still winding down: trim once more when it settles.
    winding_down: bool,
    /// Calls since the free heap was last measured.
    since_check: u32,
    /// Free heap bytes right after the last trim.
    free_floor: usize,
}

/// Calls of [`Reclaim::after`] between two measurements of the free heap (30 s in the daemon).
pub const STEADY_CHECK: u32 = 30;

/// Growth of the free heap since the last trim that makes a steady-state trim worthwhile.
pub const STEADY_FREE_GROWTH: usize = 256 << 10;

impl Reclaim {
    /// Given the connections open `now`: gives memory back if a burst has ended since the last
    /// time (a fall of [`TRIM_AFTER_DROP`] from the peak, or the count settling after such a
    /// fall), returning the resident bytes given back. With `code_pages`, the code pages the
    /// burst faulted in are dropped again too (as after start-up).
    pub fn after(&mut self, now: usize, code_pages: bool) -> Option<usize> {
        self.peak = self.peak.max(now);
        let fell = self.peak - now;
        let settled = self.winding_down && fell > 0 && now == self.last;
        self.last = now;
        self.since_check += 1;
        let burst = fell >= TRIM_AFTER_DROP || settled;
        if burst {
            self.winding_down = !settled;
            self.peak = now;
        } else {
            if self.since_check < STEADY_CHECK {
                return None;
            }
            self.since_check = 0;
            if heap().free < self.free_floor + STEADY_FREE_GROWTH {
                return None;
            }
        }
        let before = resident_bytes();
        release_startup_memory(burst && code_pages);
        self.free_floor = heap().free;
        Some(before.saturating_sub(resident_bytes()))
    }
}

/// The allocator's heap, summed over its arenas.
#[derive(Debug, Clone, Copy)]
pub struct Heap {
    /// Allocated and not yet freed (including blocks mapped on their own).
    pub in_use: usize,
    /// Free but kept by the allocator (resident or not).
    pub free: usize,
}

/// Reads the allocator's statistics: what resident memory is made of, for operators and the
/// soak run (a leak grows `in_use`; fragmentation grows `free`).
pub fn heap() -> Heap {
    // SAFETY: mallinfo2 only reads the allocator's own statistics (under each arena's lock)
    // and returns them by value.
    let info = unsafe { libc::mallinfo2() };
    Heap {
        in_use: info.uordblks + info.hblkhd,
        free: info.fordblks,
    }
}

/// Gives the heap that state changes left free back to the kernel: a trim [`TRIM_INTERVAL`]
/// after a change, repeated while changes go on, so at most one trim per interval and none
/// owed once they stop. Returns the trims this call made: 0 when a trim another call has
/// scheduled covers this change. Spawned as a task: it waits on the runtime's timer (a
/// runtime shutting down drops it rather than waiting) and trims on a blocking thread.
///
/// A change frees the previous snapshot's indexes and the parsed objects, in whichever
/// glibc arenas the threads that built them used: left alone, a stream of changes grew the
/// daemon's resident size by tens of MiB over a few hundred updates although the state did
/// not grow. The trim trails the change rather than skipping it when one ran less than an
/// interval ago: skipped, the last second of a burst stayed resident until a change that
/// might never come.
pub async fn trim_after_state_change() -> usize {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    static CHANGES: AtomicU64 = AtomicU64::new(0);
    static SCHEDULED: AtomicBool = AtomicBool::new(false);
    CHANGES.fetch_add(1, SeqCst);
    if SCHEDULED.swap(true, SeqCst) {
        return 0;
    }
    let mut trims = 0;
    loop {
        tokio::time::sleep(TRIM_INTERVAL).await;
        let seen = CHANGES.load(SeqCst);
        // SAFETY: as in `release_startup_memory`: malloc_trim walks the allocator's own lists.
        let trimmed = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        trims += usize::from(trimmed.is_ok());
        if CHANGES.load(SeqCst) != seen {
            continue;
        }
        SCHEDULED.store(false, SeqCst);
        // A change counted between the check and the store saw a trim scheduled and left it
        // to this one: trim again unless a newer call has taken over.
        if CHANGES.load(SeqCst) == seen || SCHEDULED.swap(true, SeqCst) {
            return trims;
        }
    }
}

/// How long a trim trails the state change that asked for it, and so the most often state
/// changes trim the heap ([`trim_after_state_change`]).
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Resident bytes of this process (`/proc/self/statm`); 0 when unreadable.
pub fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * page_size())
}

/// `dl_iterate_phdr` callback: appends the whole pages of each non-writable `PT_LOAD` segment
/// to the `Vec<(start, len)>` behind `data`. Skips the vDSO, which is not a file mapping.
unsafe extern "C" fn collect_readonly(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: the loader passes a valid `dl_phdr_info` and our `data` (see the caller).
    let (info, ranges) = unsafe { (&*info, &mut *data.cast::<Vec<(usize, usize)>>()) };
    // SAFETY: getauxval has no preconditions.
    let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    let base = info.dlpi_addr as usize;
    if info.dlpi_phdr.is_null() || (vdso != 0 && base == vdso) {
        return 0;
    }
    // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers of this object.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
    let page = page_size();
    for ph in phdrs {
        if ph.p_type != libc::PT_LOAD || ph.p_flags & libc::PF_W != 0 {
            continue;
        }
        let from = base + ph.p_vaddr as usize;
        if let Some(range) = whole_pages(from, ph.p_memsz as usize, page) {
            ranges.push(range);
        }
    }
    0
}

/// The whole pages inside `[start, start + len)`: never a page shared with a neighbour.
fn whole_pages(start: usize, len: usize, page: usize) -> Option<(usize, usize)> {
    let first = start.div_ceil(page) * page;
    let end = (start + len) / page * page;
    (end > first).then(|| (first, end - first))
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changes close together share one trim; one that arrives while a trim is pending is
    /// left to it, and the next burst gets its own.
    #[tokio::test]
    async fn a_trim_trails_each_burst_of_state_changes() {
        let first = tokio::spawn(trim_after_state_change());
        tokio::time::sleep(TRIM_INTERVAL / 4).await;
        let asked = std::time::Instant::now();
        assert_eq!(
            trim_after_state_change().await,
            0,
            "covered by the pending trim"
        );
        assert!(asked.elapsed() < TRIM_INTERVAL / 4, "did not wait for it");
        assert_eq!(first.await.expect("the trimming task"), 1);
        assert_eq!(
            trim_after_state_change().await,
            1,
            "a later change trims again"
        );
    }

    #[test]
    fn only_whole_pages_are_released() {
        assert_eq!(whole_pages(4096, 8192, 4096), Some((4096, 8192)));
        assert_eq!(whole_pages(4000, 8192, 4096), Some((4096, 4096)));
        assert_eq!(whole_pages(4000, 100, 4096), None);
    }

    /// Steady traffic (no fall in connections) still has its free heap measured every
    /// [`STEADY_CHECK`] calls, and trimmed when it has grown since the last trim.
    #[test]
    fn steady_traffic_trims_grown_free_heap() {
        let mut reclaim = Reclaim::default();
        // Every other block freed: 2 MiB of holes that cannot merge into the top of the heap
        // (which `free` itself may give back).
        let blocks: Vec<Box<[u8; 512]>> = (0..8192).map(|_| Box::new([1; 512])).collect();
        let kept: Vec<_> = blocks.into_iter().step_by(2).collect();
        for _ in 1..STEADY_CHECK {
            assert_eq!(reclaim.after(10, false), None);
        }
        assert!(
            reclaim.after(10, false).is_some(),
            "2 MiB freed, not trimmed"
        );
        drop(kept);
        for _ in 1..STEADY_CHECK {
            assert_eq!(reclaim.after(10, false), None);
        }
    }

    /// In this test process: code and read-only data are released and everything still runs
    /// (this function's own code faults back in), and the resident size goes down.
    #[test]
    fn code_keeps_working_after_release() {
        let resident = || {
            let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
            statm
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<usize>().ok())
                .expect("resident pages")
        };
        let before = resident();
        let released = release_startup_memory(true);
        let after = resident();
        assert!(released > 1 << 20, "released {released} bytes");
        assert!(after < before, "resident pages {before} -> {after}");
        let text = format!("{:?}", std::collections::BTreeMap::from([(1, "a")]));
        assert_eq!(text, r#"{1: "a"}"#);
    }
}
