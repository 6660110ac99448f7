//! Where the standby's part of commit → durable goes, stage by stage
//! ([`tandem_shared::latency`]): the reader stamps the end of each log
//! chunk as it comes off the stream; the applier times from there to the
//! fsync that makes it durable, and the fsync itself; the acker times from
//! the fsync to the ack going out. The metrics page serves the histograms
//! (`tandem_standby_log_*_seconds`).

use tandem_shared::latency::{stage_histogram, LastEvent, Stamps};
use tandem_shared::metrics::Histogram;

#[derive(Debug)]
pub struct FollowTiming {
    /// Ends of the log chunks read off the stream, when they were read.
    pub received: Stamps,
    /// From reading a chunk off the stream to the fsync that made it
    /// durable returning (the queue, the write, the batch, the fsync).
    pub receive_to_durable: Histogram,
    /// One fsync of the log (per batch of chunks).
    pub log_fsync: Histogram,
    /// From that fsync returning to the ack covering it being handed to
    /// the stream.
    pub durable_to_ack: Histogram,
    /// The last durable position the applier published, and when.
    pub published: LastEvent,
}

impl Default for FollowTiming {
    fn default() -> Self {
        Self {
            received: Stamps::default(),
            receive_to_durable: stage_histogram(),
            log_fsync: stage_histogram(),
            durable_to_ack: stage_histogram(),
            published: LastEvent::default(),
        }
    }
}
