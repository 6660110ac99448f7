//! File names from the primary: names and log directories that leave the
//! standby directory, symlinks planted before or while a file or the log is
//! received, a new base deleting through a planted link. Every refusal is
//! checked with `refuse`; uses the fixtures of `mirror::tests` (`tests/mod.rs`).

use super::*;

// ------------------------------------------------------------ 2: file names

/// Which `PathError` a case expects.
type Expected = fn(&PathError) -> bool;

#[test]
fn names_that_leave_the_directory_are_refused() {
    let mut fx = populated();
    let abs = fx.outside().join("abs.db").display().to_string();
    let long = "a/".repeat(600) + "x.db";
    let cases: Vec<(String, Expected)> = vec![
        (abs, |e| matches!(e, PathError::Absolute(_))),
        ("/etc/passwd".into(), |e| {
            matches!(e, PathError::Absolute(_))
        }),
        ("../escape.db".into(), |e| matches!(e, PathError::Dots(_))),
        ("../outside/victim.db".into(), |e| {
            matches!(e, PathError::Dots(_))
        }),
        ("a/../../escape.db".into(), |e| {
            matches!(e, PathError::Dots(_))
        }),
        ("..".into(), |e| matches!(e, PathError::Dots(_))),
        ("./data.db".into(), |e| matches!(e, PathError::Dots(_))),
        ("sub/./data.db".into(), |e| matches!(e, PathError::Dots(_))),
        ("sub/..".into(), |e| matches!(e, PathError::Dots(_))),
        (".tandem/state".into(), |e| {
            matches!(e, PathError::Hidden(_))
        }),
        (".tandem/incoming/x".into(), |e| {
            matches!(e, PathError::Hidden(_))
        }),
        ("..hidden.db".into(), |e| matches!(e, PathError::Hidden(_))),
        ("".into(), |e| matches!(e, PathError::Empty)),
        ("..\\escape.db".into(), |e| {
            matches!(e, PathError::BadCharacter(_))
        }),
        ("x.db\0../../escape".into(), |e| {
            matches!(e, PathError::BadCharacter(_))
        }),
        (long, |e| matches!(e, PathError::TooLong(_))),
    ];
    for (name, expected) in cases {
        for kind in [FileKind::Database, FileKind::Config] {
            let err = fx.refuse(file_start(&name, 4096, kind));
            assert!(
                matches!(&err, ApplyError::Path(p) if expected(p)),
                "{name:?} as {kind:?}: {err:?}"
            );
            assert!(err.to_string().starts_with("refused file name"), "{err}");
        }
    }
    assert!(!fx.base.path().join("escape.db").exists());
    // Still a working mirror.
    fx.ship("more.db", FileKind::Database, &db_bytes(4096, 9));
}

#[test]
fn a_log_directory_that_leaves_the_directory_is_refused() {
    let mut fx = Fx::new();
    let cases: [(&str, Expected); 4] = [
        ("../logs", |e| matches!(e, PathError::Dots(_))),
        ("/var/log", |e| matches!(e, PathError::Absolute(_))),
        ("logs/../..", |e| matches!(e, PathError::Dots(_))),
        (".tandem", |e| matches!(e, PathError::Hidden(_))),
    ];
    for (dir, expected) in cases {
        let err = fx.refuse(welcome(ENV, 1, dir));
        assert!(
            matches!(&err, ApplyError::Path(p) if expected(p)),
            "{dir}: {err:?}"
        );
    }
    assert_eq!(
        fx.m.state,
        StandbyState::default(),
        "a refused Welcome must not be recorded"
    );
    fx.ok(welcome(ENV, 1, "logs"));
}

#[test]
fn a_planted_symlink_is_never_written_through() {
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    std::os::unix::fs::symlink(outside.join("victim.db"), root.join("evil.db")).expect("symlink");
    std::os::unix::fs::symlink(&outside, root.join("evildir")).expect("symlink");
    std::fs::create_dir(root.join("sub")).expect("mkdir");
    std::os::unix::fs::symlink(&outside, root.join("sub/deeper")).expect("symlink");
    for name in [
        "evil.db",
        "evildir/x.db",
        "evildir/victim.db",
        "sub/deeper/x.db",
    ] {
        let err = fx.refuse(file_start(name, 4096, FileKind::Database));
        assert!(
            matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("goes through symlink"), "{err}");
    }
    // DB_CONFIG replaced by a link.
    std::fs::remove_file(root.join(DB_CONFIG)).expect("rm");
    std::os::unix::fs::symlink(outside.join("victim.db"), root.join(DB_CONFIG)).expect("symlink");
    let err = fx.refuse(file_start(DB_CONFIG, 100, FileKind::Config));
    assert!(
        matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
        "{err:?}"
    );
}

#[test]
fn a_symlink_planted_while_a_file_is_received_is_refused_at_install() {
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    let data = db_bytes(8192, 3);
    for (name, plant, link_target) in [
        ("late.db", root.join("late.db"), outside.join("victim.db")),
        ("sub/late.db", root.join("sub"), outside.clone()),
    ] {
        fx.ok(file_start(name, data.len() as u64, FileKind::Database));
        fx.ok(file_chunk(name, 0, &data[..4096]));
        fx.ok(file_chunk(name, 4096, &data[4096..]));
        std::os::unix::fs::symlink(&link_target, &plant).expect("symlink");
        let stored = fx.m.state.clone();
        let err = fx.refuse(file_end(name, data.len() as u64));
        assert!(
            matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
            "{name}: {err:?}"
        );
        assert_eq!(fx.m.state, stored);
        assert!(!fx
            .m
            .state
            .base
            .as_ref()
            .expect("base")
            .complete_files
            .contains(name));
        fx.m.begin_session(); // what a reconnect does
    }
    assert_eq!(
        std::fs::read(outside.join("victim.db")).expect("read"),
        b"precious data that is not the standby's"
    );
    assert!(!outside.join("late.db").exists());
}

#[test]
fn a_log_file_through_a_planted_symlink_is_refused() {
    // The next log file's name is a link out of the directory.
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    std::os::unix::fs::symlink(
        outside.join("victim.db"),
        root.join(logfile::log_file_name(2)),
    )
    .expect("symlink");
    let (img, _) = log_file(fx.m.tail().last_record.expect("log"), 10, 3);
    let err = fx.refuse(log_chunk(2, 0, &img));
    assert!(
        matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
        "{err:?}"
    );

    // The log directory itself is a link out of the directory.
    let mut fx = Fx::new();
    std::fs::create_dir(fx.outside().join("logs")).expect("mkdir");
    std::os::unix::fs::symlink(fx.outside().join("logs"), fx.root().join("logs")).expect("symlink");
    fx.ok(welcome(ENV, 1, "logs"));
    // Refused as soon as a base would use that directory, so no log arrives.
    let err = fx.refuse(base_start("b", 1, 0));
    assert!(
        matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
        "{err:?}"
    );
    let (img, _) = log_file(0, 0, 3);
    let err = fx.refuse(log_chunk(1, 0, &img));
    assert!(matches!(&err, ApplyError::Protocol(_)), "{err:?}");
    assert_eq!(
        std::fs::read_dir(fx.outside().join("logs"))
            .expect("ls")
            .count(),
        0
    );
}

#[test]
fn a_log_file_replaced_by_a_symlink_is_not_continued() {
    // The mirror's current log file is swapped for a link while the standby
    // is down. On restart, nothing may be written through it: not the
    // zeroing of a torn tail, not the next records.
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    let name = logfile::log_file_name(1);
    let (next_file, next_at, next) = next_records(&fx.m, 20, 4);
    std::fs::rename(root.join(&name), outside.join(&name)).expect("mv");
    std::os::unix::fs::symlink(outside.join(&name), root.join(&name)).expect("symlink");
    let before = tree(fx.base.path());
    match fx.reopen() {
        Err(e) => assert!(e.to_string().contains("symlink"), "{e}"),
        Ok(()) => {
            let err = fx.refuse(log_chunk(next_file, next_at, &next));
            assert!(
                matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
                "{err:?}"
            );
        }
    }
    assert_eq!(tree(fx.base.path()), before);

    // The same with a link to a file that is not a log at all: opening the
    // mirror must not zero it as "a torn log tail".
    let mut fx = populated();
    let (root, outside) = (fx.root(), fx.outside());
    std::fs::remove_file(root.join(&name)).expect("rm");
    std::os::unix::fs::symlink(outside.join("victim.db"), root.join(&name)).expect("symlink");
    let before = tree(fx.base.path());
    let _ = fx.reopen();
    assert_eq!(
        tree(fx.base.path()),
        before,
        "opening the mirror wrote through a symlink"
    );
}

#[test]
fn a_new_base_does_not_delete_through_a_planted_log_directory_link() {
    let mut fx = Fx::new();
    fx.ok(welcome(ENV, 1, "logs"));
    fx.ok(base_start("base-1", 1, 0));
    let (img, _) = log_file(0, 0, 3);
    fx.ok(log_chunk(1, 0, &img));
    fx.m.sync().expect("sync");
    let (root, outside) = (fx.root(), fx.outside());
    // The log directory becomes a link to someone else's log directory.
    std::fs::create_dir(outside.join("logs")).expect("mkdir");
    std::fs::write(
        outside.join("logs").join(logfile::log_file_name(7)),
        b"someone else's log",
    )
    .expect("write");
    std::fs::remove_dir_all(root.join("logs")).expect("rm");
    std::os::unix::fs::symlink(outside.join("logs"), root.join("logs")).expect("symlink");
    // A new base that starts past the standby's end would be taken (and
    // the old logs removed by listing that directory): refused first.
    let err = fx.refuse(base_start("base-2", 2, 0));
    assert!(
        matches!(&err, ApplyError::Path(PathError::Symlink { .. })),
        "{err:?}"
    );
}
