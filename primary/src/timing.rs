//! Where the time of commit → durable goes on the primary, stage by stage
//! ([`tandem_shared::latency`]): the log watcher stamps each new end of log
//! it sees; a session times from there to the chunk that carries it going
//! out, and from the send to the standby's ack covering it; the first ack
//! covering an end times the whole way from the watcher to durable. The
//! metrics page serves the histograms (`tandem_primary_log_*_seconds`).

use tandem_shared::latency::{stage_histogram, Stamps};
use tandem_shared::metrics::Histogram;

#[derive(Debug)]
pub struct LogTiming {
    /// Ends of log, when the watcher first saw them.
    pub noticed: Stamps,
    /// How much later than asked the watcher woke for its next look (the
    /// scheduler's delay for a thread that sleeps one poll interval).
    pub watch_late: Histogram,
    /// From the watcher seeing an end to a session sending the chunk that
    /// reaches it.
    pub notice_to_send: Histogram,
    /// From a chunk's send to the ack covering it (the network both ways
    /// and the standby's write, fsync and ack).
    pub send_to_ack: Histogram,
    /// From the watcher seeing an end to the first standby's ack covering
    /// it: the primary's whole part of commit → durable, after the commit
    /// reached the log file.
    pub notice_to_ack: Histogram,
}

impl Default for LogTiming {
    fn default() -> Self {
        Self {
            noticed: Stamps::default(),
            watch_late: stage_histogram(),
            notice_to_send: stage_histogram(),
            send_to_ack: stage_histogram(),
            notice_to_ack: stage_histogram(),
        }
    }
}
