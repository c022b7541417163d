//! The simulated DUT boots through a real HTTP boot script and a real TCP
//! console, runs its script and powers off.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use vivian::simdut::{SimDut, SimDutConfig};
use warp::Filter;

/// Serves `boot.ipxe` for any machine, a script kernel, an initrd, and a
/// `/register` endpoint that records the bodies POSTed to it.
async fn start_http(
    cmdline: &'static str,
    kernel: &'static str,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let posted = Arc::new(Mutex::new(Vec::new()));
    let seen = posted.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let boot = warp::path!("boot" / String / "boot.ipxe").map(move |mac: String| {
        format!(
            "#!ipxe\n\nset semicolon:hex 3b\n\necho\nkernel http://{addr}/kernel {cmdline} SALAD.machine_id={mac}\n\ninitrd --name initrd http://{addr}/initrd\n\nboot\n"
        )
    });
    let kernel_route = warp::path!("kernel").map(move || kernel);
    let initrd = warp::path!("initrd").map(|| "initrd-bytes");
    let register = warp::post()
        .and(warp::path!("register"))
        .and(warp::body::bytes())
        .map(move |b: bytes::Bytes| {
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&b).into_owned());
            warp::reply::with_status("ok", warp::http::StatusCode::CREATED)
        });
    let routes = boot.or(kernel_route).or(initrd).or(register);
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    (addr, posted)
}

async fn read_until<R: tokio::io::AsyncRead + Unpin>(
    lines: &mut tokio::io::Lines<BufReader<R>>,
    needle: &str,
) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} on the console; saw {seen:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("console closed before {needle:?}; saw {seen:?}"));
        let done = line.contains(needle);
        seen.push(line);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn boots_runs_script_and_powers_off() {
    let (http, posted) = start_http(
        r#"vivian.cmd="print hello from @MAC@" vivian.cmd="post @EXECUTOR@/register mac=@MAC@ tags[]=x" vivian.cmd="expect go 10" vivian.cmd="print got go" vivian.cmd=poweroff"#,
        "#!vivian-sim\nprint from the kernel\n",
    )
    .await;
    let console = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let console_addr = console.local_addr().unwrap();
    let cfg = SimDutConfig::new(
        "52:54:00:11:22:0A",
        &format!("http://{http}"),
        &console_addr.to_string(),
    );
    let mut dut = SimDut::new(cfg);
    assert!(!dut.is_powered());
    dut.power_on();
    assert!(dut.is_powered());

    let (stream, _) = tokio::time::timeout(Duration::from_secs(20), console.accept())
        .await
        .expect("the DUT never connected its console")
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let first = read_until(&mut lines, "SALAD.machine_id=").await;
    assert_eq!(first.last().unwrap(), "SALAD.machine_id=52:54:00:11:22:0a");
    let boot = read_until(&mut lines, "SIMDUT.http_status=").await;
    assert!(
        boot.iter().any(
            |l| l.contains("Command line:") && l.contains("SALAD.machine_id=52:54:00:11:22:0a")
        ),
        "{boot:?}"
    );
    let from_kernel = boot
        .iter()
        .position(|l| l == "from the kernel")
        .expect("kernel script line");
    let from_cmdline = boot
        .iter()
        .position(|l| l == "hello from 52:54:00:11:22:0a")
        .expect("cmdline script line");
    assert!(
        from_kernel < from_cmdline,
        "the kernel's script runs before the cmdline's"
    );
    assert_eq!(boot.last().unwrap(), "SIMDUT.http_status=201");
    assert_eq!(
        posted.lock().unwrap().as_slice(),
        [r#"{"mac":"52:54:00:11:22:0a","tags":["x"]}"#]
    );

    // The machine waits for console input before going on.
    write.write_all(b"let us go\n").await.unwrap();
    let end = read_until(&mut lines, "reboot: Power down").await;
    assert!(end.contains(&"got go".to_string()), "{end:?}");
    // poweroff closes the console.
    let eof = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(eof, None);
    dut.power_off().await;
    assert!(!dut.is_powered());
}

#[tokio::test]
async fn power_off_aborts_a_hung_machine_and_closes_its_console() {
    let (http, _) = start_http(r#"vivian.cmd="print stuck" vivian.cmd=hang"#, "kernel").await;
    let console = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let console_addr = console.local_addr().unwrap();
    let mut dut = SimDut::new(SimDutConfig::new(
        "52:54:00:11:22:01",
        &format!("http://{http}"),
        &console_addr.to_string(),
    ));
    dut.power_on();
    let (stream, _) = tokio::time::timeout(Duration::from_secs(20), console.accept())
        .await
        .unwrap()
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    read_until(&mut lines, "Run /init").await;
    let next = lines.next_line().await.unwrap();
    assert_eq!(next.as_deref(), Some("stuck"));
    // Nothing more comes while it hangs; power off closes the console.
    dut.power_off().await;
    let eof = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(eof, None);
}

#[tokio::test]
async fn retries_the_boot_script_until_the_executor_answers() {
    // Reserve a port, start the DUT against it, then start the server there.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let console = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let console_addr = console.local_addr().unwrap();
    let mut dut = SimDut::new(SimDutConfig::new(
        "52:54:00:11:22:02",
        &format!("http://127.0.0.1:{port}"),
        &console_addr.to_string(),
    ));
    dut.power_on();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let routes = warp::path!("boot" / String / "boot.ipxe")
        .map(move |_mac: String| {
            format!("#!ipxe\nkernel http://127.0.0.1:{port}/k vivian.cmd=poweroff\nboot\n")
        })
        .or(warp::path!("k").map(|| "k"));
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    let (stream, _) = tokio::time::timeout(Duration::from_secs(20), console.accept())
        .await
        .expect("the DUT gave up instead of retrying")
        .unwrap();
    let mut lines = BufReader::new(stream).lines();
    read_until(&mut lines, "reboot: Power down").await;
    dut.power_off().await;
}
