//! The YAML file backend of MarsDB: creation, live edits (in place, by
//! rename, with `sed -i`), invalid edits that block API writes, atomic and
//! serialised write-back.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vivian_core::marsdb::{
    Database, Dut, FileMarsDb, FileOptions, MacAddr, MarsDb, MarsDbError, MarsDbExt, UpdateError,
    ValidationError, Validator,
};

const SAMPLE: &str = include_str!("data/marsdb-seed-sample.yaml");
/// Generous bound for a file edit to be seen (the target is far below).
const EDIT_SEEN: Duration = Duration::from_secs(10);

fn sample_id() -> MacAddr {
    "de:ad:be:ef:ca:fe".parse().unwrap()
}

fn setup(content: Option<&str>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mars_db.yaml");
    if let Some(c) = content {
        std::fs::write(&path, c).unwrap();
    }
    (dir, path)
}

async fn open(path: &Path) -> FileMarsDb {
    FileMarsDb::open(path, FileOptions::default())
        .await
        .unwrap()
}

/// Waits (bounded) until the published database satisfies `pred`.
async fn wait_db(
    rx: &mut watch::Receiver<Arc<Database>>,
    what: &str,
    pred: impl Fn(&Database) -> bool,
) {
    tokio::time::timeout(EDIT_SEEN, rx.wait_for(|db| pred(db)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .unwrap();
}

/// Waits (bounded) until the database error satisfies `pred`.
async fn wait_error(
    rx: &mut watch::Receiver<Option<ValidationError>>,
    what: &str,
    pred: impl Fn(&Option<ValidationError>) -> bool,
) -> Option<ValidationError> {
    tokio::time::timeout(EDIT_SEEN, rx.wait_for(|e| pred(e)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .unwrap()
        .clone()
}

fn comment_of(db: &Database) -> Option<String> {
    db.duts.get(&sample_id()).and_then(|d| d.comment.clone())
}

fn set_comment(text: &str, comment: &str) -> String {
    text.replace("    comment: null  ", &format!("    comment: {comment}  "))
}

fn leftover_temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "mars_db.yaml")
        .collect()
}

#[tokio::test]
async fn a_missing_file_is_created_and_an_empty_file_is_an_empty_database() {
    let (dir, path) = setup(None);
    let db = open(&path).await;
    assert_eq!(*db.snapshot(), Database::new());
    assert_eq!(db.error(), None);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "pdus: {}\nduts: {}\ngitlab: {}\n"
    );
    drop(db);

    std::fs::write(&path, "").unwrap();
    let db = open(&path).await;
    assert_eq!(*db.snapshot(), Database::new());
    assert_eq!(db.error(), None);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "",
        "opening does not rewrite the file"
    );
    assert!(leftover_temp_files(dir.path()).is_empty());

    let missing_dir = dir.path().join("nope").join("mars_db.yaml");
    match FileMarsDb::open(&missing_dir, FileOptions::default()).await {
        Err(MarsDbError::Io { path, .. }) => assert!(path.starts_with(dir.path())),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a missing folder should be an error"),
    }
}

#[tokio::test]
async fn an_edit_in_place_is_applied() {
    let (_dir, path) = setup(Some(SAMPLE));
    let db = open(&path).await;
    let mut rx = db.subscribe();
    assert_eq!(comment_of(&db.snapshot()), None);

    std::fs::write(&path, set_comment(SAMPLE, "in-place")).unwrap();
    wait_db(&mut rx, "the in-place edit", |d| {
        comment_of(d).as_deref() == Some("in-place")
    })
    .await;
    assert_eq!(db.error(), None);
}

#[tokio::test]
async fn edits_by_rename_are_applied_every_time() {
    let (dir, path) = setup(Some(SAMPLE));
    let db = open(&path).await;
    let mut rx = db.subscribe();
    // The watch survives the file being replaced, again and again.
    for i in 0..3 {
        let tmp = dir.path().join(format!("new-{i}.yaml"));
        std::fs::write(&tmp, set_comment(SAMPLE, &format!("renamed-{i}"))).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let want = format!("renamed-{i}");
        wait_db(&mut rx, "the edit by rename", |d| {
            comment_of(d).as_deref() == Some(want.as_str())
        })
        .await;
    }
}

#[tokio::test]
async fn an_edit_with_sed_in_place_is_applied() {
    let (_dir, path) = setup(Some(SAMPLE));
    let db = open(&path).await;
    let mut rx = db.subscribe();
    // GNU sed -i writes a temporary file and renames it over the original.
    let status = std::process::Command::new("sed")
        .args(["-i", "s/base_name: gfx9 /base_name: gfx10/"])
        .arg(&path)
        .status()
        .expect("sed (Debian package sed) must be installed");
    assert!(status.success());
    wait_db(&mut rx, "the sed -i edit", |d| {
        d.duts.get(&sample_id()).map(|x| x.base_name.as_str()) == Some("gfx10")
    })
    .await;
    assert_eq!(
        db.snapshot().full_name(&sample_id(), "farm").as_deref(),
        Some("farm-gfx10-1")
    );
}

#[tokio::test]
async fn an_invalid_edit_keeps_the_last_good_database_and_blocks_writes_until_fixed() {
    let (_dir, path) = setup(Some(SAMPLE));
    let db = open(&path).await;
    let good = db.snapshot();
    let mut errors = db.subscribe_error();

    let broken = SAMPLE.replace("    pdu: APC  ", "    pdu: APC2 ");
    std::fs::write(&path, &broken).unwrap();
    let err = wait_error(
        &mut errors,
        "the invalid edit to be reported",
        Option::is_some,
    )
    .await
    .unwrap();
    let shown = err.to_string();
    let expected_suffix = "duts.de:ad:be:ef:ca:fe.pdu: unknown PDU \"APC2\"";
    assert!(shown.ends_with(expected_suffix), "{shown}");
    assert_eq!(err.file.as_deref(), Some(path.as_path()));
    assert_eq!((err.line, err.column), (Some(36), Some(10)), "{shown}");
    assert!(
        shown.starts_with(&format!("{}:36:10: ", path.display())),
        "{shown}"
    );
    assert!(
        Arc::ptr_eq(&good, &db.snapshot()),
        "the last good database stays in force"
    );

    // An API write is refused with that error and the file is left alone.
    let res = db
        .update(|d| {
            d.duts[&sample_id()].comment = Some("from the API".into());
            Ok::<_, String>(())
        })
        .await;
    match res {
        Err(UpdateError::Db(MarsDbError::InvalidFile(e))) => assert_eq!(e, err),
        other => panic!("the write should be refused, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        broken,
        "byte for byte as the admin wrote it"
    );
    assert!(Arc::ptr_eq(&good, &db.snapshot()));

    // Fixing the file clears the error and applies it; writes work again.
    let mut rx = db.subscribe();
    std::fs::write(&path, set_comment(SAMPLE, "fixed")).unwrap();
    wait_error(&mut errors, "the error to clear", Option::is_none).await;
    wait_db(&mut rx, "the fixed file", |d| {
        comment_of(d).as_deref() == Some("fixed")
    })
    .await;
    db.update(|d| {
        d.duts[&sample_id()].comment = Some("from the API".into());
        Ok::<_, String>(())
    })
    .await
    .unwrap();
    let on_disk = Database::from_yaml(&std::fs::read_to_string(&path).unwrap(), None).unwrap();
    assert_eq!(comment_of(&on_disk).as_deref(), Some("from the API"));
}

#[tokio::test]
async fn a_write_right_after_an_edit_never_overwrites_it() {
    let (_dir, path) = setup(Some(SAMPLE));
    let db = open(&path).await;

    // Invalid edit, then a write at once (before any file event is handled).
    let broken = format!("{SAMPLE}\nbogus_top_level_key: 1\n");
    std::fs::write(&path, &broken).unwrap();
    let res = db.update(|d| {
        d.duts[&sample_id()].is_retired = true;
        Ok::<_, String>(())
    });
    match res.await {
        Err(UpdateError::Db(MarsDbError::InvalidFile(e))) => {
            assert!(
                e.to_string()
                    .contains("unknown field `bogus_top_level_key`"),
                "{e}"
            )
        }
        other => panic!("the write should be refused, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);

    // Valid edit, then a write at once: both survive.
    std::fs::write(&path, set_comment(SAMPLE, "admin")).unwrap();
    db.update(|d| {
        d.duts[&sample_id()].is_retired = true;
        Ok::<_, String>(())
    })
    .await
    .unwrap();
    let on_disk = Database::from_yaml(&std::fs::read_to_string(&path).unwrap(), None).unwrap();
    let dut = &on_disk.duts[&sample_id()];
    assert_eq!(
        (dut.comment.as_deref(), dut.is_retired),
        (Some("admin"), true)
    );
    assert_eq!(*db.snapshot(), on_disk);
}

#[tokio::test]
async fn a_removed_file_blocks_writes_until_it_is_back() {
    let (_dir, path) = setup(Some(SAMPLE));
    let db = open(&path).await;
    let mut errors = db.subscribe_error();
    std::fs::remove_file(&path).unwrap();
    let err = wait_error(&mut errors, "the removal to be reported", Option::is_some)
        .await
        .unwrap();
    assert!(err.to_string().contains("removed"), "{err}");
    assert_eq!(
        db.snapshot().duts.len(),
        1,
        "the last good database stays in force"
    );
    let res = db.update(|d| {
        d.duts.clear();
        Ok::<_, String>(())
    });
    assert!(matches!(
        res.await,
        Err(UpdateError::Db(MarsDbError::InvalidFile(_)))
    ));
    assert!(!path.exists(), "the write did not recreate the file");

    std::fs::write(&path, SAMPLE).unwrap();
    wait_error(&mut errors, "the error to clear", Option::is_none).await;
}

#[tokio::test]
async fn writes_are_atomic_in_schema_order_and_skipped_when_nothing_changes() {
    use std::os::unix::fs::MetadataExt;
    let (dir, path) = setup(Some(SAMPLE));
    let db = open(&path).await;
    let mut rx = db.subscribe();
    rx.mark_unchanged();

    // Same values: no write at all (same inode, same bytes), no notification.
    let ino = std::fs::metadata(&path).unwrap().ino();
    db.update(|d| {
        d.duts[&sample_id()].pdu_off_delay = 30.0;
        Ok::<_, String>(())
    })
    .await
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), SAMPLE);
    assert!(!rx.has_changed().unwrap());

    // A real change: the file is replaced (rename) by the written form.
    let snap = db
        .apply(Box::new(|d: &mut Database| {
            d.duts[&sample_id()].comment = Some("api".into());
            Ok(())
        }))
        .await
        .unwrap();
    assert_ne!(
        std::fs::metadata(&path).unwrap().ino(),
        ino,
        "written by rename"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, snap.to_yaml());
    assert!(
        text.contains("    first_seen: 2021-12-22 16:57:08.146275\n    comment: api\n"),
        "{text}"
    );
    assert!(leftover_temp_files(dir.path()).is_empty());
    assert!(rx.has_changed().unwrap());
    rx.mark_unchanged();

    // Our own write coming back through the watcher is not a change.
    db.reload().await.unwrap();
    assert!(!rx.has_changed().unwrap());
    assert_eq!(db.error(), None);
}

#[tokio::test]
async fn first_seen_is_kept_across_reloads_and_written_with_the_next_write() {
    let text =
        "duts:\n  52:54:00:11:22:33:\n    base_name: new\n    ip_address: 10.0.0.1\n    tags: []\n";
    let (_dir, path) = setup(Some(text));
    let db = open(&path).await;
    let id: MacAddr = "52:54:00:11:22:33".parse().unwrap();
    let first = db.snapshot().duts[&id].first_seen;
    let mut rx = db.subscribe();
    std::fs::write(&path, format!("{text}    comment: hello\n")).unwrap();
    wait_db(&mut rx, "the edit", |d| d.duts[&id].comment.is_some()).await;
    assert_eq!(db.snapshot().duts[&id].first_seen, first);

    db.update(|d| {
        d.duts[&id].is_retired = true;
        Ok::<_, String>(())
    })
    .await
    .unwrap();
    let on_disk = Database::from_yaml(&std::fs::read_to_string(&path).unwrap(), None).unwrap();
    assert_eq!(on_disk.duts[&id].first_seen, first);
}

#[tokio::test]
async fn the_vpdu_endpoint_adds_or_overwrites_the_vpdu() {
    let (_dir, path) = setup(None);
    let opts = FileOptions {
        vpdu_endpoint: Some("127.0.0.1:9999".into()),
        ..FileOptions::default()
    };
    let db = FileMarsDb::open(&path, opts.clone()).await.unwrap();
    let vpdu = db.snapshot().pdus["VPDU"].clone();
    assert_eq!(
        (vpdu.driver.as_str(), vpdu.hostname()),
        ("vpdu", Some("127.0.0.1:9999"))
    );
    drop(db);

    std::fs::write(&path, SAMPLE).unwrap();
    let db = FileMarsDb::open(&path, opts).await.unwrap();
    let snap = db.snapshot();
    assert_eq!(
        snap.pdus["VPDU"].hostname(),
        Some("127.0.0.1:9999"),
        "overwritten"
    );
    assert_eq!(snap.pdus.len(), 2);

    // An admin edit does not remove it.
    let mut rx = db.subscribe();
    std::fs::write(
        &path,
        set_comment(SAMPLE, "x").replace("localhost:9191", "elsewhere:1"),
    )
    .unwrap();
    wait_db(&mut rx, "the edit", |d| comment_of(d).is_some()).await;
    assert_eq!(
        db.snapshot().pdus["VPDU"].hostname(),
        Some("127.0.0.1:9999")
    );
}

#[tokio::test]
async fn the_extra_validator_names_the_pdu_in_the_file() {
    let (_dir, path) = setup(Some(SAMPLE));
    let v: Validator = Arc::new(|db: &Database| {
        for (name, pdu) in &db.pdus {
            if !["vpdu", "apc_masterswitch"].contains(&pdu.driver.as_str()) {
                return Err(ValidationError::new(
                    format!("pdus.{name}.driver"),
                    format!("unknown PDU driver {:?}", pdu.driver),
                ));
            }
        }
        Ok(())
    });
    let opts = FileOptions {
        validator: Some(v),
        ..FileOptions::default()
    };
    let db = FileMarsDb::open(&path, opts).await.unwrap();
    assert_eq!(db.error(), None);
    let mut errors = db.subscribe_error();
    std::fs::write(&path, SAMPLE.replace("driver: vpdu", "driver: vpdv")).unwrap();
    let err = wait_error(&mut errors, "the unknown driver", Option::is_some)
        .await
        .unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:13:13: pdus.VPDU.driver: unknown PDU driver \"vpdv\"",
            path.display()
        )
    );
}

#[tokio::test]
async fn an_invalid_file_at_start_is_reported_and_blocks_writes() {
    let (_dir, path) = setup(Some("duts: [\n"));
    let db = open(&path).await;
    let err = db.error().expect("the error is reported at once");
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2:", path.display())),
        "{err}"
    );
    assert_eq!(*db.snapshot(), Database::new());
    assert!(matches!(
        db.update(|_| Ok::<_, String>(())).await,
        Err(UpdateError::Db(MarsDbError::InvalidFile(_)))
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "duts: [\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_writes_lose_nothing() {
    let (_dir, path) = setup(Some(SAMPLE));
    let db: Arc<dyn MarsDb> = Arc::new(open(&path).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let db = db.clone();
        tasks.spawn(async move {
            let b = i.to_be_bytes();
            let id = MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]]);
            let ip = Ipv4Addr::new(10, b[1], b[2], b[3]);
            db.update(move |d| {
                d.duts.insert(id, Dut::new(id, "sim", ip, vec![]));
                // A read-modify-write of shared data as well: the counter
                // only ends at 1000 if no update was lost.
                let c = &mut d.duts[&sample_id()].pdu_off_delay;
                *c += 1.0;
                Ok::<_, String>(())
            })
            .await
            .unwrap();
        });
    }
    let started = std::time::Instant::now();
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    eprintln!("1000 concurrent MarsDB writes took {:?}", started.elapsed());
    let snap = db.snapshot();
    assert_eq!(snap.duts.len(), 1001);
    assert_eq!(snap.duts[&sample_id()].pdu_off_delay, 30.0 + 1000.0);
    let on_disk = Database::from_yaml(&std::fs::read_to_string(&path).unwrap(), None).unwrap();
    assert_eq!(on_disk, *snap);
    assert_eq!(db.error(), None);
}

/// Reading the file (our own re-reads, a backup tool, `cat`) is not an
/// edit: it must not make the backend read the file again, or an idle
/// executor would re-read its database in a loop.
#[tokio::test]
async fn reading_the_file_does_not_trigger_a_reload() {
    let (_dir, path) = setup(Some(SAMPLE));
    let db = open(&path).await;
    // Let any event of the start-up settle (debounce 30 ms, max 300 ms).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = db.disk_reads();
    assert!(before >= 1, "the file was read at start-up");
    for _ in 0..5 {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.is_empty());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        db.disk_reads(),
        before,
        "opening and reading the file made the backend re-read it"
    );

    // An edit is still seen, with one batch of reads.
    let mut rx = db.subscribe();
    std::fs::write(&path, set_comment(SAMPLE, "after-reads")).unwrap();
    wait_db(&mut rx, "the edit after the reads", |d| {
        comment_of(d).as_deref() == Some("after-reads")
    })
    .await;
    assert!(db.disk_reads() > before);
}
