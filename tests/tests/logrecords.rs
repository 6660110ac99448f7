//! The log record reader (`tandem_shared::logrecords`) against BDB's own
//! `db5.3_printlog`, on logs real Berkeley DB wrote: every record's
//! position, type, transaction, prev_lsn, and the file id of every record
//! the reader says changes pages, and the uid and name of every
//! `__dbreg_register`. Promote trusts the reader to say which databases
//! the log changed; a record it decodes wrongly would skip a verify.

use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tandem_shared::logfile::{log_file_name, parse_log_file_name, walk_file};
use tandem_shared::logrecords::{file_uid, read_range, RecordKind};
use tandem_shared::LogPosition;
use tandem_tests::bdb::{run_workload, WorkloadOptions};
use tandem_tests::harness::Scratch;

/// What `db5.3_printlog` says about one record.
#[derive(Debug, Default)]
struct Printed {
    name: String,
    rectype: u32,
    txnid: u32,
    prev: LogPosition,
    /// Field name → value text, first occurrence.
    fields: BTreeMap<String, String>,
}

fn lsn(text: &str) -> Option<LogPosition> {
    let t = text.strip_prefix('[')?.strip_suffix(']')?;
    let (f, o) = t.split_once("][")?;
    Some(LogPosition::new(f.parse().ok()?, o.parse().ok()?))
}

fn printlog(env: &Path) -> Result<BTreeMap<LogPosition, Printed>> {
    let out = Command::new("db5.3_printlog").arg("-h").arg(env).output()?;
    ensure!(out.status.success(), "db5.3_printlog failed");
    let text = String::from_utf8(out.stdout)?;
    let mut records = BTreeMap::new();
    let mut current: Option<(LogPosition, Printed)> = None;
    for line in text.lines() {
        if line.starts_with('[') {
            if let Some((at, p)) = current.take() {
                records.insert(at, p);
            }
            // [1][8628]__dbreg_register: rec: 2 txnp 80000001 prevlsn [1][8588]
            let (head, rest) = line.split_once(':').context("record line")?;
            let close = head.find("]__").context("record name")? + 1;
            let at = lsn(&head[..close]).context("record lsn")?;
            let w: Vec<&str> = rest.split_whitespace().collect();
            ensure!(w.len() >= 6 && w[0] == "rec:" && w[2] == "txnp", "{line}");
            current = Some((
                at,
                Printed {
                    name: head[close..].to_owned(),
                    rectype: w[1].parse()?,
                    txnid: u32::from_str_radix(w[3], 16)?,
                    prev: lsn(w[5]).context("prevlsn")?,
                    fields: BTreeMap::new(),
                },
            ));
        } else if let (Some((_, p)), Some((k, v))) = (current.as_mut(), line.trim().split_once(':'))
        {
            p.fields
                .entry(k.trim().to_owned())
                .or_insert_with(|| v.trim().to_owned());
        }
    }
    if let Some((at, p)) = current {
        records.insert(at, p);
    }
    Ok(records)
}

/// The end of the valid log: the walk's end in the last log file.
fn log_end(env: &Path) -> Result<(LogPosition, LogPosition)> {
    let mut numbers: Vec<u32> = std::fs::read_dir(env)?
        .filter_map(|e| e.ok()?.file_name().to_str().and_then(parse_log_file_name))
        .collect();
    numbers.sort();
    let (first, last) = (numbers[0], *numbers.last().context("no log")?);
    let f = std::fs::File::open(env.join(log_file_name(last)))?;
    Ok((
        LogPosition::new(first, 0),
        LogPosition::new(last, walk_file(&f, None)?.end),
    ))
}

#[test]
fn every_record_reads_as_db_printlog_prints_it() -> Result<()> {
    let s = Scratch::new()?;
    let env = s.path("env");
    std::fs::create_dir_all(&env)?;
    let opts = WorkloadOptions {
        txns: 2000,
        checkpoint_every: 300,
        lg_max: 256 << 10,
        updates: 4,
        ..Default::default()
    };
    run_workload(&env, &opts)?;
    // A second run joins the environment again (new registrations, ids).
    run_workload(&env, &WorkloadOptions { txns: 500, ..opts })?;
    // The workload's regions can hold records its close logged but never
    // wrote (DB_TXN_WRITE_NOSYNC); printlog would print them from there.
    for e in std::fs::read_dir(&env)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("__db.") {
            std::fs::remove_file(e.path())?;
        }
    }
    let printed = printlog(&env)?;
    let (from, to) = log_end(&env)?;
    let mut read = std::collections::BTreeSet::new();
    let mut pages = 0usize;
    let mut registers = 0usize;
    let mut kinds = std::collections::BTreeSet::new();
    let mut failure: Option<String> = None;
    read_range(&env, from, to, |r, bytes| {
        if failure.is_some() {
            return;
        }
        read.insert(r.lsn);
        let Some(p) = printed.get(&r.lsn) else {
            failure = Some(format!("{}: printlog has no record there", r.lsn));
            return;
        };
        let same = p.rectype == r.rectype
            && p.txnid == r.txnid
            && p.prev == r.prev_lsn
            && bytes.len() == r.len as usize;
        if !same {
            failure = Some(format!("{}: read {r:?}, printed {p:?}", r.lsn));
            return;
        }
        kinds.insert(p.name.clone());
        match &r.kind {
            RecordKind::Page { fileid } => {
                pages += 1;
                if p.fields.get("fileid") != Some(&fileid.to_string()) {
                    failure = Some(format!("{}: file id {fileid}, printed {p:?}", r.lsn));
                }
            }
            RecordKind::Register {
                fileid, uid, name, ..
            } => {
                registers += 1;
                let ok = p.fields.get("fileid") == Some(&fileid.to_string())
                    && p.fields
                        .get("uid")
                        .is_some_and(|u| u.ends_with(&tandem_shared::to_hex(uid)))
                    && p.fields
                        .get("name")
                        .is_some_and(|n| n.contains(name.as_str()));
                if !ok {
                    failure = Some(format!("{}: register {r:?}, printed {p:?}", r.lsn));
                }
            }
            RecordKind::Doubt { .. } if !p.name.starts_with("__fop_") => {
                failure = Some(format!("{}: in doubt about {}", r.lsn, p.name));
            }
            _ => {}
        }
    })?;
    if let Some(f) = failure {
        anyhow::bail!(f);
    }
    // Every record printlog printed was read (the persist records are not
    // records to printlog either).
    let missed: Vec<_> = printed.keys().filter(|k| !read.contains(k)).collect();
    ensure!(
        missed.is_empty(),
        "not read: {missed:?} of {}",
        printed.len()
    );
    ensure!(
        pages > 1000 && registers > 6,
        "{pages} page records, {registers} registers"
    );
    for needed in [
        "__bam_repl",
        "__bam_split",
        "__db_addrem",
        "__ham_insdel",
        "__txn_ckp",
    ] {
        ensure!(kinds.contains(needed), "no {needed} in {kinds:?}");
    }
    // The uids registered are the meta pages' uids.
    for db in ["data.db", "meta.db", "hash.db"] {
        let page = std::fs::read(env.join(db))?;
        let uid = tandem_shared::to_hex(&file_uid(&page).context("meta page")?);
        let text = String::from_utf8(
            Command::new("db5.3_printlog")
                .arg("-h")
                .arg(&env)
                .output()?
                .stdout,
        )?;
        ensure!(text.contains(&uid), "{db}'s uid {uid} is never registered");
    }
    Ok(())
}
