use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn with_farm(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut m = env(pairs);
    m.entry("FARM_NAME".into())
        .or_insert_with(|| "testfarm".into());
    m
}

fn parse_err(pairs: &[(&str, &str)]) -> ConfigError {
    Config::from_env_map(&with_farm(pairs)).unwrap_err()
}

#[test]
fn seed_defaults() {
    let c = Config::from_env_map(&env(&[("FARM_NAME", "tchar")])).unwrap();
    assert_eq!(c.farm_name, "tchar");
    assert_eq!(c.boots_tftp_root, PathBuf::from("/cache/boots/tftp"));
    assert_eq!(c.executor_url.as_str(), "http://ci-gateway");
    assert_eq!(c.executor_artifact_cache_root, None);
    assert_eq!(
        c.gitlab_conf_file,
        PathBuf::from("/etc/gitlab-runner/config.toml")
    );
    assert_eq!(c.gitlab_conf_template_file, None);
    assert_eq!(c.mars_db_file, PathBuf::from("/config/mars_db.yaml"));
    assert_eq!(c.minio_url.as_str(), "http://ci-gateway:9000");
    assert_eq!(c.minio_root_user, "minioadmin");
    assert_eq!(c.minio_root_password.expose(), "minio-root-password");
    assert_eq!(c.private_interface, "private");
    assert_eq!(c.salad_url.as_str(), "http://ci-gateway:8005");
    assert_eq!(c.sergent_hartman_boot_count, 100);
    assert_eq!(c.sergent_hartman_qualifying_boot_count, 100);
    assert_eq!(
        c.sergent_hartman_registration_retrial_delay,
        Duration::from_secs(120)
    );
    assert!(c.sergent_hartman_quick_check);
    assert!(!c.sergent_hartman_quiet);
    assert!(!c.boots_disable_servers);
    assert_eq!(c.boots_dhcp_ipv4_socket_name, "dhcp_ipv4");
    assert_eq!(c.boots_tftp_ipv4_socket_name, "tftp_ipv4");
    assert!(c
        .console_pattern_default_machine_unfit_for_service_regex
        .is_none());
    assert_eq!(c.executor_host, "0.0.0.0");
    assert_eq!(c.executor_port, 80);
    assert_eq!(c.executor_http_ipv4_socket_name, "http_ipv4");
    assert_eq!(c.executor_registration_job, None);
    assert_eq!(c.executor_bootloop_job, None);
    assert_eq!(c.executor_vpdu_endpoint, None);
    assert_eq!(c.minio_admin_alias, "local");
    assert!(!c.gitlab_allow_insecure);
    assert_eq!(c.dut_default_boot_sequence_power, 10.0);
    assert!(c.executor_job_vars.0.is_empty());
    let boot = c
        .boots_defaults
        .resolve(Bootloader::Ipxe, Some(Arch::X86_64), Some(Platform::Efi))
        .unwrap();
    assert_eq!(boot.kernel, boot_defaults::SEED_DEFAULT_KERNEL);
    assert_eq!(boot.initrd, boot_defaults::SEED_DEFAULT_INITRD);
    assert!(boot
        .cmdline
        .contains("machine-registration:latest register"));
    assert!(c.sergent_hartman_enabled());
    assert!(c.quick_check_enabled());
    assert!(c.warnings(&env(&[])).is_empty());
}

#[test]
fn every_value_set() {
    let c = Config::from_env_map(&env(&[
        ("FARM_NAME", "mupuf"),
        ("BOOTS_TFTP_ROOT", "/srv/tftp"),
        ("EXECUTOR_URL", "http://10.42.0.1:8000/"),
        ("EXECUTOR_ARTIFACT_CACHE_ROOT", "/var/cache/artifacts"),
        ("GITLAB_CONF_FILE", "/tmp/config.toml"),
        ("GITLAB_CONF_TEMPLATE_FILE", "/tmp/tpl.j2"),
        ("MARS_DB_FILE", "/tmp/mars.yaml"),
        ("MINIO_URL", "https://minio.example:9443"),
        ("MINIO_ROOT_USER", "admin"),
        ("MINIO_ROOT_PASSWORD", "hunter2"),
        ("PRIVATE_INTERFACE", "br0"),
        ("SALAD_URL", "http://127.0.0.1:8005"),
        ("SERGENT_HARTMAN_BOOT_COUNT", "-1"),
        ("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT", "7"),
        ("SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY", "2.5"),
        ("SERGENT_HARTMAN_QUICK_CHECK", "disabled"),
        ("SERGENT_HARTMAN_QUIET", "1"),
        ("BOOTS_DISABLE_SERVERS", "false"),
        ("BOOTS_DHCP_IPv4_SOCKET_NAME", "dhcp"),
        ("BOOTS_TFTP_IPv4_SOCKET_NAME", "tftp"),
        (
            "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX",
            "GPU hang",
        ),
        ("EXECUTOR_HOST", "127.0.0.1"),
        ("EXECUTOR_PORT", "8000"),
        ("EXECUTOR_HTTP_IPv4_SOCKET_NAME", "http"),
        ("EXECUTOR_REGISTRATION_JOB", "/tmp/register.yml.j2"),
        ("EXECUTOR_BOOTLOOP_JOB", "/tmp/bootloop.yml.j2"),
        ("EXECUTOR_VPDU_ENDPOINT", "localhost:9191"),
        ("MINIO_ADMIN_ALIAS", "farm"),
        ("GITLAB_ALLOW_INSECURE", "TRUE"),
        ("DUT_DEFAULT_BOOT_SEQUENCE_POWER", "12.5"),
        ("EXECUTOR_JOB__NTP_PEER", "10.42.0.1"),
        ("EXECUTOR_JOB__FDO_PROXY_REGISTRY", "reg:5000"),
    ]))
    .unwrap();
    assert_eq!(c.executor_url.as_str(), "http://10.42.0.1:8000");
    assert_eq!(c.executor_url.port_or_default(), 8000);
    assert_eq!(
        c.executor_artifact_cache_root,
        Some("/var/cache/artifacts".into())
    );
    assert_eq!(c.minio_url.host(), "minio.example");
    assert_eq!(c.private_interface, "br0");
    assert_eq!(c.sergent_hartman_boot_count, -1);
    assert!(!c.sergent_hartman_enabled());
    assert!(!c.quick_check_enabled());
    assert_eq!(c.sergent_hartman_qualifying_boot_count, 7);
    assert_eq!(
        c.sergent_hartman_registration_retrial_delay,
        Duration::from_millis(2500)
    );
    assert!(!c.sergent_hartman_quick_check);
    assert!(c.sergent_hartman_quiet);
    // The seed: any non-empty value disables the servers, even "false".
    assert!(c.boots_disable_servers);
    assert!(c
        .console_pattern_default_machine_unfit_for_service_regex
        .as_ref()
        .unwrap()
        .is_match("[42.0] GPU hang detected"));
    assert_eq!(c.executor_port, 8000);
    assert_eq!(
        c.executor_vpdu_endpoint,
        Some(HostPort {
            host: "localhost".into(),
            port: 9191
        })
    );
    assert!(c.gitlab_allow_insecure);
    assert_eq!(c.dut_default_boot_sequence_power, 12.5);
    assert_eq!(
        c.executor_job_vars.0,
        BTreeMap::from([
            ("fdo_proxy_registry".to_string(), "reg:5000".to_string()),
            ("ntp_peer".to_string(), "10.42.0.1".to_string()),
        ])
    );
    let je = c.job_environment();
    assert_eq!(je["minio_url"], "https://minio.example:9443");
    assert_eq!(je["ntp_peer"], "10.42.0.1");
}

#[test]
fn farm_name_is_mandatory() {
    for value in [None, Some(""), Some("two words")] {
        let mut m = env(&[]);
        if let Some(v) = value {
            m.insert("FARM_NAME".into(), v.into());
        }
        let e = Config::from_env_map(&m).unwrap_err();
        assert_eq!(e.errors.len(), 1, "{value:?}: {e}");
        assert_eq!(e.errors[0].var(), "FARM_NAME");
        if value == Some("two words") {
            assert_eq!(
                e.to_string(),
                "invalid configuration: FARM_NAME=\"two words\": expected a farm name without spaces"
            );
        } else {
            assert!(e.to_string().contains("FARM_NAME is not set"), "{e}");
        }
    }
}

#[test]
fn invalid_values_name_variable_value_and_expectation() {
    // (variable, bad value, exact message)
    let cases: &[(&str, &str, &str)] = &[
        (
            "SERGENT_HARTMAN_BOOT_COUNT",
            "abc",
            "SERGENT_HARTMAN_BOOT_COUNT=\"abc\": expected an integer",
        ),
        (
            "SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT",
            "-3",
            "SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT=\"-3\": expected a non-negative integer",
        ),
        (
            "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY",
            "soon",
            "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY=\"soon\": expected a number of seconds (0 or more)",
        ),
        (
            "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY",
            "-1",
            "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY=\"-1\": expected a number of seconds (0 or more)",
        ),
        (
            "SERGENT_HARTMAN_QUICK_CHECK",
            "yes",
            "SERGENT_HARTMAN_QUICK_CHECK=\"yes\": expected a boolean (true/false, enabled/disabled, 1/0)",
        ),
        (
            "SERGENT_HARTMAN_QUIET",
            "2",
            "SERGENT_HARTMAN_QUIET=\"2\": expected a boolean (true/false, enabled/disabled, 1/0)",
        ),
        (
            "GITLAB_ALLOW_INSECURE",
            "on",
            "GITLAB_ALLOW_INSECURE=\"on\": expected a boolean (true/false, enabled/disabled, 1/0)",
        ),
        (
            "EXECUTOR_PORT",
            "65536",
            "EXECUTOR_PORT=\"65536\": expected a port number (0-65535)",
        ),
        (
            "EXECUTOR_PORT",
            "http",
            "EXECUTOR_PORT=\"http\": expected a port number (0-65535)",
        ),
        (
            "EXECUTOR_HOST",
            "not a host",
            "EXECUTOR_HOST=\"not a host\": expected an IP address or a host name to bind",
        ),
        (
            "EXECUTOR_VPDU_ENDPOINT",
            "localhost",
            "EXECUTOR_VPDU_ENDPOINT=\"localhost\": expected host:port (e.g. localhost:9191)",
        ),
        (
            "EXECUTOR_VPDU_ENDPOINT",
            "localhost:0",
            "EXECUTOR_VPDU_ENDPOINT=\"localhost:0\": expected host:port (e.g. localhost:9191): the port must be a number from 1 to 65535",
        ),
        (
            "EXECUTOR_VPDU_ENDPOINT",
            ":9191",
            "EXECUTOR_VPDU_ENDPOINT=\":9191\": expected host:port (e.g. localhost:9191): \"\" is not a host name or IPv4 address",
        ),
        (
            "PRIVATE_INTERFACE",
            "a/b",
            "PRIVATE_INTERFACE=\"a/b\": expected a network interface name (1-15 characters, no '/', ':' or spaces)",
        ),
        (
            "PRIVATE_INTERFACE",
            "averyveryverylongname",
            "PRIVATE_INTERFACE=\"averyveryverylongname\": expected a network interface name (1-15 characters, no '/', ':' or spaces)",
        ),
        (
            "EXECUTOR_HTTP_IPv4_SOCKET_NAME",
            "a:b",
            "EXECUTOR_HTTP_IPv4_SOCKET_NAME=\"a:b\": expected a systemd socket name (at most 255 printable ASCII characters, no ':' or spaces)",
        ),
        (
            "DUT_DEFAULT_BOOT_SEQUENCE_POWER",
            "ten",
            "DUT_DEFAULT_BOOT_SEQUENCE_POWER=\"ten\": expected a power in watts (a number, 0 or more)",
        ),
        (
            "MINIO_URL",
            "ftp://x",
            "MINIO_URL=\"ftp://x\": expected an http(s) URL (the scheme is \"ftp\")",
        ),
        (
            "SALAD_URL",
            "ci-gateway:8005",
            "SALAD_URL=\"ci-gateway:8005\": expected an http(s) URL (the scheme is \"ci-gateway\")",
        ),
        (
            "EXECUTOR_URL",
            "nope",
            "EXECUTOR_URL=\"nope\": expected an http(s) URL (relative URL without a base)",
        ),
        (
            "EXECUTOR_JOB__1X",
            "v",
            "EXECUTOR_JOB__1X=\"v\": the name after EXECUTOR_JOB__ must be a template variable name (letters, digits, '_'; not starting with a digit)",
        ),
        (
            "EXECUTOR_JOB__BAD-TOKEN",
            "s3cret",
            "EXECUTOR_JOB__BAD-TOKEN=\"********\": the name after EXECUTOR_JOB__ must be a template variable name (letters, digits, '_'; not starting with a digit)",
        ),
    ];
    for (var, value, message) in cases {
        let e = parse_err(&[(var, value)]);
        assert_eq!(e.errors.len(), 1, "{var}={value}: {e}");
        assert_eq!(e.errors[0].to_string(), *message);
        assert_eq!(e.errors[0].var(), *var);
    }
    // A bad regex names the variable and carries the regex error.
    let e = parse_err(&[(
        "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX",
        "(unclosed",
    )]);
    let msg = e.errors[0].to_string();
    assert!(
        msg.starts_with("CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX=\"(unclosed\": expected a regular expression ("),
        "{msg}"
    );
}

#[test]
fn all_errors_reported_at_once() {
    let e = Config::from_env_map(&env(&[
        ("SERGENT_HARTMAN_BOOT_COUNT", "abc"),
        ("EXECUTOR_PORT", "-1"),
    ]))
    .unwrap_err();
    let vars: Vec<&str> = e.errors.iter().map(EnvVarError::var).collect();
    assert_eq!(
        vars,
        vec!["EXECUTOR_PORT", "FARM_NAME", "SERGENT_HARTMAN_BOOT_COUNT"]
    );
}

#[test]
fn booleans() {
    for (v, expected) in [
        ("true", true),
        ("True", true),
        ("enabled", true),
        ("ENABLED", true),
        ("1", true),
        (" 1 ", true),
        ("false", false),
        ("disabled", false),
        ("0", false),
        ("FALSE", false),
    ] {
        assert_eq!(parse_bool(v), Some(expected), "{v}");
        let c = Config::from_env_map(&with_farm(&[("SERGENT_HARTMAN_QUICK_CHECK", v)])).unwrap();
        assert_eq!(c.sergent_hartman_quick_check, expected, "{v}");
    }
    for v in ["yes", "no", "on", "2", "t"] {
        assert_eq!(parse_bool(v), None, "{v}");
    }
}

#[test]
fn empty_values_count_as_unset() {
    let c = Config::from_env_map(&with_farm(&[
        ("EXECUTOR_PORT", ""),
        ("EXECUTOR_VPDU_ENDPOINT", ""),
        ("BOOTS_DISABLE_SERVERS", ""),
        ("SERGENT_HARTMAN_QUICK_CHECK", ""),
        ("EXECUTOR_ARTIFACT_CACHE_ROOT", ""),
    ]))
    .unwrap();
    assert_eq!(c.executor_port, 80);
    assert_eq!(c.executor_vpdu_endpoint, None);
    assert!(!c.boots_disable_servers);
    assert!(c.sergent_hartman_quick_check);
    assert_eq!(c.executor_artifact_cache_root, None);
}

#[test]
fn host_port_forms() {
    let cases: &[(&str, Option<(&str, u16)>)] = &[
        ("localhost:9191", Some(("localhost", 9191))),
        ("127.0.0.1:1", Some(("127.0.0.1", 1))),
        ("[::1]:9191", Some(("::1", 9191))),
        (
            "vpdu.farm.example:65535",
            Some(("vpdu.farm.example", 65535)),
        ),
        ("localhost:65536", None),
        ("localhost:", None),
        ("[::1:9191", None),
        ("[zz]:9191", None),
        ("a b:1", None),
        ("-bad:1", None),
    ];
    for (s, expected) in cases {
        let got = s.parse::<HostPort>().ok();
        assert_eq!(
            got.as_ref().map(|h| (h.host.as_str(), h.port)),
            *expected,
            "{s}"
        );
        if let Some(h) = got {
            assert_eq!(h.to_string(), *s);
        }
    }
}

#[test]
fn secrets_are_masked() {
    let m = with_farm(&[
        ("MINIO_ROOT_PASSWORD", "hunter2-secret-value"),
        ("EXECUTOR_JOB__REGISTRY_TOKEN", "tok-value-123"),
        ("EXECUTOR_JOB__DB_PASSWORD", "pw-value-456"),
        ("EXECUTOR_JOB__NTP_PEER", "10.0.0.1"),
        ("MINIO_URL", "http://user:urlpass-789@minio:9000"),
    ]);
    let c = Config::from_env_map(&m).unwrap();
    let debug = format!("{c:?}");
    let display = c.to_string();
    let entries = format!("{:?}", c.entries(&m));
    for out in [&debug, &display, &entries] {
        for secret in [
            "hunter2-secret-value",
            "tok-value-123",
            "pw-value-456",
            "urlpass-789",
        ] {
            assert!(!out.contains(secret), "{secret} leaked in {out}");
        }
        assert!(out.contains("10.0.0.1"), "{out}");
        assert!(out.contains("********"), "{out}");
    }
    assert!(
        display.contains("MINIO_ROOT_PASSWORD=********\n"),
        "{display}"
    );
    assert!(
        display.contains("EXECUTOR_JOB__NTP_PEER=10.0.0.1\n"),
        "{display}"
    );
    // The secrets are still usable.
    assert_eq!(c.minio_root_password.expose(), "hunter2-secret-value");
    assert_eq!(c.executor_job_vars.0["registry_token"], "tok-value-123");
    assert_eq!(c.minio_url.url().password(), Some("urlpass-789"));
}

#[test]
fn entries_list_every_variable_with_its_source() {
    let m = with_farm(&[
        ("EXECUTOR_PORT", "8080"),
        ("BOOTS_DEFAULT_X86_64_KERNEL", "k"),
    ]);
    let c = Config::from_env_map(&m).unwrap();
    let entries = c.entries(&m);
    for var in KNOWN_VARIABLES {
        assert!(entries.iter().any(|e| e.name == *var), "{var} missing");
    }
    let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap().clone();
    assert_eq!(get("EXECUTOR_PORT").value, "8080");
    assert_eq!(get("EXECUTOR_PORT").source, ValueSource::Environment);
    assert_eq!(get("MARS_DB_FILE").source, ValueSource::Default);
    assert_eq!(
        get("BOOTS_DEFAULT_X86_64_KERNEL").source,
        ValueSource::Environment
    );
    assert_eq!(get("BOOTS_DEFAULT_KERNEL").source, ValueSource::Default);
    assert_eq!(get("EXECUTOR_REGISTRATION_JOB").value, "(built-in)");
}

#[test]
fn warnings_point_at_likely_typos() {
    let m = with_farm(&[
        ("SERGENT_HARTMAN_BOOTCOUNT", "3"),
        ("BOOTS_DEFAULT_X86_64_KERNAL", "k"),
        ("HOME", "/root"),
    ]);
    let c = Config::from_env_map(&m).unwrap();
    let w = c.warnings(&m);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w
        .iter()
        .any(|x| x.starts_with("BOOTS_DEFAULT_X86_64_KERNAL is never read")));
    assert!(w
        .iter()
        .any(|x| x.starts_with("SERGENT_HARTMAN_BOOTCOUNT is not a variable")));
}

#[test]
fn with_farm_name_gives_defaults() {
    let c = Config::with_farm_name("f").unwrap();
    assert_eq!(c.farm_name, "f");
    assert_eq!(c.executor_port, 80);
    assert!(Config::with_farm_name("").is_err());
}

#[test]
fn check_files_names_missing_templates_and_database_folder() {
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("register.yml.j2");
    std::fs::write(&tpl, "version: 1\n").unwrap();
    let d = dir.path().display().to_string();
    let ok = Config::from_env_map(&with_farm(&[
        ("EXECUTOR_REGISTRATION_JOB", tpl.to_str().unwrap()),
        ("MARS_DB_FILE", &format!("{d}/mars_db.yaml")),
    ]))
    .unwrap();
    ok.check_files().unwrap();

    let bad = Config::from_env_map(&with_farm(&[
        ("EXECUTOR_REGISTRATION_JOB", &format!("{d}/missing.j2")),
        ("EXECUTOR_BOOTLOOP_JOB", &d),
        ("MARS_DB_FILE", &format!("{d}/nope/mars_db.yaml")),
    ]))
    .unwrap();
    let e = bad.check_files().unwrap_err();
    let vars: Vec<&str> = e.errors.iter().map(EnvVarError::var).collect();
    assert_eq!(
        vars,
        vec![
            "EXECUTOR_REGISTRATION_JOB",
            "EXECUTOR_BOOTLOOP_JOB",
            "MARS_DB_FILE"
        ]
    );
    let msgs: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
    assert!(
        msgs[0].starts_with(&format!(
            "EXECUTOR_REGISTRATION_JOB=\"{d}/missing.j2\": expected a template file ("
        )),
        "{msgs:?}"
    );
    assert!(
        msgs[1].ends_with("expected a template file (this is not a regular file)"),
        "{msgs:?}"
    );
    assert!(
        msgs[2].ends_with(&format!("({d}/nope does not exist)")),
        "{msgs:?}"
    );

    // A folder where the database file should be.
    let c = Config::from_env_map(&with_farm(&[("MARS_DB_FILE", &d)])).unwrap();
    assert!(c
        .check_files()
        .unwrap_err()
        .to_string()
        .contains("not a regular file"));
}

#[test]
fn secret_job_variable_names() {
    for (name, secret) in [
        ("gitlab_token", true),
        ("DB_PASSWORD", true),
        ("ldap_passwd", true),
        ("client_secret", true),
        ("aws_credentials", true),
        ("api_key", true),
        ("KEY_ID", true),
        ("ntp_peer", false),
        ("keyboard_layout", false),
        ("fdo_proxy_registry", false),
    ] {
        assert_eq!(JobVars::is_secret_name(name), secret, "{name}");
    }
}

#[test]
fn job_variables_differing_only_in_case_are_refused() {
    let e = parse_err(&[
        ("EXECUTOR_JOB__NTP_PEER", "a"),
        ("EXECUTOR_JOB__ntp_peer", "b"),
    ]);
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(e.errors[0].var(), "EXECUTOR_JOB__ntp_peer");
    assert!(
        e.to_string()
            .contains("already defines the template variable \"ntp_peer\""),
        "{e}"
    );
}

#[test]
fn artifact_cache_bounds_and_storage_api_are_parsed_and_listed() {
    let m = with_farm(&[
        ("EXECUTOR_ARTIFACT_CACHE_MAX_SIZE", "1.5G"),
        ("EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS", "7"),
        ("VIVIAN_STORAGE_ADMIN_API", "iam-allow-only"),
    ]);
    let c = Config::from_env_map(&m).unwrap();
    assert_eq!(c.executor_artifact_cache_max_size, Some(1_610_612_736));
    assert_eq!(c.executor_artifact_cache_max_unused_days, 7.0);
    assert_eq!(c.vivian_storage_admin_api, "iam-allow-only");
    let entries = c.entries(&m);
    let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap().clone();
    assert_eq!(get("EXECUTOR_ARTIFACT_CACHE_MAX_SIZE").value, "1610612736");
    assert_eq!(
        get("EXECUTOR_ARTIFACT_CACHE_MAX_SIZE").source,
        ValueSource::Environment
    );
    assert_eq!(get("VIVIAN_STORAGE_ADMIN_API").value, "iam-allow-only");
    // They are read: no "not a variable the executor reads" warning.
    assert!(c.warnings(&m).is_empty(), "{:?}", c.warnings(&m));

    let d = Config::from_env_map(&with_farm(&[])).unwrap();
    assert_eq!(d.executor_artifact_cache_max_size, None);
    assert_eq!(d.executor_artifact_cache_max_unused_days, 60.0);
    assert_eq!(d.vivian_storage_admin_api, "minio");
}

#[test]
fn bad_artifact_cache_bounds_and_storage_api_are_named() {
    for (var, value, expected) in [
        (
            "EXECUTOR_ARTIFACT_CACHE_MAX_SIZE",
            "20 parsecs",
            "a size such as 20G",
        ),
        (
            "EXECUTOR_ARTIFACT_CACHE_MAX_SIZE",
            "-1G",
            "a size such as 20G",
        ),
        (
            "EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS",
            "0",
            "positive number of days",
        ),
        (
            "EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS",
            "soon",
            "positive number of days",
        ),
        (
            "VIVIAN_STORAGE_ADMIN_API",
            "s3",
            "minio, iam, iam-allow-only",
        ),
    ] {
        let e = Config::from_env_map(&with_farm(&[(var, value)])).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(var) && text.contains(expected),
            "{var}={value}: {text}"
        );
    }
}

#[test]
fn sizes_take_binary_units() {
    assert_eq!(parse_size("500"), Some(500));
    assert_eq!(parse_size("64KiB"), Some(65_536));
    assert_eq!(parse_size("20G"), Some(20 << 30));
    assert_eq!(parse_size(" 2 m "), Some(2 << 20));
    assert_eq!(parse_size("1.5T"), Some(3 << 39));
    assert_eq!(parse_size("20 GiB"), Some(20 << 30));
    assert_eq!(parse_size("1.5k"), Some(1536));
    for bad in ["", "G", "12X", "-5", "nan", "1e30T", "lots"] {
        assert_eq!(parse_size(bad), None, "{bad:?}");
    }
}
