//! MarsDB schema: parsing the seed's sample, writing it back, defaults,
//! normalisation and every validation error.

use std::net::Ipv4Addr;
use std::sync::Arc;

use vivian_core::marsdb::{
    Database, Dut, MacAddr, MarsDb, MarsDbError, MarsDbExt, MemoryMarsDb, PortId, RunnerType,
    UpdateError, ValidationError, Validator, PLACEHOLDER_TOKEN,
};

const SAMPLE: &str = include_str!("data/marsdb-seed-sample.yaml");
const SAMPLE_WRITTEN: &str = include_str!("data/marsdb-seed-sample.written.yaml");

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn parse(text: &str) -> Result<Database, ValidationError> {
    Database::from_yaml(text, None)
}

/// Parses `text`, expecting an error; checks its Display mentions every
/// needle and returns it.
fn invalid(text: &str, needles: &[&str]) -> ValidationError {
    let err = parse(text).expect_err("the document should be refused");
    let shown = err.to_string();
    for n in needles {
        assert!(shown.contains(n), "error {shown:?} should contain {n:?}");
    }
    err
}

const MINIMAL_DUT: &str =
    "duts:\n  52:54:00:11:22:33:\n    base_name: gfx9\n    ip_address: 10.0.0.9\n    tags: []\n";

#[test]
fn seed_sample_parses_into_the_documented_values() {
    let db = parse(SAMPLE).unwrap();
    assert_eq!(db.pdus.keys().collect::<Vec<_>>(), ["APC", "VPDU"]);
    let apc = &db.pdus["APC"];
    assert_eq!(apc.driver, "apc_masterswitch");
    assert_eq!(apc.hostname(), Some("10.0.0.2"));
    assert!(apc.reserved_port_ids.is_empty());
    assert_eq!(db.pdus["VPDU"].hostname(), Some("localhost:9191"));

    // The upper-case key is normalised.
    let id = mac("de:ad:be:ef:ca:fe");
    assert_eq!(
        db.duts.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
        ["de:ad:be:ef:ca:fe"]
    );
    let dut = &db.duts[&id];
    assert_eq!(dut.base_name, "gfx9");
    assert_eq!(dut.ip_address, Ipv4Addr::new(192, 168, 0, 42));
    assert_eq!(dut.tags.len(), 6);
    assert_eq!(dut.tags[5], "amdgpu:pciid:0x1002:0x1636");
    assert_eq!(dut.manual_tags, ["freesync_display"]);
    assert_eq!(dut.local_tty_device.as_deref(), Some("ttyUSB0"));
    assert_eq!(dut.mac_address, id, "mac_address defaults to the id");
    let runner = &dut.gitlab["freedesktop"];
    assert_eq!(
        (runner.token.as_str(), runner.exposed, runner.runner_id),
        ("<token>", true, 4242)
    );
    assert_eq!(dut.pdu.as_deref(), Some("APC"));
    assert_eq!(
        dut.pdu_port_id,
        Some(PortId::from("1")),
        "integer port ids become strings"
    );
    assert_eq!(dut.pdu_off_delay, 30.0);
    assert!(dut.ready_for_service && !dut.is_retired && dut.available());
    assert_eq!(
        dut.first_seen.to_rfc3339(),
        "2021-12-22T16:57:08.146275+00:00"
    );
    assert_eq!(dut.comment, None);

    let gl = &db.gitlab["freedesktop"];
    assert_eq!(gl.url, "https://gitlab.freedesktop.org/");
    assert_eq!(gl.registration_token.as_deref(), Some("<token>"));
    assert_eq!(gl.runner_type, RunnerType::GroupType);
    assert_eq!((gl.group_id, gl.project_id), (Some(42), Some(4242)));
    assert_eq!(gl.access_token.as_deref(), Some("<token>"));
    assert!(gl.expose_runners);
    assert_eq!(gl.maximum_timeout, 21600);
    assert_eq!(gl.gateway_runner.as_ref().unwrap().runner_id, 4243);

    assert_eq!(db.full_name(&id, "farm").as_deref(), Some("farm-gfx9-1"));
    assert_eq!(
        dut.all_tags("farm").first().map(String::as_str),
        Some("amdgpu:APU"),
        "all_tags is sorted"
    );
    assert!(dut.all_tags("farm").contains(&"farm:farm".to_string()));
}

#[test]
fn seed_sample_round_trips_in_schema_order() {
    let db = parse(SAMPLE).unwrap();
    let written = db.to_yaml();
    if std::env::var_os("MARSDB_BLESS").is_some() {
        // MARSDB_BLESS=1 cargo test ... rewrites the expected file.
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/marsdb-seed-sample.written.yaml"
        );
        std::fs::write(p, &written).unwrap();
    }
    assert_eq!(
        written, SAMPLE_WRITTEN,
        "the written form of the sample changed:\n{written}"
    );
    let again = parse(&written).unwrap();
    assert_eq!(again, db);
    assert_eq!(again.to_yaml(), written, "writing is stable");
}

#[test]
fn defaults_are_applied() {
    let before = vivian_core::marsdb::now_micros();
    let db = parse(MINIMAL_DUT).unwrap();
    let dut = &db.duts[&mac("52:54:00:11:22:33")];
    assert_eq!(dut.pdu_off_delay, 30.0);
    assert!(!dut.ready_for_service);
    assert!(!dut.is_retired);
    assert!(dut.manual_tags.is_empty());
    assert!(dut.gitlab.is_empty());
    assert_eq!((dut.pdu.as_ref(), dut.pdu_port_id.as_ref()), (None, None));
    assert_eq!(dut.comment, None);
    assert_eq!(dut.local_tty_device, None);
    assert!(dut.first_seen >= before, "first_seen is set on creation");

    // first_seen is carried over from the previous database on reload.
    let again = Database::from_yaml(MINIMAL_DUT, Some(&db)).unwrap();
    assert_eq!(again, db);

    let gl = parse("gitlab:\n  fd:\n    url: https://example.invalid\n").unwrap();
    let gl = &gl.gitlab["fd"];
    assert_eq!(gl.runner_type, RunnerType::InstanceType);
    assert!(gl.expose_runners);
    assert_eq!(gl.maximum_timeout, 21600);
    assert_eq!(
        (
            gl.group_id,
            gl.registration_token.as_ref(),
            gl.gateway_runner.as_ref()
        ),
        (None, None, None)
    );

    let runner =
        parse("gitlab:\n  fd:\n    url: https://x.invalid\n    gateway_runner: {}\n").unwrap();
    let r = runner.gitlab["fd"].gateway_runner.clone().unwrap();
    assert_eq!(
        (r.token.as_str(), r.exposed, r.runner_id),
        (PLACEHOLDER_TOKEN, true, -1)
    );
}

#[test]
fn empty_documents_are_empty_databases() {
    for text in [
        "",
        "\n",
        "# just a comment\n",
        "pdus:\nduts:\ngitlab:\n",
        "pdus: {}\nduts: {}\n",
    ] {
        assert_eq!(parse(text).unwrap(), Database::new(), "{text:?}");
    }
    assert_eq!(
        Database::new().to_yaml(),
        "pdus: {}\nduts: {}\ngitlab: {}\n"
    );
}

#[test]
fn port_ids_and_reserved_ports_are_strings() {
    let db = parse(
        "pdus:\n  P:\n    driver: vpdu\n    config: {}\n    reserved_port_ids: [8, \"9\", 8]\n\
         duts:\n  52:54:00:11:22:33:\n    base_name: a\n    ip_address: 10.0.0.1\n    tags: []\n    pdu: P\n    pdu_port_id: \"07\"\n",
    )
    .unwrap();
    let p = &db.pdus["P"];
    assert_eq!(
        p.reserved_port_ids
            .iter()
            .map(PortId::as_str)
            .collect::<Vec<_>>(),
        ["8", "9"]
    );
    assert!(p.is_reserved(&PortId::from(8u32)));
    let d = &db.duts[&mac("52:54:00:11:22:33")];
    assert_eq!(d.pdu_port(), Some(("P", &PortId::from("07"))));
    let written = db.to_yaml();
    assert!(written.contains("pdu_port_id: '07'"), "{written}");
    assert!(
        written.contains("reserved_port_ids:\n    - '8'\n    - '9'\n"),
        "{written}"
    );
}

#[test]
fn mac_addresses_are_normalised() {
    for s in ["52:54:00:AA:bb:0C", "52-54-00-aa-BB-0c"] {
        assert_eq!(mac(s).to_string(), "52:54:00:aa:bb:0c");
    }
    for bad in [
        "",
        "52:54:00:aa:bb",
        "52:54:00:aa:bb:0c:",
        "52:54:00:aa:bb:0g",
        "5:54:00:aa:bb:0c0",
        "52:54-00:aa:bb:0c",
        "52545400aabb0c",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn full_names_count_earlier_duts_of_the_same_base_name() {
    let text = r#"duts:
  00:00:00:00:00:01: {base_name: gfx9, ip_address: 10.0.0.1, tags: [], first_seen: 2022-01-03 00:00:00}
  00:00:00:00:00:02: {base_name: gfx9, ip_address: 10.0.0.2, tags: [], first_seen: 2022-01-01 00:00:00}
  00:00:00:00:00:03: {base_name: gfx10, ip_address: 10.0.0.3, tags: [], first_seen: 2022-01-02 00:00:00}
  00:00:00:00:00:04: {base_name: gfx9, ip_address: 10.0.0.4, tags: [], first_seen: 2022-01-02 00:00:00}
  00:00:00:00:00:05: {base_name: gfx9, ip_address: 10.0.0.5, tags: [], first_seen: 2022-01-02 00:00:00}
"#;
    let db = parse(text).unwrap();
    let name = |i: u8| db.full_name(&MacAddr([0, 0, 0, 0, 0, i]), "farm").unwrap();
    assert_eq!(name(2), "farm-gfx9-1");
    assert_eq!(name(4), "farm-gfx9-2", "ties are broken by file order");
    assert_eq!(name(5), "farm-gfx9-3");
    assert_eq!(name(1), "farm-gfx9-4");
    assert_eq!(name(3), "farm-gfx10-1");
    assert_eq!(db.full_name(&MacAddr([9; 6]), "farm"), None);
    assert_eq!(
        db.find_dut("farm-gfx9-4", "farm").map(|(k, _)| *k),
        Some(MacAddr([0, 0, 0, 0, 0, 1]))
    );
    assert_eq!(
        db.find_dut("00-00-00-00-00-03", "farm").map(|(k, _)| *k),
        Some(MacAddr([0, 0, 0, 0, 0, 3]))
    );
    assert!(db.find_dut("farm-gfx9-9", "farm").is_none());
}

#[test]
fn vpdu_endpoint_adds_or_overwrites_the_vpdu() {
    let mut db = Database::new();
    db.apply_vpdu_endpoint("127.0.0.1:9191");
    assert_eq!(db.pdus["VPDU"].driver, "vpdu");
    assert_eq!(db.pdus["VPDU"].hostname(), Some("127.0.0.1:9191"));

    let mut db = parse(SAMPLE).unwrap();
    db.pdus["VPDU"].reserved_port_ids.insert(PortId::from("3"));
    db.pdus["VPDU"].driver = "something_else".into();
    db.apply_vpdu_endpoint("localhost:7777");
    assert_eq!(db.pdus.get_index_of("VPDU"), Some(1), "keeps its position");
    assert_eq!(db.pdus["VPDU"].driver, "vpdu");
    assert_eq!(db.pdus["VPDU"].hostname(), Some("localhost:7777"));
    assert_eq!(db.pdus["VPDU"].config.len(), 1);
    assert!(
        db.pdus["VPDU"].is_reserved(&PortId::from("3")),
        "keeps its reservations"
    );
}

// ------------------------------------------------------------- validation

#[test]
fn yaml_syntax_errors_have_a_location() {
    let e = invalid(
        "pdus:\n  APC:\n    driver: x\n  - y\n",
        &["line 4:3", "did not find expected key"],
    );
    assert_eq!(e.line, Some(4));
    assert_eq!(e.path, "");
    let e = invalid("duts: {a: [\n", &["line 2"]);
    assert_eq!(e.line, Some(2));
    assert!(e.column.is_some());
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let e = invalid("pdu: {}\n", &["unknown field `pdu`", "line 1:1"]);
    assert_eq!(e.path, "");
    let e = invalid(
        "pdus:\n  APC:\n    driver: x\n    config: {}\n    hiddenn: true\n",
        &["pdus.APC", "unknown field `hiddenn`", "line 5:5"],
    );
    assert_eq!(e.path, "pdus.APC");
    invalid(
        &format!("{MINIMAL_DUT}    colour: red\n"),
        &["duts.52:54:00:11:22:33: unknown field `colour`", "line 6:5"],
    );
    invalid(
        &format!("{MINIMAL_DUT}    gitlab:\n      fd: {{token: abc, expose: true}}\n"),
        &["duts.52:54:00:11:22:33.gitlab.fd", "unknown field `expose`"],
    );
    invalid(
        "gitlab:\n  fd:\n    url: https://x.invalid\n    runner: 1\n",
        &["gitlab.fd", "unknown field `runner`"],
    );
}

#[test]
fn missing_required_fields_are_refused() {
    invalid(
        "pdus:\n  APC:\n    config: {}\n",
        &["pdus.APC", "missing field `driver`"],
    );
    invalid(
        "pdus:\n  APC:\n    driver: vpdu\n",
        &["pdus.APC", "missing field `config`"],
    );
    invalid(
        "duts:\n  52:54:00:11:22:33:\n    ip_address: 10.0.0.1\n    tags: []\n",
        &["duts.52:54:00:11:22:33", "missing field `base_name`"],
    );
    invalid(
        "duts:\n  52:54:00:11:22:33:\n    base_name: a\n    tags: []\n",
        &["missing field `ip_address`"],
    );
    invalid(
        "duts:\n  52:54:00:11:22:33:\n    base_name: a\n    ip_address: 10.0.0.1\n",
        &["missing field `tags`"],
    );
    invalid(
        "gitlab:\n  fd:\n    expose_runners: true\n",
        &["gitlab.fd", "missing field `url`"],
    );
}

#[test]
fn wrong_types_are_refused() {
    invalid(
        "duts:\n  52:54:00:11:22:33:\n    base_name: a\n    ip_address: 10.0.0.1\n    tags: a-string\n",
        &["duts.52:54:00:11:22:33.tags", "invalid type", "line 5:11"],
    );
    invalid(
        &format!("{MINIMAL_DUT}    is_retired: maybe\n"),
        &["duts.52:54:00:11:22:33.is_retired", "invalid type"],
    );
    invalid(
        &format!("{MINIMAL_DUT}    pdu_off_delay: soon\n"),
        &["duts.52:54:00:11:22:33.pdu_off_delay"],
    );
    invalid(
        &format!("{MINIMAL_DUT}    pdu_port_id: [1]\n"),
        &["duts.52:54:00:11:22:33.pdu_port_id", "port id"],
    );
    invalid(
        "pdus:\n  P:\n    driver: x\n    config: 12\n",
        &["pdus.P.config", "invalid type"],
    );
    invalid(
        "pdus: [1, 2]\n",
        &["invalid type: sequence, expected a map"],
    );
}

#[test]
fn invalid_values_are_refused() {
    invalid(
        "duts:\n  52:54:00:11:22:3:\n    base_name: a\n    ip_address: 10.0.0.1\n    tags: []\n",
        &["invalid MAC address \"52:54:00:11:22:3\"", "line 2:3"],
    );
    invalid(
        "duts:\n  52:54:00:11:22:33:\n    base_name: a\n    ip_address: 10.0.0.256\n    tags: []\n",
        &[
            "duts.52:54:00:11:22:33.ip_address",
            "invalid IPv4 address",
            "line 4:17",
        ],
    );
    invalid(
        &format!("{MINIMAL_DUT}    mac_address: 52:54:00\n"),
        &["duts.52:54:00:11:22:33.mac_address", "invalid MAC address"],
    );
    invalid(
        &format!("{MINIMAL_DUT}    first_seen: yesterday\n"),
        &[
            "duts.52:54:00:11:22:33.first_seen",
            "invalid date \"yesterday\"",
        ],
    );
    invalid(
        "gitlab:\n  fd:\n    url: https://x.invalid\n    runner_type: shared_type\n",
        &["gitlab.fd.runner_type", "unknown variant `shared_type`"],
    );
    invalid(
        "gitlab:\n  fd:\n    url: https://x.invalid\n    maximum_timeout: -5\n",
        &["gitlab.fd.maximum_timeout"],
    );
    invalid(
        &format!("{MINIMAL_DUT}    pdu_port_id: ''\n"),
        &["duts.52:54:00:11:22:33.pdu_port_id", "cannot be empty"],
    );
}

#[test]
fn duplicate_keys_are_refused() {
    invalid(
        "duts:\n  52:54:00:11:22:33: {base_name: a, ip_address: 10.0.0.1, tags: []}\n  52:54:00:11:22:33: {base_name: b, ip_address: 10.0.0.2, tags: []}\n",
        &["duplicate key 52:54:00:11:22:33"],
    );
    // Two spellings of one MAC are the same DUT.
    invalid(
        "duts:\n  52:54:00:aa:bb:cc: {base_name: a, ip_address: 10.0.0.1, tags: []}\n  52:54:00:AA:BB:CC: {base_name: b, ip_address: 10.0.0.2, tags: []}\n",
        &["duplicate key 52:54:00:aa:bb:cc"],
    );
    invalid(
        "pdus:\n  P: {driver: a, config: {}}\n  P: {driver: b, config: {}}\n",
        &["duplicate key P"],
    );
}

#[test]
fn cross_reference_errors_name_the_field_and_its_location() {
    let e = invalid(
        "pdus:\n  APC:\n    driver: apc_masterswitch\n    config: {hostname: 10.0.0.2}\nduts:\n  52:54:00:11:22:33:\n    base_name: gfx9\n    ip_address: 10.0.0.9\n    tags: []\n    pdu: APC2\n",
        &["line 10:10: duts.52:54:00:11:22:33.pdu: unknown PDU \"APC2\""],
    );
    assert_eq!(e.path, "duts.52:54:00:11:22:33.pdu");
    assert_eq!((e.line, e.column), (Some(10), Some(10)));

    invalid(
        &format!("{MINIMAL_DUT}    pdu_off_delay: -1\n"),
        &["line 6:20: duts.52:54:00:11:22:33.pdu_off_delay: must be a number of seconds >= 0"],
    );
    invalid(
        &format!("{MINIMAL_DUT}    pdu_off_delay: .nan\n"),
        &["duts.52:54:00:11:22:33.pdu_off_delay"],
    );
    invalid(
        "duts:\n  52:54:00:11:22:33:\n    base_name: ''\n    ip_address: 10.0.0.1\n    tags: []\n",
        &["line 3:16: duts.52:54:00:11:22:33.base_name: base_name cannot be empty"],
    );
    invalid(
        "duts:\n  52:54:00:11:22:33: {base_name: a, ip_address: 10.0.0.1, tags: []}\n  52:54:00:11:22:34: {base_name: b, ip_address: 10.0.0.2, tags: [], mac_address: 52:54:00:11:22:33}\n",
        &["duts.52:54:00:11:22:34.mac_address", "already used by another DUT"],
    );
    invalid(
        "pdus:\n  P:\n    driver: ''\n    config: {}\n",
        &["line 3:13: pdus.P.driver: the driver name cannot be empty"],
    );
    invalid(
        "gitlab:\n  fd:\n    url: ftp://x.invalid\n",
        &["line 3:10: gitlab.fd.url: expected an http:// or https:// URL"],
    );
    invalid(
        "gitlab:\n  fd:\n    url: https://x.invalid\n    maximum_timeout: 0\n",
        &["line 4:22: gitlab.fd.maximum_timeout: must be a positive"],
    );
    invalid(
        "gitlab:\n  fd:\n    url: https://x.invalid\n    runner_type: group_type\n",
        &["gitlab.fd.group_id: required when runner_type is group_type"],
    );
    invalid(
        "gitlab:\n  fd:\n    url: https://x.invalid\n    runner_type: project_type\n    project_id: null\n",
        &["line 5:17: gitlab.fd.project_id: required when runner_type is project_type"],
    );
}

// ----------------------------------------------------- changes, in memory

fn new_dut(last: u8, base: &str) -> (MacAddr, Dut) {
    let id = MacAddr([0x52, 0x54, 0, 0, 0, last]);
    (
        id,
        Dut::new(id, base, Ipv4Addr::new(10, 0, 0, last), vec!["t".into()]),
    )
}

#[tokio::test]
async fn a_change_that_breaks_validation_changes_nothing() {
    let db = MemoryMarsDb::with_validator(parse(SAMPLE).unwrap(), None).unwrap();
    let before = db.snapshot();
    let id = mac("de:ad:be:ef:ca:fe");
    let err = db
        .update(|db| {
            db.duts[&id].comment = Some("changed".into());
            db.duts[&id].pdu = Some("APC2".into());
            Ok::<_, String>(())
        })
        .await
        .unwrap_err();
    match err {
        UpdateError::Db(MarsDbError::Invalid(e)) => {
            assert_eq!(
                e.to_string(),
                "duts.de:ad:be:ef:ca:fe.pdu: unknown PDU \"APC2\""
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(Arc::ptr_eq(&before, &db.snapshot()), "nothing changed");

    let err = db
        .update(|db| {
            db.duts[&id].comment = Some("changed".into());
            Err::<(), _>("no thanks")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, UpdateError::Rejected("no thanks")));
    assert!(Arc::ptr_eq(&before, &db.snapshot()), "nothing changed");
}

#[tokio::test]
async fn memory_backend_applies_publishes_and_refuses_while_in_error() {
    let store: Arc<dyn MarsDb> = Arc::new(MemoryMarsDb::new(Database::new()));
    let mut rx = store.subscribe();
    let (id, dut) = new_dut(1, "gfx9");
    let n = store
        .update(move |db| {
            db.duts.insert(id, dut);
            Ok::<_, std::convert::Infallible>(db.duts.len())
        })
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update().duts.len(), 1);

    // A change that changes nothing publishes nothing.
    store.update(|_| Ok::<_, String>(())).await.unwrap();
    assert!(!rx.has_changed().unwrap());

    let mem = MemoryMarsDb::new(Database::new());
    mem.set_error(Some(
        ValidationError::new("duts", "broken")
            .with_file("/x.yaml")
            .at(3, 4),
    ));
    let err = mem.update(|_| Ok::<_, String>(())).await.unwrap_err();
    match err {
        UpdateError::Db(MarsDbError::InvalidFile(e)) => {
            assert_eq!(e.to_string(), "/x.yaml:3:4: duts: broken")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn the_extra_validator_refuses_with_its_own_error() {
    let v: Validator = Arc::new(|db: &Database| {
        for (name, pdu) in &db.pdus {
            if pdu.driver != "vpdu" {
                return Err(ValidationError::new(
                    format!("pdus.{name}.driver"),
                    format!("unknown PDU driver {:?}", pdu.driver),
                ));
            }
        }
        Ok(())
    });
    assert!(MemoryMarsDb::with_validator(parse(SAMPLE).unwrap(), Some(v.clone())).is_err());
    let store = MemoryMarsDb::with_validator(Database::new(), Some(v)).unwrap();
    let err = store
        .update(|db| {
            db.apply_vpdu_endpoint("127.0.0.1:1");
            db.pdus.insert(
                "APC".into(),
                vivian_core::marsdb::Pdu::new("apc", Default::default()),
            );
            Ok::<_, String>(())
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid change: pdus.APC.driver: unknown PDU driver \"apc\""
    );
    assert!(store.snapshot().pdus.is_empty());
}

// ------------------------------------------------ the reference's reader

/// The written file must read back the same through PyYAML (YAML 1.1, the
/// reference executor's reader): MAC keys that look like sexagesimal
/// numbers, `on`/`yes` tags and numeric strings must stay strings.
#[test]
fn pyyaml_reads_what_we_write() {
    let mut db = parse(SAMPLE).unwrap();
    let (id, mut dut) = new_dut(0x33, "on");
    dut.tags = vec![
        "yes".into(),
        "1:20".into(),
        "0x10".into(),
        "2021-01-01".into(),
        "a: b".into(),
        "~".into(),
    ];
    dut.manual_tags = vec!["line\nbreak".into(), "it's".into()];
    dut.comment = Some("null".into());
    dut.pdu_off_delay = 0.1;
    db.duts.insert(id, dut);
    let written = db.to_yaml();

    let python = "/usr/bin/python3";
    let script = r#"
import sys, yaml, json, datetime
doc = yaml.safe_load(sys.stdin)
def conv(o):
    if isinstance(o, datetime.datetime):
        return o.isoformat()
    raise TypeError(repr(o))
print(json.dumps(doc, default=conv))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} (Debian packages python3, python3-yaml): {e}")
        });
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(written.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "PyYAML failed (is python3-yaml installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &doc["duts"]["52:54:00:00:00:33"];
    assert_eq!(d["base_name"], "on");
    assert_eq!(
        d["tags"],
        serde_json::json!(["yes", "1:20", "0x10", "2021-01-01", "a: b", "~"])
    );
    assert_eq!(d["manual_tags"], serde_json::json!(["line\nbreak", "it's"]));
    assert_eq!(d["comment"], "null");
    assert_eq!(d["pdu_off_delay"], 0.1);
    assert_eq!(d["ip_address"], "10.0.0.51");
    let s = &doc["duts"]["de:ad:be:ef:ca:fe"];
    assert_eq!(s["pdu_port_id"], "1");
    assert_eq!(
        s["first_seen"], "2021-12-22T16:57:08.146275",
        "written as a YAML timestamp"
    );
    assert_eq!(s["pdu_off_delay"], 30.0);
    assert_eq!(doc["pdus"]["APC"]["config"]["hostname"], "10.0.0.2");
    assert_eq!(doc["gitlab"]["freedesktop"]["maximum_timeout"], 21600);
}

#[test]
fn the_example_database_is_valid() {
    let text = include_str!("../../examples/marsdb/mars_db.yaml");
    let db = parse(text).unwrap();
    assert_eq!(db.duts.len(), 2);
    let second = &db.duts[&mac("52:54:00:11:22:01")];
    assert_eq!(second.pdu_port(), Some(("VPDU", &PortId::from("1"))));
    assert!(!second.ready_for_service);
    assert_eq!(
        db.full_name(&mac("52:54:00:11:22:01"), "farm").as_deref(),
        Some("farm-virtio-2")
    );
    assert!(db.pdus["VPDU"].is_reserved(&PortId::from("9")));
}
