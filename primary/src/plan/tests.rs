//! Unit tests of [`super::plan`]: resume, refuse as diverged (also by the
//! epoch history), or a new base, on synthetic log files.

use super::*;
use tandem_shared::logfile::synth;

const LG_MAX: u32 = 1 << 16;

/// An environment with log files 1 and 2, three records each; returns
/// the layout and, per file, the offsets just past each record.
fn env(dir: &std::path::Path) -> (EnvLayout, Vec<Vec<u32>>) {
    let bodies: [&[u8]; 3] = [b"alpha record", b"beta", b"gamma gamma gamma"];
    let mut ends = Vec::new();
    for n in 1..=2u32 {
        let image = synth::file(0, LG_MAX, &bodies, 4096);
        let w = tandem_shared::logfile::walk(&image, 0, None);
        let mut file_ends = vec![];
        let mut at = 0u32;
        for body in std::iter::once(&[0u8; 16][..]).chain(bodies.iter().copied()) {
            at += 12 + body.len() as u32;
            file_ends.push(at);
        }
        assert_eq!(*file_ends.last().unwrap(), w.end);
        ends.push(file_ends);
        std::fs::write(dir.join(format!("log.{n:010}")), image).unwrap();
    }
    (EnvLayout::open(dir).unwrap(), ends)
}

fn hello(durable: LogPosition, digest: Vec<u8>) -> Hello {
    Hello {
        base_id: "base".into(),
        durable: Some(durable.into()),
        last_record_digest: digest.into(),
        ..Default::default()
    }
}

/// A primary at epoch 1, with no history.
fn plan1(layout: &EnvLayout, hello: &Hello) -> Result<Plan, Refusal> {
    plan(layout, hello, 1, &[])
}

fn digest_of_last_record(layout: &EnvLayout, at: LogPosition) -> Vec<u8> {
    let f = File::open(layout.log_path(at.file)).unwrap();
    let r = read_verified(&f, 0, None, at.offset as usize).unwrap();
    let last = r.walk.last_record.unwrap() as usize;
    blake3::hash(&r.bytes[last..]).as_bytes().to_vec()
}

#[test]
fn a_standby_at_a_matching_record_boundary_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let at = LogPosition::new(2, ends[1][2]);
    let p = plan1(&layout, &hello(at, digest_of_last_record(&layout, at))).unwrap();
    assert!(matches!(p, Plan::Resume { from, prev: Some(_) } if from == at));
}

#[test]
fn an_io_error_reading_the_log_is_unavailable_never_a_new_base() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let at = LogPosition::new(1, ends[0][2]);
    // A directory where the log file was: listed, opened, unreadable.
    std::fs::remove_file(layout.log_path(1)).unwrap();
    std::fs::create_dir(layout.log_path(1)).unwrap();
    let r = plan1(&layout, &hello(at, vec![])).unwrap_err();
    assert!(matches!(r, Refusal::Unavailable(_)), "{r}");
    assert_eq!(Status::from(r).code(), tonic::Code::Unavailable);
    // The same with the newest file, read for the end of log.
    std::fs::remove_file(layout.log_path(2)).unwrap();
    std::fs::create_dir(layout.log_path(2)).unwrap();
    let r = plan1(&layout, &hello(at, vec![])).unwrap_err();
    assert!(matches!(r, Refusal::Unavailable(_)), "{r}");
}

#[test]
fn a_standby_beyond_the_end_of_log_has_diverged() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let end = LogPosition::new(2, ends[1][3]);
    for (at, beyond) in [
        (LogPosition::new(2, end.offset + 100), 100),
        (
            LogPosition::new(4, 500),
            u64::from(LG_MAX - end.offset + LG_MAX + 500),
        ),
    ] {
        let Err(Refusal::Diverged(d)) = plan1(&layout, &hello(at, vec![])) else {
            panic!("{at} must be refused");
        };
        assert_eq!(d.kind, DivergenceKind::BeyondEnd);
        assert_eq!(d.beyond, Some(beyond));
        let msg = Status::from(Refusal::Diverged(d)).message().to_owned();
        assert!(msg.starts_with("diverged:"), "{msg}");
        for needle in [
            at.to_string(),
            end.to_string(),
            "--start-over".into(),
            "promote".into(),
        ] {
            assert!(msg.contains(&needle), "{msg} lacks {needle}");
        }
    }
    // Waiting at the start of the next file is not beyond anything.
    let next = LogPosition::new(3, 0);
    assert!(matches!(
        plan1(&layout, &hello(next, vec![])),
        Ok(Plan::Resume { from, .. }) if from == next
    ));
}

#[test]
fn a_standby_longer_than_an_older_file_has_diverged() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let at = LogPosition::new(1, ends[0][3] + 40);
    let Err(Refusal::Diverged(d)) = plan1(&layout, &hello(at, vec![])) else {
        panic!("must be refused");
    };
    assert_eq!((d.kind, d.beyond), (DivergenceKind::BeyondEnd, Some(40)));
}

#[test]
fn a_standby_inside_a_record_or_with_another_last_record_has_diverged() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let inside = LogPosition::new(2, ends[1][2] - 3);
    let Err(Refusal::Diverged(d)) = plan1(&layout, &hello(inside, vec![])) else {
        panic!("must be refused");
    };
    assert_eq!(d.kind, DivergenceKind::NotARecordBoundary);
    let at = LogPosition::new(2, ends[1][2]);
    let Err(Refusal::Diverged(d)) = plan1(&layout, &hello(at, vec![7; 32])) else {
        panic!("must be refused");
    };
    assert_eq!(d.kind, DivergenceKind::LastRecordDiffers);
    assert_eq!(d.beyond, Some(u64::from(ends[1][2] - ends[1][1])));
}

#[test]
fn a_gap_a_request_or_no_base_lead_to_a_new_base() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let at = LogPosition::new(1, ends[0][2]);
    let mut h = hello(at, vec![]);
    h.new_base_request = "operator: run --start-over".into();
    assert!(
        matches!(plan1(&layout, &h), Ok(Plan::NewBase { reason }) if reason.contains("--start-over"))
    );
    h.new_base_request.clear();
    h.base_id.clear();
    assert!(matches!(plan1(&layout, &h), Ok(Plan::NewBase { .. })));
    std::fs::remove_file(layout.log_path(1)).unwrap();
    assert!(matches!(
        plan1(&layout, &hello(at, vec![])),
        Ok(Plan::NewBase { reason }) if reason.contains("are gone from the primary")
    ));
}

/// Epoch 2 began at `x`, the end of record 2 of file 2.
fn history_at(layout: &EnvLayout, x: LogPosition) -> Vec<EpochStart> {
    vec![EpochStart {
        epoch: 2,
        start: x,
        prev_record_digest: digest_of_last_record(layout, x),
    }]
}

#[test]
fn an_older_epoch_holding_a_prefix_of_the_history_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let x = LogPosition::new(2, ends[1][2]);
    let history = history_at(&layout, x);
    for at in [
        x,
        LogPosition::new(1, ends[0][3]),
        LogPosition::new(2, ends[1][1]),
    ] {
        let mut h = hello(at, digest_of_last_record(&layout, at));
        h.epoch = 1;
        let p = plan(&layout, &h, 2, &history).unwrap();
        assert!(
            matches!(p, Plan::Resume { from, .. } if from == at),
            "{at}: {p:?}"
        );
    }
}

#[test]
fn an_older_epoch_holding_log_beyond_the_epoch_start_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let x = LogPosition::new(2, ends[1][1]);
    let history = history_at(&layout, x);
    // The standby's last record matches the primary's at its position:
    // only the history tells the two apart.
    let at = LogPosition::new(2, ends[1][3]);
    let mut h = hello(at, digest_of_last_record(&layout, at));
    h.epoch = 1;
    let Err(Refusal::Diverged(d)) = plan(&layout, &h, 2, &history) else {
        panic!("must be refused");
    };
    assert_eq!(
        d.kind,
        DivergenceKind::BeyondEpochStart { epoch: 2, start: x }
    );
    let beyond = u64::from(ends[1][3] - ends[1][1]);
    assert_eq!(d.beyond, Some(beyond));
    let status = Status::from(Refusal::Diverged(d));
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let msg = status.message();
    assert!(msg.starts_with("diverged:"), "{msg}");
    for needle in [
        x.to_string(),
        at.to_string(),
        format!("{beyond} bytes"),
        "--rejoin".into(),
        "promote".into(),
    ] {
        assert!(msg.contains(&needle), "{msg} lacks {needle}");
    }
    // The same standby once it follows epoch 2 (its log is epoch 2's).
    h.epoch = 2;
    assert!(matches!(
        plan(&layout, &h, 2, &history),
        Ok(Plan::Resume { .. })
    ));
    // An empty standby or one that asks for a new base is not refused.
    h.epoch = 1;
    h.new_base_request = "operator: run --start-over".into();
    assert!(matches!(
        plan(&layout, &h, 2, &history),
        Ok(Plan::NewBase { .. })
    ));
}

#[test]
fn an_older_epoch_without_a_recorded_start_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let at = LogPosition::new(2, ends[1][1]);
    let mut h = hello(at, digest_of_last_record(&layout, at));
    h.epoch = 1;
    let r = plan(&layout, &h, 2, &[]).unwrap_err();
    assert!(matches!(r, Refusal::HistoryUnknown { .. }), "{r}");
    // The history names epoch 3 only: where epoch 2 left epoch 1's log
    // is unknown.
    let x = LogPosition::new(2, ends[1][2]);
    let mut history = history_at(&layout, x);
    history[0].epoch = 3;
    let r = plan(&layout, &h, 3, &history).unwrap_err();
    assert!(matches!(r, Refusal::HistoryUnknown { .. }), "{r}");
}

#[test]
fn a_diverged_standby_that_asks_to_rejoin_gets_a_page_delta_base() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, ends) = env(dir.path());
    let end = LogPosition::new(2, ends[1][3]);
    let mut h = hello(LogPosition::new(2, end.offset + 100), vec![]);
    h.rejoin = true;
    assert!(matches!(
        plan1(&layout, &h),
        Ok(Plan::Rejoin { discard_after, .. }) if discard_after == end
    ));
    let at = LogPosition::new(2, ends[1][2]);
    let mut h = hello(at, vec![7; 32]);
    h.rejoin = true;
    assert!(matches!(
        plan1(&layout, &h),
        Ok(Plan::Rejoin { discard_after, .. }) if discard_after == LogPosition::new(2, ends[1][1])
    ));
    // One it can continue is continued: no base.
    let mut h = hello(at, digest_of_last_record(&layout, at));
    h.rejoin = true;
    assert!(matches!(plan1(&layout, &h), Ok(Plan::Resume { .. })));
}
